"""No DICOM header value reaches a site's log, stderr or warnings, through any site reader.

pydicom, on an invalid element value, both warns and *logs* a warning quoting the value (a
name, an ID, a UID: PHI); it converts an element on first access, not in ``dcmread``. Every
site reader reads and accesses inside :func:`client.data.dicom.values_unvalidated`. Here each
path reads a site whose study and series UIDs are invalid and carry a marker, with every
logger captured at DEBUG, stderr captured and every warning recorded: the marker appears
nowhere. (Removing the wrapper from any one reader makes its case fail: checked by mutation.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom import config

from client.data.cache import SiteCache
from client.data.dicom import ReadCounts, read_file_study
from client.data.layout import load_layout
from client.data.layout_site import read_site
from medfed.cli import main

MARKER = "PHI-MARKER-123"


def _poison(site: Path) -> int:
    """Append ``.PHI-MARKER-123`` (letters: an invalid UID) to every study and series UID of
    the site's DICOM, and to the study UIDs in its tables (labels still join); name the
    marker as the character set (an unknown one: pydicom logs it even with its value checks
    off, on decoding any text); files changed."""
    renamed: dict[str, str] = {}
    changed = 0
    before = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        for path in sorted(p for p in (site / "dicom").rglob("*") if p.is_file()):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")     # pydicom's checks of the original files
                try:
                    ds = pydicom.dcmread(path)
                except Exception:  # noqa: BLE001 - the fixture's junk files stay junk
                    continue
                for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
                    if keyword in ds:
                        old = str(ds[keyword].value)
                        ds[keyword].value = renamed.setdefault(old, f"{old}.{MARKER}")
                ds.SpecificCharacterSet = MARKER
                ds.save_as(path)
            changed += 1
    finally:
        config.settings.writing_validation_mode = before
    for table in (p for p in site.rglob("*") if p.suffix in (".csv", ".jsonl")):
        text = table.read_text()
        for old, new in renamed.items():
            text = re.sub(re.escape(old) + r"(?![0-9.])", new, text)
        table.write_text(text)
    return changed


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_sites):
    """(brain site, chest site, CT site), each poisoned."""
    from medfed.synth.chest import synthesize_chest
    from medfed.synth.ct import synthesize_ct

    root = tmp_path_factory.mktemp("poisoned")
    brain = root / "brain"
    shutil.copytree(tiny_sites / "site-0", brain)
    chest = synthesize_chest(root / "chest", n_sites=1, seed=5, patients=6)
    ct = synthesize_ct(root / "ct", n_sites=1, seed=3, patients=3)
    sites = (brain, root / "chest" / chest[0].name, root / "ct" / ct[0].name)
    for site in sites:
        assert _poison(site) > 5
    return sites


@pytest.fixture
def leaks(caplog, capfd):
    """Every log record (all loggers, DEBUG, formatted as a handler writes it: its
    traceback included), stdout/stderr and every warning of the calls made meanwhile; call
    it to get the texts that carry the marker (or ``markers``)."""
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def found(*markers: str) -> list[str]:
            out, err = capfd.readouterr()
            texts = [logging.Formatter().format(r) for r in caplog.records] + [out, err] + \
                [str(w.message) for w in caught]
            return [t for t in texts if any(m in t for m in markers or (MARKER,))]
        yield found


def test_the_capture_sees_pydicom_quote_the_marker(poisoned, leaks):
    """The poisoning is live: pydicom's default check logs the marker (the tests below can
    fail)."""
    path = next(p for p in sorted((poisoned[0] / "dicom").rglob("*.dcm"))
                if "StudyInstanceUID" in pydicom.dcmread(p, stop_before_pixels=True))
    pydicom.dcmread(path, stop_before_pixels=True).get("StudyInstanceUID")
    assert leaks()


def test_the_capture_sees_pydicom_quote_the_character_set_without_value_checks(poisoned, leaks):
    """Value checks off is not enough: an unknown character set is logged on decoding text
    (the reader's wrapper also withholds the text of pydicom's records)."""
    path = next(p for p in sorted((poisoned[0] / "dicom").rglob("*.dcm"))
                if "SeriesDescription" in pydicom.dcmread(p, stop_before_pixels=True))
    before = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.IGNORE
    try:
        pydicom.dcmread(path, stop_before_pixels=True).get("SeriesDescription")
    finally:
        config.settings.reading_validation_mode = before
    assert leaks()


def test_medfed_ingest_layout_and_suggest_layout(poisoned, leaks):
    brain = poisoned[0]
    assert main(["ingest", "--layout", "brain_mri_4seq", "--data-dir", str(brain)]) == 0
    assert main(["ingest", "--suggest-layout", "--data-dir", str(brain)]) == 0
    assert not leaks()


def test_the_default_reader_with_and_without_the_site_cache(poisoned, leaks, tmp_path):
    brain = poisoned[0]
    assert read_site(brain, None).studies
    assert read_site(brain, None, cache=SiteCache(tmp_path / "cache")).studies
    assert not leaks()


def _read_in_process(paths: list[str]) -> tuple[int, int]:
    """(this process id, images read): the cache's header pass, the matcher and the default
    reader on ``paths``, wherever this runs."""
    from client.data.cache import _study_uids
    from client.data.dicom import ReadCounts, read_file_study
    from client.data.matching import read_headers

    _study_uids(paths)
    read_headers(None, None, [Path(p) for p in paths])
    counts = ReadCounts()
    images = [read_file_study(Path(p), counts, None)[0] for p in paths]
    return os.getpid(), sum(image is not None for image in images)


def test_decode_helper_processes_write_no_header_value_to_stderr(poisoned, leaks):
    """A spawned helper logs to the stderr it inherits (captured here at the descriptor):
    the readers run in helpers until a helper has read some of the files."""
    from client.data.workers import SharedWorkers

    items = [[str(p)] for p in sorted((poisoned[0] / "dicom").rglob("*.dcm"))]
    deadline = time.monotonic() + 60
    with SharedWorkers(2) as pool:
        while True:
            done = pool.map(_read_in_process, items)
            if any(pid != os.getpid() and images for pid, images in done):
                break
            assert time.monotonic() < deadline, "no helper read a file within 60 s"
    assert not leaks()


def test_a_2d_layout_reader_with_and_without_the_site_cache(poisoned, leaks, tmp_path):
    from medfed.synth.chest import CLASS_NAMES

    chest, layout = poisoned[1], load_layout("chest_xray")
    assert read_site(chest, layout, CLASS_NAMES).studies
    assert read_site(chest, layout, CLASS_NAMES, cache=SiteCache(tmp_path / "cache")).studies
    assert not leaks()


def test_a_3d_layout_reader_with_and_without_the_site_cache(poisoned, leaks, tmp_path):
    from medfed.synth.ct import CLASS_NAMES

    ct = poisoned[2]
    layout = dataclasses.replace(load_layout("ct_volume"), size=(16, 16, 16),
                                 spacing=(8.0, 8.0, 8.0))
    assert read_site(ct, layout, CLASS_NAMES).studies
    assert read_site(ct, layout, CLASS_NAMES, cache=SiteCache(tmp_path / "cache")).studies
    assert not leaks()


# A number read from the file's pixel data: pydicom's RLE decoder quotes it in the exception
# it logs with its traceback (``LOGGER.exception``) before raising.
SEGMENTS = 3141592653


@pytest.fixture
def broken_rle(tmp_path) -> Path:
    """An RLE Lossless MR image that reaches decoding (a known sequence) with invalid study
    and series UIDs and a character set carrying the marker, and an RLE header claiming
    ``SEGMENTS`` segments: its decode fails inside the reader."""
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))
    before = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # pydicom's checks of the values set here
            ds.StudyInstanceUID = f"{ds.StudyInstanceUID}.{MARKER}"
            ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID}.{MARKER}"
            ds.SpecificCharacterSet = MARKER
            ds.SeriesDescription = "T1 axial"
            pixels = bytearray(ds.PixelData)
            # [offset table item: tag, length, one offset: 12][fragment item: tag, length: 8]
            # [its RLE header: number of segments, offsets]
            pixels[20:24] = SEGMENTS.to_bytes(4, "little")
            ds.PixelData = bytes(pixels)
            path = tmp_path / "image.dcm"
            ds.save_as(path)
    finally:
        config.settings.writing_validation_mode = before
    return path


def test_the_capture_sees_pydicom_log_a_decode_failure_with_the_files_text(broken_rle,
                                                                          leaks):
    """The poisoning is live: pydicom's decoder logs the failure with its traceback, whose
    last line quotes the number read from the file (the test below can fail)."""
    from pydicom.pixels import pixel_array

    with pytest.raises(RuntimeError):
        pixel_array(pydicom.dcmread(broken_rle))
    quoted = leaks(str(SEGMENTS))
    assert quoted and any("Traceback" in text for text in quoted)


def test_a_failed_pixel_decode_logs_no_traceback_and_no_file_text(broken_rle, leaks,
                                                                  caplog):
    """pydicom's decoder logs its exception with ``LOGGER.exception``: the reader keeps the
    record (the site log says pydicom failed) but withholds its text *and its traceback*,
    which a handler would format below it (the exception quotes the file). (Mutation: with
    the traceback kept, this fails.)"""
    counts = ReadCounts()
    assert read_file_study(broken_rle, counts)[0] is None
    assert counts.skipped == {"pixel_decode_error": 1}
    assert not leaks(MARKER, str(SEGMENTS), "Traceback", "RLE")
    assert any(r.name == "pydicom.pixels.decoders.base" and r.levelno == logging.ERROR
               and "its traceback" in r.getMessage() for r in caplog.records)
