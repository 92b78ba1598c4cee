"""Reading a site's NIfTI lesion masks (``segmentations.csv``) quickly.

``nibabel.load(path).dataobj`` costs about 1-1.5 ms a file here (an image class, an opener,
a header check and an array proxy per file), against ~0.03 ms to read and gunzip the bytes
of a 64x64 mask: on a site's first ingest that was ~7% of the time. A mask file is almost
always the plain case - a single-file NIfTI-1 (``n+1``), unscaled - so that case is read
here: nibabel's own header class parses the header (endianness, data type, shape, data
offset, scaling), and the voxels are the bytes after the offset in Fortran order, as
nibabel's array proxy reads them. Everything else (NIfTI-2, a header/image pair, scaled
data, a file shorter than its header says) goes through ``nibabel.load`` unchanged, so the
result is nibabel's in every case.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

NIFTI1_HEADER = 348             # bytes of a NIfTI-1 header (sizeof_hdr)
SINGLE_FILE = b"n+1"            # magic of a single-file NIfTI-1 (header, then voxels)
UNSCALED = ((None, None), (1.0, 0.0))     # nibabel's get_slope_inter() without scaling


def read_nifti(path: Path) -> np.ndarray:
    """The voxels of a NIfTI file as nibabel's ``np.asarray(nib.load(path).dataobj)`` gives
    them (same dtype, shape and values); the plain case read without nibabel's per-file
    overhead. Raises what nibabel raises on a file it cannot read."""
    import nibabel as nib

    data = _plain_nifti1(path, nib)
    if data is None:
        data = np.asarray(nib.load(path).dataobj)
    return data


def _plain_nifti1(path: Path, nib) -> np.ndarray | None:
    """The voxels of an unscaled single-file NIfTI-1 (``.nii`` or ``.nii.gz``), read-only;
    None for any other file (it goes through ``nibabel.load``)."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    try:
        with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read(NIFTI1_HEADER)
            if len(raw) < NIFTI1_HEADER:
                return None
            header = _header(raw, nib)
            if header is None:
                return None
            shape, dtype, offset = header
            count = int(np.prod(shape, dtype=np.int64))
            if any(int(d) < 0 for d in shape) or offset < NIFTI1_HEADER:
                return None             # nibabel refuses it (negative count): it says why
            # what the header announces and no more (a long tail or a gzip bomb is not read)
            raw += f.read(offset + count * dtype.itemsize - NIFTI1_HEADER)
    except (OSError, EOFError, gzip.BadGzipFile, ValueError):
        return None                     # nibabel says what is wrong with it
    if offset + count * dtype.itemsize > len(raw):
        return None
    return np.frombuffer(raw, dtype, count=count, offset=offset).reshape(shape, order="F")


def _header(raw: bytes, nib) -> tuple[tuple, np.dtype, int] | None:
    """``(shape, dtype, data offset)`` of an unscaled single-file NIfTI-1 header, or None."""
    try:
        header = nib.Nifti1Header(raw[:NIFTI1_HEADER], check=False)
        magic = bytes(header["magic"]).rstrip(b"\0")
        if int(header["sizeof_hdr"]) != NIFTI1_HEADER or magic != SINGLE_FILE \
                or header.get_slope_inter() not in UNSCALED:
            return None
        return header.get_data_shape(), header.get_data_dtype(), int(header.get_data_offset())
    except Exception:  # noqa: BLE001 - an odd header: nibabel decides
        return None
