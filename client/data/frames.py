"""One DICOM file as the planes it holds: geometry and rescale per frame, read from headers.

A single-frame file is one plane; an enhanced multi-frame file is one plane per frame, placed
by its Per-frame / Shared Functional Groups (Plane Position, Plane Orientation, Pixel Measures,
Pixel Value Transformation). Size caps are checked here, on header values, so a hostile header
is refused before its pixel data is read, let alone decoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from .geometry import Plane


@dataclass(frozen=True)
class VolumeLimits:
    """Caps checked on header values before any pixel is decoded (a hostile or corrupt header
    can claim gigabytes); a series over any of them is skipped as ``too_large``."""

    max_rows: int = 4096
    max_columns: int = 4096
    max_slices: int = 4096                  # planes in one series (files or frames)
    max_bytes: int = 2 * 1024**3            # stored bytes of a file, float32 bytes of a volume

    def __post_init__(self):
        if min(self.max_rows, self.max_columns, self.max_slices, self.max_bytes) < 1:
            raise ValueError("volume limits must be positive")


class SeriesSkip(Exception):
    """A series is refused; ``reason`` is the counted skip reason (never an identifier)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Frame:
    """One plane of a series: which header (and frame in it) and how to rescale it."""

    header: int
    frame: int | None                        # None for a single-frame file
    plane: Plane
    slope: float
    intercept: float


def _floats(value, n: int) -> tuple[float, ...]:
    """``n`` finite floats from a DS/FD value, or skip the series as ``bad_header``."""
    try:
        out = tuple(float(v) for v in (value if n > 1 else [value]))
    except (TypeError, ValueError):
        raise SeriesSkip("bad_header") from None
    if len(out) != n or not all(np.isfinite(out)):
        raise SeriesSkip("bad_header")
    return out


def _scalar(value, default: float) -> float:
    """A rescale value, ``default`` when absent or empty."""
    return default if value is None or value == "" else _floats(value, 1)[0]


def _group_value(items: Sequence[Dataset | None], sequence: str, keyword: str):
    """First value of ``keyword`` inside functional group ``sequence`` of the given items
    (per-frame item first, then shared), or None."""
    for item in items:
        if item is not None and sequence in item and len(item[sequence].value) > 0:
            inner = item[sequence].value[0]
            if keyword in inner and inner[keyword].value is not None:
                return inner[keyword].value
    return None


def _int(ds: Dataset, keyword: str, default: int) -> int:
    """An integer header value; a malformed one skips the series as ``bad_header`` (so does
    an absent Rows/Columns, which the caller sees as 0)."""
    value = ds.get(keyword, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        raise SeriesSkip("bad_header") from None


def _plane(position, orientation, spacing, shape: tuple[int, int]) -> Plane:
    """A Plane from raw header values; absent geometry skips the series."""
    if position is None or orientation is None or spacing is None:
        raise SeriesSkip("missing_geometry")
    cosines = _floats(orientation, 6)
    return Plane(_floats(position, 3), cosines[:3], cosines[3:], _floats(spacing, 2), shape)


def frames_of(ds: Dataset, index: int, limits: VolumeLimits) -> list[Frame]:
    """The planes of one header (``index`` in its series), after the size caps.

    Parameters
    ----------
    ds : pydicom Dataset
        A header; pixel data is neither needed nor touched.
    index : int
        Position of this header in the caller's list, recorded in each Frame.
    limits : VolumeLimits
        Rows/Columns/NumberOfFrames and stored-byte caps.

    Returns
    -------
    list of Frame
        One per single-frame file, NumberOfFrames for an enhanced file.

    Raises
    ------
    SeriesSkip
        ``too_large``, ``bad_header``, ``not_monochrome`` or ``missing_geometry``.
    """
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    n_frames = _int(ds, "NumberOfFrames", 1)
    bits, samples = _int(ds, "BitsAllocated", 16), _int(ds, "SamplesPerPixel", 1)
    if min(rows, cols, n_frames, bits) < 1:
        raise SeriesSkip("bad_header")
    if rows > limits.max_rows or cols > limits.max_columns or n_frames > limits.max_slices \
            or rows * cols * n_frames * samples * ((bits + 7) // 8) > limits.max_bytes:
        raise SeriesSkip("too_large")
    if samples != 1:
        raise SeriesSkip("not_monochrome")
    shape = (rows, cols)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if n_frames == 1 and per_frame is None:
        plane = _plane(ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                       ds.get("PixelSpacing"), shape)
        return [Frame(index, None, plane, _scalar(ds.get("RescaleSlope"), 1.0),
                       _scalar(ds.get("RescaleIntercept"), 0.0))]
    if per_frame is None or len(per_frame) != n_frames:
        # legacy multi-frame without per-frame positions: no way to place the frames
        raise SeriesSkip("missing_geometry")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    frames = []
    for f, item in enumerate(per_frame):
        groups = (item, shared)
        plane = _plane(_group_value(groups, "PlanePositionSequence", "ImagePositionPatient"),
                       _group_value(groups, "PlaneOrientationSequence", "ImageOrientationPatient"),
                       _group_value(groups, "PixelMeasuresSequence", "PixelSpacing"), shape)
        slope = _group_value(groups, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept")
        frames.append(Frame(index, f, plane, _scalar(slope, 1.0), _scalar(intercept, 0.0)))
    return frames


def decode_frames(ds: Dataset, frames: list[Frame]) -> list[np.ndarray]:
    """Physical-value planes for ``frames`` (all from one file), with their rescale applied.

    Parameters
    ----------
    ds : pydicom Dataset
        The file read with its pixel data.
    frames : list of Frame
        What :func:`frames_of` returned for the header of the same file.

    Returns
    -------
    list of ndarray
        ``[Y, X]`` float32 per frame, in the order of ``frames``.

    Raises
    ------
    SeriesSkip
        ``pixel_decode_error`` when decoding fails or the pixels disagree with the header.
    """
    try:
        pixels = ds.pixel_array
    except Exception:  # noqa: BLE001 - truncated data, missing codec, bad VR
        raise SeriesSkip("pixel_decode_error") from None
    rows, cols = frames[0].plane.shape
    stacked = frames[0].frame is not None
    if stacked and pixels.ndim == 2:
        pixels = pixels[None]                 # pydicom drops the frame axis of a 1-frame file
    if pixels.shape != ((_int(ds, "NumberOfFrames", 1),) if stacked else ()) + (rows, cols):
        raise SeriesSkip("pixel_decode_error")
    out = []
    for fr in frames:
        stored = pixels[fr.frame] if stacked else pixels
        if not stacked and "ModalityLUTSequence" in ds:
            value = apply_modality_lut(stored, ds).astype(np.float64)
        else:
            # float64 so stored * slope + intercept is exact before the one rounding to float32
            value = stored.astype(np.float64) * fr.slope + fr.intercept
        out.append(value.astype(np.float32))
    return out
