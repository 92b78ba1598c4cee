"""A research export read through a manifest: NIfTI or NRRD files listed per study and channel.

Layout of such a site directory (the rest - labels, reports, splits - as for DICOM sites,
:mod:`client.data.site`, with the manifest's study id in the ``study_instance_uid`` column)::

    SITE/manifest.csv    study_id,channel,file[,patient_id]   (file: relative to SITE)
    SITE/labels.csv      study_instance_uid,label

``channel`` names a channel of the job's layout (brain_mri_4seq: T1, T1ce, T2, FLAIR).
Files are NIfTI (``.nii``/``.nii.gz``, read with nibabel): voxel ``[i, j, k]`` with an
affine to RAS millimetres; or NRRD (``.nrrd``, read with pynrrd): voxel ``[i, j, k]`` with
``space directions`` and ``space origin`` in a ``space`` of ``left-posterior-superior`` (3D
Slicer's default, taken to RAS) or ``right-anterior-superior``; another space, no directions,
or voxels in a detached ``data file`` (a path the site would have to follow) are skipped as
``unsupported_space``. Both formats' claimed sizes are checked against the DICOM readers'
caps (``VolumeLimits``) before any voxel is read. They become the DICOM readers' convention - ``[Z, Y, X]`` with
an LPS affine (:class:`client.data.volume.Volume`) - and then what the layout asks:
a 3D layout puts each on its grid (:mod:`client.data.grid`, the same code as a DICOM
series) and applies its ``ct_window``/``zscore``; a 2D layout takes the middle slice
``[Y, X]`` through the same intensity; brain_mri_4seq keeps the volume's values (the
dataset takes the middle slice and z-scores, as for DICOM). ``xray``/``us_grey``
intensities need DICOM headers (photometric, VOI LUT): refused up front.

De-identification as for DICOM: study and patient ids become keyed pseudonyms here; no id,
path or file name leaves this module, in data, counts or errors (rows are named by number).
The whole manifest is checked before any image is read: a file outside the site directory
(``..``, an absolute path, a symlink out), a channel the layout lacks, a missing column or
an unsupported format is one error naming the row.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np

from .frames import VolumeLimits
from .layout import Layout
from .pseudonyms import pseudonym
from .sequences import SEQUENCES
from .site import IngestReport, SiteDataError, Study
from .workers import chunks, map_shared

MANIFEST = "manifest.csv"
COLUMNS = ("study_id", "channel", "file")
FORMATS = (".nii", ".nii.gz", ".nrrd")
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# (k, j, i, 1) -> (i, j, k, 1): the DICOM readers' [Z, Y, X] index order to NIfTI's.
KJI_TO_IJK = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


def has_manifest(site_dir: Path) -> bool:
    return (Path(site_dir) / MANIFEST).is_file()


def manifest_rows(site_dir: Path, layout: Layout | None) -> list[tuple[str, str, str, Path]]:
    """``(study_id, patient_id, channel, resolved file)`` per row, every row checked.

    Raises
    ------
    SiteDataError
        Missing columns, an empty id, an unknown channel, a file outside the site, missing
        or of an unsupported format, a layout intensity that needs DICOM headers.
    """
    site_dir = Path(site_dir).resolve()
    channels = SEQUENCES if layout is None else layout.channel_names
    if layout is not None:
        needs_dicom = [c.name for c in layout.channels if c.intensity.kind in ("xray", "us_grey")]
        if needs_dicom:
            raise SiteDataError(f"{MANIFEST}: layout {layout.name!r} channels "
                                f"{', '.join(needs_dicom)} use an intensity that needs DICOM "
                                "headers (xray/us_grey); a NIfTI manifest supports ct_window "
                                "and zscore")
    with open(site_dir / MANIFEST, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not set(COLUMNS) <= set(reader.fieldnames):
            raise SiteDataError(f"{MANIFEST} must have columns {','.join(COLUMNS)}"
                                "[,patient_id]")
        rows = list(reader)
    out = []
    for n, row in enumerate(rows, start=2):              # line numbers, header is line 1
        study, channel = (row["study_id"] or "").strip(), (row["channel"] or "").strip()
        name = (row["file"] or "").strip()
        if not study or not name:
            raise SiteDataError(f"{MANIFEST} line {n}: empty study_id or file")
        if channel not in channels:
            # the cell is not echoed: a manifest cell may hold anything, a name included
            raise SiteDataError(f"{MANIFEST} line {n}: the channel is not one of the "
                                f"layout's ({', '.join(channels)})")
        path = (site_dir / name).resolve()               # symlinks followed, then checked
        if site_dir not in path.parents:
            raise SiteDataError(f"{MANIFEST} line {n}: the file is outside the site directory")
        if not name.lower().endswith(FORMATS):
            raise SiteDataError(f"{MANIFEST} line {n}: unsupported format; expected "
                                f"{' or '.join(FORMATS)}")
        if not path.is_file():
            raise SiteDataError(f"{MANIFEST} line {n}: the file does not exist")
        patient = (row.get("patient_id") or "").strip() or study
        out.append((study, patient, channel, path))
    if not out:
        raise SiteDataError(f"{MANIFEST} lists no files")
    return out


def decode_manifest_site(site_dir: Path, layout: Layout | None, *, key: bytes | None = None,
                         workers: int = 1) -> tuple[list[Study], IngestReport]:
    """Studies of a manifest site (images only, as the DICOM readers' decode halves), with
    counted skips: ``unreadable`` (nibabel or pynrrd failed), ``unsupported_space`` (an NRRD
    file with no usable space), ``too_large`` (a header over the DICOM readers' caps, never
    decoded), ``not_finite``, ``duplicate_channel``, ``grid_too_large``,
    ``resample_error`` and ``study_missing_channel`` (a layout's required channel, or any
    under ``missing: skip_study``). ``workers > 1`` reads the files in that many spawned
    processes (as the DICOM readers do); the result is the same as with one."""
    if workers < 1:
        raise ValueError(f"decode workers must be >= 1, got {workers}")
    rows = manifest_rows(site_dir, layout)
    report = IngestReport(files=len(rows))
    by_study: dict[str, dict] = {}
    # Every row is read (in parallel), then taken in manifest order: a row whose channel an
    # earlier row of the study already gave is a duplicate (its read is dropped uncounted),
    # one after an earlier unreadable row is used - as a one-by-one read would.
    reads = _read_files([(channel, path) for *_, channel, path in rows], layout, workers)
    for (study_id, patient_id, channel, _), (planes, skipped) in zip(rows, reads):
        key_ = pseudonym("study", study_id, key)
        entry = by_study.setdefault(key_, {"patient": pseudonym("patient", patient_id, key),
                                           "images": {}})
        if channel in entry["images"]:
            report.skipped["duplicate_channel"] += 1
            continue
        report.skipped.update(skipped)
        if planes is None:
            continue
        report.images += 1
        entry["images"][channel] = planes
    studies = []
    for study_key, entry in sorted(by_study.items()):
        images = _input_images(entry["images"], layout)
        if images is None:
            report.skipped["study_missing_channel"] += 1
            continue
        studies.append(Study(study_key, entry["patient"], images))
    if not studies:
        raise SiteDataError(f"no usable studies in the {MANIFEST} site: {len(rows)} files, "
                            f"skipped {dict(report.skipped)}")
    return studies, report


FileRead = tuple["np.ndarray | None", Counter]      # planes (None: skipped), skip counts


def _read_files(files: list[tuple[str, Path]], layout: Layout | None,
                workers: int) -> list[FileRead]:
    """Each ``(channel, file)`` read as :func:`_read` does, in order; in ``workers`` processes
    (this one among them: :mod:`client.data.workers`), short runs joined back in order."""
    if workers == 1:
        return _read_chunk(files, layout)
    parts = map_shared(partial(_read_chunk, layout=layout), chunks(files, workers, most=8),
                       workers)
    return [read for part in parts for read in part]


def _read_chunk(files: list[tuple[str, Path]], layout: Layout | None) -> list[FileRead]:
    """One worker's share of :func:`_read_files`."""
    out = []
    for channel, path in files:
        skipped: Counter = Counter()
        out.append((_read(path, channel, layout, skipped), skipped))
    return out


def _read(path: Path, channel: str, layout: Layout | None,
          skipped: Counter) -> np.ndarray | None:
    """One file as the layout wants it, or None (counted): see the module doc."""
    try:
        data, affine = _load(path)
    except _UnsupportedSpace:
        skipped["unsupported_space"] += 1
        return None
    except _TooLarge:
        skipped["too_large"] += 1
        return None
    except Exception:  # noqa: BLE001 - a corrupt file is counted, never fatal
        skipped["unreadable"] += 1
        return None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3 or not np.isfinite(data).all():
        skipped["not_finite" if data.ndim == 3 else "unreadable"] += 1
        return None
    array = np.ascontiguousarray(data.transpose(2, 1, 0))          # [Z, Y, X]
    if layout is None:
        return array[0] if array.shape[0] == 1 else array
    spec = next(c for c in layout.channels if c.name == channel)
    from .intensity import volume_intensity
    if layout.dims != "3d":
        return volume_intensity(spec.intensity, array[array.shape[0] // 2])   # [C, Y, X]
    from .volume import Volume
    from .volume_site import grid_planes

    lps = RAS_TO_LPS @ affine @ KJI_TO_IJK                  # (k, j, i, 1) -> LPS mm
    spacing = tuple(float(np.linalg.norm(lps[:3, a])) for a in range(3))
    volume = Volume(array, spacing, lps, "", channel, "", "", "")
    return grid_planes(volume, layout, spec, skipped)


class _UnsupportedSpace(ValueError):
    """An NRRD file whose voxels cannot be placed in patient space."""


class _TooLarge(ValueError):
    """A header claiming more voxels than the site decodes (checked before decoding)."""


def _check_size(shape, limits: VolumeLimits = VolumeLimits()) -> None:
    """The DICOM readers' caps on a header's claimed size, before any voxel is read: each
    axis at most the largest plane/slice count, the float32 volume at most ``max_bytes``."""
    dims = [int(d) for d in shape]
    largest = max(limits.max_rows, limits.max_columns, limits.max_slices)
    if any(d < 0 or d > largest for d in dims) or 4 * math.prod(dims) > limits.max_bytes:
        raise _TooLarge(str(dims))


# NRRD ``space`` -> the matrix taking its coordinates to RAS
_NRRD_SPACES = {"left-posterior-superior": RAS_TO_LPS, "right-anterior-superior": np.eye(4)}


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data [i, j, k] float32, affine (i, j, k, 1) -> RAS mm)`` of a NIfTI or NRRD file."""
    if path.name.lower().endswith(".nrrd"):
        import nrrd

        # the header first: a file that cannot be placed is not decoded at all
        header = nrrd.read_header(str(path))
        if "data file" in header or "datafile" in header:
            # detached voxels: a path written by whoever wrote the export, perhaps outside
            # the site directory - never followed
            raise _UnsupportedSpace("detached data file")
        space = str(header.get("space", "")).lower()
        directions = np.asarray(header.get("space directions", []), dtype=float)
        if space not in _NRRD_SPACES or directions.shape != (3, 3) \
                or not np.isfinite(directions).all():
            raise _UnsupportedSpace(space)
        _check_size(header.get("sizes", []))
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
        affine = np.eye(4)
        affine[:3, :3] = directions.T              # row a of "space directions": axis a
        affine[:3, 3] = origin
        data, _ = nrrd.read(str(path), index_order="F")         # [i, j, k]
        return np.asarray(data, dtype=np.float32), _NRRD_SPACES[space] @ affine
    import nibabel as nib

    image = nib.load(path)                                 # the header; voxels on demand
    _check_size(image.shape)
    return np.asarray(image.dataobj, dtype=np.float32), np.asarray(image.affine, dtype=float)


def _input_images(channels: dict[str, np.ndarray], layout: Layout | None
                  ) -> dict[str, np.ndarray] | None:
    """A study's images keyed by the model's input names, or None if the layout drops it."""
    if layout is None:
        return channels or None
    from .layout_site import _input_names

    images = {}
    for channel in layout.channels:
        if channel.name in channels:
            images.update(zip(_input_names(channel), channels[channel.name]))
    got = {c.name for c in layout.channels if c.name in channels}
    required = {c.name for c in layout.channels if c.required}
    if not got or required - got or (layout.missing == "skip_study"
                                     and got != set(layout.channel_names)):
        return None
    return images
