"""Read a site's DICOM files into de-identified series, skipping and counting what is unusable.

De-identification happens here, at read time: a header is reduced to the few non-identifying
fields the pipeline needs (sequence, series grouping, geometry) plus *keyed pseudonyms* of the
study and patient. Names, IDs, dates, institution and accession numbers are never copied out of
the pydicom dataset, which is dropped as soon as the file is read.
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, pixel_array

from .pseudonyms import pseudonym
from .sequences import sequence_of
from .workers import chunks, imap_shared

log = logging.getLogger(__name__)

# SOP classes we can turn into image tensors (MR, enhanced MR, CT, secondary capture).
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4",      # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",    # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.2",      # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.7",      # Secondary Capture
}


# Hostile-file limits, checked on the header before any pixel is decoded: a header can claim
# 60000 x 60000 pixels (or a compressed stream that inflates to them) in a file of a few KB.
MAX_ROWS_COLUMNS = 8192        # wider than any MR/CT/radiograph matrix in use
MAX_FRAMES = 2048
MAX_DECODED_BYTES = 512 * 2**20   # after the modality LUT (float32), per file


@dataclass
class SeriesImage:
    """One de-identified image series: pixels after the modality LUT, no PHI."""

    study_key: str
    patient_key: str
    sequence: str
    series_key: str
    instance: int
    pixels: np.ndarray        # [H, W] or [D, H, W], float32, physical units


@dataclass
class ReadCounts:
    """Files seen, read and skipped (by reason); safe to log and report."""

    files: int = 0
    images: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str) -> None:
        self.skipped[reason] += 1


def read_file(path: Path, counts: ReadCounts, key: bytes | None = None) -> SeriesImage | None:
    """Read one file; on any problem count the reason and return None. ``key``: the site's
    pseudonym secret (:mod:`client.data.pseudonyms`)."""
    return read_file_study(path, counts, key)[0]


# pydicom's loggers: "pydicom" (values, charsets, truncated files) and its pixel modules'.
PYDICOM_LOGGERS = ("pydicom", "pydicom.pixels.decoders.base", "pydicom.pixels.utils")


class _Withheld(logging.Filter):
    """Replaces the text of a pydicom log record: it may quote a header value or a path.
    Its traceback too (``exc_info``: a decoder's ``LOGGER.exception``, the dataset's debug
    record of a failed handler): the exception's text is the file's as much as the
    message's, and a handler formats it below the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        traced = bool(record.exc_info or record.exc_text or record.stack_info)
        record.msg = "pydicom %s while reading a site file (text withheld%s: it may quote " \
                     "a header value or a path)"
        record.args = (record.levelname.lower(), ", and its traceback" if traced else "")
        record.exc_info = record.exc_text = record.stack_info = None
        return True


@contextmanager
def values_unvalidated() -> Iterator[None]:
    """Read site DICOM with no header value (and no path) in a log or on stderr: the one
    wrapper every site reader runs its reads *and its element accesses* in (also a
    decorator: ``@values_unvalidated()``).

    Three things, each restored on exit: pydicom's check of each element value it converts
    is off (its ``reading_validation_mode``); the text of pydicom's log records is withheld
    (the record stays, so the site log still says pydicom warned); pydicom's Python warnings
    are ignored (their text is the record's). Why: on an invalid value pydicom both warns
    and *logs* a warning quoting the value (a name, an ID, a UID: PHI in the site log;
    catching the warning does not stop the record), and a truncated file is logged with its
    path. pydicom converts an element on its first access, not in ``dcmread``, so the
    accesses must run inside too. The check also costs ~40 us of a ~550 us file
    (``bench/ingest.py``). The values converted are the same either way (checked on both
    real corpora and the synthetic sites: ``tests/client/test_workers.py``).

    The settings are process-wide, not per thread. That is acceptable because a site
    process reads DICOM on one thread, and the decode helpers are processes (each sets its
    own); pydicom elsewhere in the process (none at a site) would be quiet while it runs.
    """
    settings = pydicom_config.settings
    before = settings.reading_validation_mode
    withheld = _Withheld()
    loggers = [logging.getLogger(name) for name in PYDICOM_LOGGERS]
    settings.reading_validation_mode = pydicom_config.IGNORE
    for logger in loggers:
        logger.addFilter(withheld)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(withheld)
        settings.reading_validation_mode = before


def read_file_study(path: Path, counts: ReadCounts, key: bytes | None = None,
                    ) -> tuple[SeriesImage | None, str]:
    """:func:`read_file`, and the file's StudyInstanceUID ("" when unreadable or absent) from
    the same read: the site cache groups files by study without reading headers twice. The
    UID stays at the site (the cache keeps only a keyed hash of it). Values are converted
    unvalidated (:func:`values_unvalidated`: no header value in a log)."""
    with values_unvalidated():
        return _read_file_study(path, counts, key)


def _read_file_study(path: Path, counts: ReadCounts, key: bytes | None,
                     ) -> tuple[SeriesImage | None, str]:
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError:
        counts.skip("not_dicom")
        return None, ""
    except Exception:  # noqa: BLE001 - a corrupt file must never stop a site
        counts.skip("unreadable")
        return None, ""
    try:
        uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    except Exception:  # noqa: BLE001 - a malformed element: the image check counts it
        uid = ""
    return _image_of(ds, counts, key), uid


def _image_of(ds, counts: ReadCounts, key: bytes | None) -> SeriesImage | None:
    """The read file's de-identified image, or None (the reason counted)."""
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in IMAGE_SOP_CLASSES:
        counts.skip("non_image")
        return None
    if "PixelData" not in ds:
        counts.skip("missing_pixel_data")         # an image object cut short or stripped
        return None
    study_uid, series_uid = ds.get("StudyInstanceUID"), ds.get("SeriesInstanceUID")
    if not study_uid or not series_uid:
        counts.skip("missing_uid")
        return None
    sequence = sequence_of(str(ds.get("SeriesDescription", "")), str(ds.get("ProtocolName", "")))
    if sequence is None:
        counts.skip("unknown_sequence")
        return None
    if decoded_bytes(ds) > MAX_DECODED_BYTES:
        counts.skip("too_large")                  # before pixel_array: never decoded
        return None
    try:
        pixels = physical_pixels(ds)
    except Exception:  # noqa: BLE001 - truncated pixel data, missing codec, bad VR
        counts.skip("pixel_decode_error")
        return None
    if not np.isfinite(pixels).all():
        counts.skip("pixel_decode_error")
        return None
    image = SeriesImage(
        study_key=pseudonym("study", str(study_uid), key),
        patient_key=pseudonym("patient", str(ds.get("PatientID", "")) or str(study_uid), key),
        sequence=sequence,
        series_key=pseudonym("series", str(series_uid), key),
        instance=int(ds.get("InstanceNumber", 0) or 0),
        pixels=pixels,
    )
    counts.images += 1
    return image


def physical_pixels(ds) -> np.ndarray:
    """The file's pixels after its modality LUT, float32: what
    ``apply_modality_lut(ds.pixel_array, ds).astype(np.float32)`` gives, bit for bit.

    ``pixel_array(ds)`` is the decoder ``ds.pixel_array`` calls, without the Dataset's
    cache bookkeeping (it hashes the pixel elements twice per call: a third of the decode
    time of a small image). An identity rescale (slope 1, intercept 0, no LUT sequence)
    converts the stored integers (32 bits at most) straight to float32: pydicom's float64
    step is exact for them, so the one rounding to float32 is the same.
    """
    stored = native_pixels(ds)
    if stored is None:
        stored = pixel_array(ds)
    if "ModalityLUTSequence" not in ds and "RescaleSlope" in ds and "RescaleIntercept" in ds \
            and stored.dtype.kind in "iu" and stored.itemsize <= 4 and ds.RescaleSlope == 1 and ds.RescaleIntercept == 0:
        return stored.astype(np.float32)
    return apply_modality_lut(stored, ds).astype(np.float32)


# Transfer syntaxes whose pixel data are the stored values as they are, little-endian.
NATIVE_LITTLE_ENDIAN = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def native_pixels(ds) -> np.ndarray | None:
    """The stored values of an uncompressed, little-endian, single-frame greyscale image
    whose every allocated bit is stored (8, 16 or 32), read straight from its pixel bytes;
    None for any other image (pydicom's decoder reads it).

    For such an image pydicom's decoder (``pixel_array(ds)``) gives exactly these values:
    no sign or unused-bit correction and no colour step applies. What it adds is set-up:
    ~160 us a call, most of a small image's decode (a site's 64 x 64 MR slices: 29% of
    reading a file). The pixel bytes must be exactly the image's (an odd 8-bit image may
    carry its one pad byte); a file cut short, or with bytes to spare, goes to pydicom,
    which refuses or warns as it does. Checked against pydicom on both real corpora
    (``tests/client/test_workers.py``).
    """
    try:
        if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID not in NATIVE_LITTLE_ENDIAN:
            return None
        rows, cols = ds.get("Rows"), ds.get("Columns")
        bits, stored = ds.get("BitsAllocated"), ds.get("BitsStored")
        sign = ds.get("PixelRepresentation")
        if bits not in (8, 16, 32) or stored != bits or sign not in (0, 1) \
                or ds.get("SamplesPerPixel") != 1 \
                or ds.get("PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2") \
                or ds.get("NumberOfFrames", 1) not in (1, "1", None) \
                or not isinstance(rows, int) or not isinstance(cols, int) \
                or not 0 < rows < 2**16 or not 0 < cols < 2**16:
            return None
        data = ds.PixelData
    except Exception:  # noqa: BLE001 - a malformed header: pydicom decides (and counts)
        return None
    count = rows * cols
    size = count * bits // 8
    if not isinstance(data, bytes) or not (len(data) == size
                                           or len(data) == size + 1 == count + 1 and size % 2):
        return None
    return np.frombuffer(data, f"<{'ui'[sign]}{bits // 8}", count).reshape(rows, cols)


def decoded_bytes(ds) -> int:
    """Bytes the pixels would take once decoded (float32 or wider), from the header alone;
    past any single-dimension limit it counts as unbounded. Missing or malformed geometry
    counts as 0 here (decoding then fails and is counted as such)."""
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        width = max(4, (int(ds.get("BitsAllocated", 16) or 16) + 7) // 8)
    except (TypeError, ValueError):
        return 0
    if max(rows, cols) > MAX_ROWS_COLUMNS or frames > MAX_FRAMES or min(rows, cols, frames) < 0:
        return MAX_DECODED_BYTES + 1
    return rows * cols * frames * samples * width


def _read_chunk(paths: list[Path], key: bytes | None) -> tuple[list[SeriesImage], Counter]:
    """Read ``paths`` in order (one worker's share); the images and the skip counts."""
    counts = ReadCounts()
    images = [image for path in paths if (image := read_file(path, counts, key)) is not None]
    return images, counts.skipped


def read_directory(dicom_dir: Path, *, key: bytes | None = None, workers: int = 1,
                   paths: list[Path] | None = None) -> tuple[list[SeriesImage], ReadCounts]:
    """Read every regular file under ``dicom_dir`` (recursively, deterministic order), with
    pseudonyms under the site's ``key``; ``paths``: only these files (the site cache
    re-reading the studies whose files changed).

    ``workers > 1``: that many processes decode, this one and ``workers - 1`` spawned ones
    (:mod:`client.data.workers`), in short runs of the sorted file list joined back in
    order, so the result is the same as with one.
    """
    paths = sorted(p for p in Path(dicom_dir).rglob("*") if p.is_file()) if paths is None \
        else sorted(paths)
    counts = ReadCounts(files=len(paths))
    if workers < 1:
        raise ValueError(f"decode workers must be >= 1, got {workers}")
    parts = chunks(paths, workers) if workers > 1 else [paths]
    done: list = [None] * len(parts)
    for i, (part, skipped) in imap_shared(partial(_read_chunk, key=key), parts, workers):
        done[i] = part
        counts.skipped.update(skipped)
    images = [image for part in done for image in part]
    counts.images = len(images)
    return images, counts
