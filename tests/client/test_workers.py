"""Decoding shared by the caller and spawned helpers (client.data.workers), and the reader's
faster pixel path giving exactly the pixels it gave before."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from client.data.dicom import physical_pixels
from client.data.workers import (HELPER_NICE, SharedWorkers, WorkerDied, chunks, imap_shared,
                                 map_shared)


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def _fails_on_three(x: int) -> int:
    if x == 3:
        raise KeyError("three")
    return x


def _dies_in_a_helper(caller: int, marker: str, x: int) -> int:
    if os.getpid() != caller:
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)       # a helper killed mid-task (OOM killer)
    deadline = time.monotonic() + 120              # the caller waits until a helper has one
    while not Path(marker).exists() and time.monotonic() < deadline:   # (niced: it may
        time.sleep(0.01)                                                # start slowly)
    return x


def _unpicklable_in_a_helper(caller: int, marker: str, x: int):
    if os.getpid() != caller:
        Path(marker).touch()
        return threading.Lock()                    # fails to pickle
    deadline = time.monotonic() + 120
    while not Path(marker).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def test_results_are_complete_in_order_and_the_caller_decodes_too():
    items = list(range(40))
    out = map_shared(_pid_and_square, items, 2)
    assert [square for _, square in out] == [x * x for x in items]
    # The caller starts at once and claims tasks from the shared counter; a pool it only
    # waited on (the old ProcessPoolExecutor) never ran a task in this process.
    assert os.getpid() in {pid for pid, _ in out}
    assert map_shared(_pid_and_square, items, 1) == [(os.getpid(), x * x) for x in items]


def test_helpers_run_nicer_than_the_caller_from_their_start():
    """A helper takes CPU only where a core is free: where the cores are busy, a helper
    starting and decoding at the caller's priority took the caller's share, and two workers
    ran slower than one."""
    pool = SharedWorkers(3)
    pool._start()
    try:
        mine = os.getpriority(os.PRIO_PROCESS, 0)
        assert [os.getpriority(os.PRIO_PROCESS, h.pid) for h in pool._helpers] == \
            [min(mine + HELPER_NICE, 19)] * 2
    finally:
        pool.close()
    assert pool._helpers == []


def test_an_error_in_any_process_reaches_the_caller():
    with pytest.raises(KeyError, match="three"):
        map_shared(_fails_on_three, list(range(30)), 2)


def test_a_helper_killed_mid_task_is_an_error_not_a_hang(tmp_path):
    from functools import partial

    # the caller's first task waits until the helper has claimed one (and died)
    with pytest.raises(WorkerDied):
        map_shared(partial(_dies_in_a_helper, os.getpid(), str(tmp_path / "m")),
                   list(range(50)), 2)


def test_a_helper_result_that_does_not_pickle_is_an_error_not_a_hang(tmp_path):
    from functools import partial

    signal.alarm(300)                  # the old code waited for the lost result for good
    try:
        with pytest.raises(TypeError, match="pickle"):
            map_shared(partial(_unpicklable_in_a_helper, os.getpid(), str(tmp_path / "m")),
                       list(range(50)), 2)
    finally:
        signal.alarm(0)


def test_workers_must_be_positive():
    with pytest.raises(ValueError, match="decode workers"):
        list(imap_shared(abs, [1, 2], 0))


def test_chunks_cover_the_items_in_order():
    items = list(range(1319))
    parts = chunks(items, 2)
    assert [x for part in parts for x in part] == items
    assert 16 <= len(parts) <= 64 and max(map(len, parts)) <= 64
    assert len(parts[-1]) <= 4 < len(parts[0])           # short tasks at the end
    assert chunks([], 2) == []


def _corpus_files() -> list[Path]:
    import data_store
    import pydicom.data

    dirs = [Path(pydicom.data.__file__).parent / "test_files",
            Path(data_store.__file__).parent / "data"]
    return sorted(p for d in dirs for p in d.rglob("*") if p.is_file())


def _assert_same_pixels_as_before(files: list[Path]) -> tuple[int, int, int]:
    """The reader's pixels of each decodable image are exactly
    ``apply_modality_lut(ds.pixel_array, ds)`` as float32 (what it computed before), and it
    fails exactly where that fails; (images compared, of which identity rescales, of which
    read from their bytes by :func:`native_pixels`)."""
    from client.data.dicom import native_pixels

    compared = identity = native = 0
    for path in files:
        try:
            ds = pydicom.dcmread(path)
            if "PixelData" not in ds:
                continue
        except Exception:  # noqa: BLE001 - not DICOM, truncated: not a pixel question
            continue
        try:
            want = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        except Exception:  # noqa: BLE001
            want = None
        fresh = pydicom.dcmread(path)           # the reader sees an untouched dataset
        try:
            got = physical_pixels(fresh)
        except Exception:  # noqa: BLE001
            got = None
        assert (got is None) == (want is None), path.name
        if want is None:
            continue
        assert got.dtype == want.dtype and got.shape == want.shape, path.name
        assert np.array_equal(got, want, equal_nan=True), path.name
        compared += 1
        identity += ds.get("RescaleSlope") == 1 and ds.get("RescaleIntercept") == 0
        native += native_pixels(pydicom.dcmread(path)) is not None
    return compared, identity, native


def test_physical_pixels_equal_the_old_formula_on_synthetic_sites(tiny_sites):
    files = sorted(p for p in tiny_sites.rglob("dicom/**/*") if p.is_file())
    compared, identity, native = _assert_same_pixels_as_before(files)
    assert identity > 10 and compared - identity > 10       # both paths of physical_pixels
    assert native > 10                                      # and the bytes read directly


@pytest.mark.slow
def test_physical_pixels_equal_the_old_formula_on_both_real_corpora():
    compared, _, native = _assert_same_pixels_as_before(_corpus_files())
    assert compared > 100 and 20 < native < compared        # both decode paths


def _variant(source: Path, folder: Path, name: str, **change) -> Path:
    """A copy of ``source`` with header values changed and its pixel bytes rewritten
    (``pixels``: the new bytes) as pydicom writes them without its checks."""
    from pydicom import config

    ds = pydicom.dcmread(source)
    pixels = change.pop("pixels", None)
    syntax = change.pop("syntax", None)
    before = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        for keyword, value in change.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        if pixels is not None:
            ds.PixelData = pixels
        if syntax is not None:
            ds.file_meta.TransferSyntaxUID = syntax
        path = folder / f"{name}.dcm"
        ds.save_as(path, implicit_vr=syntax == "1.2.840.10008.1.2",
                   little_endian=True, enforce_file_format=False)
    finally:
        config.settings.writing_validation_mode = before
    return path


def test_native_pixels_take_only_images_pydicom_reads_as_their_bytes(tiny_sites, tmp_path):
    """Images near the edge of the direct read: signed values in fewer stored bits (pydicom
    corrects the sign), bits above the stored ones, 8 bits with a pad byte, bytes to spare
    or missing, MONOCHROME1, an explicit single frame, implicit VR: each gives exactly what
    pydicom's decoder gives, or fails where it fails."""
    source = next(p for p in sorted((tiny_sites / "site-0" / "dicom").rglob("*.dcm"))
                  if "PixelData" in pydicom.dcmread(p))
    ds = pydicom.dcmread(source)
    rows, cols = ds.Rows, ds.Columns
    rng = np.random.default_rng(0)
    words = rng.integers(0, 2**16, rows * cols, dtype=np.uint16).tobytes()
    odd = rng.integers(0, 256, 3 * 5, dtype=np.uint8).tobytes()
    variants = {
        "signed12": dict(PixelRepresentation=1, BitsStored=12, HighBit=11, pixels=words),
        "unsigned12": dict(PixelRepresentation=0, BitsStored=12, HighBit=11, pixels=words),
        "signed16": dict(PixelRepresentation=1, BitsStored=16, HighBit=15, pixels=words),
        "spare": dict(pixels=words + b"\0\0"),
        "short": dict(pixels=words[:-2]),
        "mono1": dict(PhotometricInterpretation="MONOCHROME1", pixels=words),
        "one_frame": dict(NumberOfFrames=1, pixels=words),
        "implicit": dict(syntax="1.2.840.10008.1.2", pixels=words),
        "odd8": dict(Rows=3, Columns=5, BitsAllocated=8, BitsStored=8, HighBit=7,
                     PixelRepresentation=0, pixels=odd + b"\0"),
        "odd8_signed": dict(Rows=3, Columns=5, BitsAllocated=8, BitsStored=8, HighBit=7,
                            PixelRepresentation=1, pixels=odd + b"\0"),
    }
    files = [_variant(source, tmp_path, name, **change) for name, change in variants.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compared, _, native = _assert_same_pixels_as_before(files)
    assert compared == len(variants) - 1            # "short" fails both ways
    assert native == 6                              # signed12/unsigned12/spare/short: pydicom



def _pid_after_marker(marker: str, x: int) -> int:
    """A helper's task: mark that a helper ran (before the caller joined the job)."""
    Path(marker).touch()
    return os.getpid()


def test_a_submitted_job_runs_on_the_helpers_while_the_caller_works_then_joins():
    """submit() hands the job to the running helpers without this process: they work on it
    while the caller does its serial work (the cache's sync and publish), and map() gives
    every result in order, this process taking what is left."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, SharedWorkers(2) as pool:
        assert [sq for _, sq in pool.map(_pid_and_square, [1, 2])] == [1, 4]
        assert pool.started
        marker = str(Path(tmp) / "m")
        job = pool.submit(partial(_pid_after_marker, marker), list(range(40)))
        deadline = time.monotonic() + 120          # niced helper: may start slowly
        while not Path(marker).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert Path(marker).exists()               # a helper ran a task before the join
        with pytest.raises(RuntimeError, match="not joined"):
            pool.map(_pid_and_square, [1, 2])      # one job at a time
        pids = job.map()
        assert len(pids) == 40 and any(pid != os.getpid() for pid in pids)
        assert pool.map(_pid_and_square, [3, 4])[1][1] == 16     # the pool goes on


def test_without_helpers_a_submitted_job_runs_here_at_the_join():
    """submit() starts no process: with none up, the job runs in the caller when joined."""
    pool = SharedWorkers(2)
    job = pool.submit(_pid_and_square, [1, 2, 3])
    assert not pool.started
    assert job.map() == [(os.getpid(), x * x) for x in (1, 2, 3)]
    assert not pool.started


def test_closing_after_a_job_the_helpers_took_does_not_wait_on_the_job_pipe():
    """Once every job message is out of the pipe (each helper took its own), close() has
    nothing to drain: it must not sit in a 20 ms read of an empty pipe on every ingest."""
    pool = SharedWorkers(2)
    assert [sq for _, sq in pool.map(_pid_and_square, list(range(8)))][-1] == 49
    deadline = time.monotonic() + 120
    while pool._taken.value < pool._posted and time.monotonic() < deadline:
        time.sleep(0.01)                           # the helper takes its message
    assert pool._taken.value == pool._posted == 1

    def no_drain(*args, **kwargs):
        raise AssertionError("drained a job pipe the helpers had emptied")
    pool._jobs.get = no_drain
    pool.close()
    assert not pool.started


def _imported_in_a_helper(caller: int, marker: str, path: str) -> tuple[int, list[str], str]:
    """Decode a DICOM file; which of the network-only modules this process has imported."""
    from client.data.site import read_share
    from client.data.workers import HELPER_UNNEEDED

    if os.getpid() != caller:
        Path(marker).touch()
    else:                                          # the caller waits for a helper's read
        deadline = time.monotonic() + 120
        while not Path(marker).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    uid, _, arrays = read_share(None, path)
    import sys
    loaded = [name for name in HELPER_UNNEEDED if sys.modules.get(name) is not None]
    return os.getpid(), loaded, f"{uid}:{arrays[0].sum() if arrays else ''}"


def test_helpers_decode_without_the_network_only_modules_pydicom_would_import(tiny_sites,
                                                                               tmp_path):
    """A helper's start-up runs while the caller decodes alone: it does not import what
    pydicom loads only to download test files (``requests``: ~50 ms of its ~0.3 s), and
    decodes the same as the caller."""
    path = str(sorted((tiny_sites / "site-0" / "dicom").rglob("*.dcm"))[0])
    out = map_shared(partial(_imported_in_a_helper, os.getpid(), str(tmp_path / "m")),
                     [path] * 4, 2)
    helpers = [loaded for pid, loaded, _ in out if pid != os.getpid()]
    assert helpers and all(loaded == [] for loaded in helpers)
    assert len({decoded for *_, decoded in out}) == 1


def _grid_in_a_helper(caller: int, marker: str, _: int) -> tuple[int, bool, list[str]]:
    """In a helper: import the 3D layout's resampling (MONAI, then huggingface_hub and its
    tqdm); whether huggingface_hub's downloader loaded, and which of the modules kept out
    of pydicom's import are still blocked. The caller only waits for a helper to run it."""
    import sys

    from client.data.workers import HELPER_UNNEEDED

    if os.getpid() == caller:
        deadline = time.monotonic() + 120
        while not Path(marker).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return os.getpid(), False, []
    Path(marker).touch()
    import client.data.grid  # noqa: F401
    return (os.getpid(), "huggingface_hub.file_download" in sys.modules,
            [name for name in HELPER_UNNEEDED if sys.modules.get(name, 0) is None])


def test_a_helper_imports_the_3d_resampling_silently(tmp_path, capfd):
    """The network-only modules are blocked for a helper's import of pydicom only: later,
    a 3D layout's helper imports MONAI -> huggingface_hub, which imports tqdm and prints an
    error to stderr when that import fails. Nothing on the helper's stdout/stderr (captured
    at the descriptor, which it inherits) and nothing left blocked."""
    capfd.readouterr()
    out = map_shared(partial(_grid_in_a_helper, os.getpid(), str(tmp_path / "m")), [0, 1], 2)
    helpers = [(loaded, blocked) for pid, loaded, blocked in out if pid != os.getpid()]
    assert helpers and all(loaded and blocked == [] for loaded, blocked in helpers)
    assert capfd.readouterr() == ("", "")


def _values(path: Path) -> list:
    """Every element's converted value in the file (nested ones too), or the error type."""
    try:
        ds = pydicom.dcmread(path)
        out = []
        for elem in ds.iterall():
            try:
                out.append((elem.tag, repr(elem.value)))
            except Exception as err:  # noqa: BLE001 - compared as the type
                out.append((elem.tag, type(err).__name__))
        return out
    except Exception as err:  # noqa: BLE001
        return [type(err).__name__]


def _read_both_ways(files: list[Path]) -> tuple[int, int]:
    """Each file read with pydicom's value checks off (as the reader reads) and on
    (pydicom's default): every element converted to the same value; the reader gives the
    same study, the same de-identified image or skip reason, the same pixels. (elements
    compared, images compared)."""
    from client.data.dicom import ReadCounts, _read_file_study, read_file_study, \
        values_unvalidated

    compared = elements = 0
    key = b"k" * 32
    for path in files:
        with values_unvalidated():
            off = _values(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert off == _values(path), path.name
        elements += len(off)
        off_counts, on_counts = ReadCounts(), ReadCounts()
        off_image, off_uid = read_file_study(path, off_counts, key)
        with warnings.catch_warnings():                  # the default check warns
            warnings.simplefilter("ignore")
            on_image, on_uid = _read_file_study(path, on_counts, key)
        assert off_uid == on_uid and off_counts.skipped == on_counts.skipped, path.name
        assert (off_image is None) == (on_image is None), path.name
        if off_image is None:
            continue
        off_pixels, on_pixels = off_image.pixels, on_image.pixels
        off_image.pixels = on_image.pixels = None
        assert off_image == on_image, path.name
        assert np.array_equal(off_pixels, on_pixels, equal_nan=True), path.name
        compared += 1
    return elements, compared


def test_reading_without_value_checks_gives_the_same_on_synthetic_sites(tiny_sites):
    files = sorted(p for p in tiny_sites.rglob("dicom/**/*") if p.is_file())
    elements, images = _read_both_ways(files)
    assert images > 20 and elements > 1000


def test_reading_without_value_checks_gives_the_same_on_both_real_corpora():
    elements, images = _read_both_ways(_corpus_files())
    assert elements > 10000 and images >= 1


def _checked(reader, *args, **kwargs):
    """``reader`` without its :func:`values_unvalidated` wrapper: pydicom's default checks
    (their warnings ignored here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reader.__wrapped__(*args, **kwargs)


def test_header_and_volume_readers_give_the_same_without_value_checks_on_both_corpora():
    """The matcher's headers (``medfed ingest --layout``/``--suggest-layout``, every layout
    site) and the volume reader are the same with pydicom's checks off as on."""
    from client.data.matching import read_headers
    from client.data.volume import read_volumes

    files, key = _corpus_files(), b"k" * 32
    headers = read_headers(None, key, files)
    assert headers == _checked(read_headers, None, key, files) and len(headers[0]) > 100
    volumes, counts = read_volumes(files, key=key)
    before, before_counts = _checked(read_volumes, files, key=key)
    assert counts == before_counts and len(volumes) == len(before) >= 1
    for new, old in zip(volumes, before):
        assert np.array_equal(new.array, old.array) and np.array_equal(new.affine, old.affine)
        assert (new.spacing, new.series_key, new.patient_key) == \
            (old.spacing, old.series_key, old.patient_key)


def test_the_2d_layout_reader_gives_the_same_without_value_checks(tmp_path, monkeypatch):
    """A synthetic chest site (every photometric, multi-image series) read through its
    layout: the same studies and pixels with the channel reader's checks off as on."""
    from client.data import layout_site
    from client.data.layout import load_layout
    from medfed.synth.chest import CLASS_NAMES, synthesize_chest

    profile = synthesize_chest(tmp_path / "chest", n_sites=1, seed=5, patients=6)[0]
    site, layout = tmp_path / "chest" / profile.name, load_layout("chest_xray")

    def studies():
        data = layout_site.read_site(site, layout, CLASS_NAMES, key=b"k" * 32)
        return data.report.as_dict(), {s.key: s for s in data.studies}

    report, now = studies()
    channel = layout_site._read_channel
    monkeypatch.setattr(layout_site, "_read_channel",
                        lambda *a: _checked(channel, *a))
    before_report, before = studies()
    assert report == before_report and now.keys() == before.keys() and len(now) >= 3
    for k, study in now.items():
        old = before[k]
        assert (study.patient_key, study.label, study.split) == \
            (old.patient_key, old.label, old.split)
        assert study.images.keys() == old.images.keys()
        assert all(np.array_equal(study.images[c], old.images[c]) for c in study.images)


def test_an_invalid_header_value_is_not_logged_by_pydicom(tiny_sites, tmp_path, caplog):
    """pydicom logs a warning quoting an invalid value it converts (its default check):
    a header value in the site log. The reader converts without that check."""
    from pydicom import config

    from client.data.dicom import ReadCounts, read_file_study

    source = next(p for p in sorted((tiny_sites / "site-0" / "dicom").rglob("*.dcm"))
                  if "PixelData" in pydicom.dcmread(p))
    ds = pydicom.dcmread(source)
    path = tmp_path / "bad.dcm"
    before = config.settings.writing_validation_mode
    config.settings.writing_validation_mode = config.IGNORE
    try:
        ds.SeriesInstanceUID = "1.2.840.DOE.7"          # letters: an invalid UID
        ds.save_as(path)
    finally:
        config.settings.writing_validation_mode = before
    caplog.set_level(logging.DEBUG)
    caplog.clear()                                       # (pydicom's own write checks)
    image = read_file_study(path, ReadCounts(), b"k" * 32)[0]
    assert image is not None
    assert not [r.getMessage() for r in caplog.records if "DOE" in r.getMessage()]
    with warnings.catch_warnings():                      # the default check does log it
        warnings.simplefilter("ignore")
        pydicom.dcmread(path).get("SeriesInstanceUID")
    assert any("DOE" in r.getMessage() for r in caplog.records)
