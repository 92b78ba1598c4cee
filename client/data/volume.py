"""True 3D volumes from DICOM series: headers first, pixels only for series that pass.

A series (SeriesInstanceUID) is a set of 2D planes: one per single-frame file, or one per frame
of an enhanced multi-frame file (PerFrame/SharedFunctionalGroupsSequence). Every check that can
refuse a series — size limits, orientation, spacing, tilt, missing slices — runs on headers read
with ``stop_before_pixels``; pixel data of a refused series is never decoded. Each refusal is
counted under a reason, never silently dropped.

Nothing identifying leaves this module: a :class:`Volume` carries keyed pseudonyms of the study,
patient and series, and neither it, the counts, the logs nor the exceptions name a file, a UID
or a patient. The voxel convention and the affine are those of :mod:`client.data.geometry`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .dicom import pseudonym, values_unvalidated
from .frames import SeriesSkip, VolumeLimits, decode_frames, frames_of
from .geometry import GeometryError, GeometryTolerance, stack_planes

__all__ = ["VOLUME_SOP_CLASSES", "Volume", "VolumeCounts", "VolumeLimits", "assemble_volumes",
           "read_volume_directory", "read_volumes"]

log = logging.getLogger(__name__)

# SOP classes that hold cross-sectional slices (projection X-ray and ultrasound do not).
VOLUME_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.2",        # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",      # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",      # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",        # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",      # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",      # Legacy Converted Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.128",      # PET Image Storage
    "1.2.840.10008.5.1.4.1.1.130",      # Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.128.1",    # Legacy Converted Enhanced PET Image Storage
})

Select = Callable[[Dataset], "str | None"]
"""A layout's series classifier: header of a series' first file -> label, or None to skip."""


@dataclass
class Volume:
    """One series as a 3D array of physical values (modality LUT applied); no PHI.

    ``array[k, j, i]`` is ``[Z, Y, X]``: slices ascending along the slice normal, rows, columns
    (see :mod:`client.data.geometry`); ``affine`` maps ``(k, j, i, 1)`` to LPS millimetres.
    """

    array: np.ndarray                        # [Z, Y, X] float32
    spacing: tuple[float, float, float]      # (dz, dy, dx) mm
    affine: np.ndarray                       # [4, 4] float64, LPS
    modality: str                            # CT, MR, PT
    label: str                               # what the layout's ``select`` called the series
    study_key: str
    patient_key: str
    series_key: str


@dataclass
class VolumeCounts:
    """What was read and skipped; counts only, safe to log and report.

    ``files_skipped`` counts files that could not join any series (``not_dicom``,
    ``unreadable``, ``missing_uid``); ``skipped`` counts whole series by reason:
    ``not_selected`` (the layout's ``select``), ``not_volumetric`` (SOP class), ``too_large``,
    ``not_monochrome``, ``bad_header`` (absent or malformed value), ``missing_geometry``,
    ``pixel_decode_error``, and the geometry reasons of
    :func:`client.data.geometry.stack_planes` (``single_slice``, ``mixed_orientation``,
    ``duplicate_position``, ``gantry_tilt``, ``missing_slice``, ``inconsistent_spacing`` ...).
    """

    files: int = 0
    series: int = 0
    volumes: int = 0
    files_skipped: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return {k: dict(v) if isinstance(v, Counter) else v for k, v in self.__dict__.items()}


def _series_volume(headers: Sequence[Dataset], members: list[int], load: Callable[[int], Dataset],
                   limits: VolumeLimits, tol: GeometryTolerance, label: str,
                   key: bytes | None = None) -> Volume:
    """Check one series on its headers, then decode it; raises ``SeriesSkip``."""
    first = headers[members[0]]
    if any(str(headers[i].get("SOPClassUID", "")) not in VOLUME_SOP_CLASSES for i in members):
        raise SeriesSkip("not_volumetric")
    frames = [fr for i in members for fr in frames_of(headers[i], i, limits)]
    if len(frames) > limits.max_slices:
        raise SeriesSkip("too_large")
    rows, cols = frames[0].plane.shape
    if len(frames) * rows * cols * 4 > limits.max_bytes:
        raise SeriesSkip("too_large")
    try:
        stack = stack_planes([fr.plane for fr in frames], tol)
    except GeometryError as err:
        raise SeriesSkip(err.reason) from None
    slot = {k: z for z, k in enumerate(stack.order)}                # plane -> slice index
    array = np.empty((len(frames), rows, cols), dtype=np.float32)    # [Z, Y, X]
    for i in members:
        mine = [k for k, fr in enumerate(frames) if fr.header == i]
        full = load(i)
        for k, plane in zip(mine, decode_frames(full, [frames[k] for k in mine])):
            array[slot[k]] = plane
        del full                              # one file's pixels in memory at a time
    if not np.all(np.isfinite(array)):
        raise SeriesSkip("pixel_decode_error")
    study_uid = str(first.get("StudyInstanceUID", ""))
    return Volume(array=array, spacing=stack.spacing, affine=stack.affine,
                  modality=str(first.get("Modality", "")), label=label,
                  study_key=pseudonym("study", study_uid, key),
                  patient_key=pseudonym("patient", str(first.get("PatientID", "")) or study_uid,
                                        key),
                  series_key=pseudonym("series", str(first.SeriesInstanceUID), key))


def assemble_volumes(headers: Sequence[Dataset], load: Callable[[int], Dataset] | None = None, *,
                     limits: VolumeLimits = VolumeLimits(),
                     tolerance: GeometryTolerance = GeometryTolerance(),
                     select: Select | None = None,
                     counts: VolumeCounts | None = None,
                     key: bytes | None = None) -> tuple[list[Volume], VolumeCounts]:
    """Group headers into series and turn each series that passes every check into a Volume.
    Call it inside :func:`~client.data.dicom.values_unvalidated` (as :func:`read_volumes`
    does): it converts the headers' elements, and pydicom may log a value it converts.

    Parameters
    ----------
    headers : sequence of pydicom Dataset
        One header per file, typically read with ``stop_before_pixels=True``.
    load : callable, optional
        ``load(i)`` returns file ``i`` with its pixel data; called only for series that passed
        every header check. Default: ``headers[i]`` itself (datasets already hold pixels).
    limits, tolerance
        Size caps and geometry tolerances.
    select : callable, optional
        The layout's classifier, called with the first header of a series before any check;
        ``None`` from it skips the series as ``not_selected``. Default: keep every series.
    counts : VolumeCounts, optional
        Counts to add to (e.g. those of a directory walk); a new one by default.
    key : bytes, optional
        The site's pseudonym secret (:mod:`client.data.pseudonyms`); None in simulation.

    Returns
    -------
    volumes, counts
        Volumes in a deterministic order (by series pseudonym) and the counts by reason.
    """
    counts = counts if counts is not None else VolumeCounts()
    load = load if load is not None else headers.__getitem__
    series: dict[str, list[int]] = {}
    for i, ds in enumerate(headers):
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            counts.files_skipped["missing_uid"] += 1
            continue
        series.setdefault(uid, []).append(i)
    volumes = []
    for uid, members in sorted(series.items(), key=lambda kv: pseudonym("series", kv[0], key)):
        counts.series += 1
        try:
            label = select(headers[members[0]]) if select is not None else ""
            if label is None:
                raise SeriesSkip("not_selected")
            volumes.append(_series_volume(headers, members, load, limits, tolerance, label,
                                          key))
        except SeriesSkip as skip:
            counts.skipped[skip.reason] += 1
            log.debug("series skipped: %s", skip.reason)
            continue
        counts.volumes += 1
    return volumes, counts


@values_unvalidated()       # no header value (or path) in a log: reads and accesses inside
def read_volumes(paths: Sequence[Path], **options) -> tuple[list[Volume], VolumeCounts]:
    """Read the files at ``paths`` as volumes: headers first, pixels only for passing series.
    Read in :func:`~client.data.dicom.values_unvalidated` (nothing of a header in a log).

    ``options`` are the keyword arguments of :func:`assemble_volumes` (limits, tolerance,
    select, key). Unreadable and non-DICOM files are counted in ``files_skipped``.
    """
    counts = VolumeCounts()
    headers, kept = [], []
    for path in paths:
        counts.files += 1
        try:
            headers.append(pydicom.dcmread(path, stop_before_pixels=True))
        except InvalidDicomError:
            counts.files_skipped["not_dicom"] += 1
            continue
        except Exception:  # noqa: BLE001 - a corrupt file must never stop a site
            counts.files_skipped["unreadable"] += 1
            continue
        kept.append(path)

    def load(i: int) -> Dataset:
        try:
            return pydicom.dcmread(kept[i])
        except Exception:  # noqa: BLE001 - changed or truncated since its header was read
            raise SeriesSkip("pixel_decode_error") from None

    return assemble_volumes(headers, load, counts=counts, **options)


def read_volume_directory(dicom_dir: Path, **options) -> tuple[list[Volume], VolumeCounts]:
    """:func:`read_volumes` over every regular file under ``dicom_dir`` (sorted, recursive)."""
    return read_volumes(sorted(p for p in Path(dicom_dir).rglob("*") if p.is_file()), **options)
