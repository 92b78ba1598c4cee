"""Put a :class:`~client.data.volume.Volume` on a model's grid: one orientation, one spacing,
one size, with MONAI transforms acting on a MetaTensor built from the volume's affine."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, ResizeWithPadOrCrop, Spacing

from protocol.layout import MAX_GRID_AXIS

from .frames import SeriesSkip, VolumeLimits
from .volume import Volume

# DICOM patient space is LPS; MONAI (like nibabel) reads affines as RAS. Flipping x and y is
# the whole conversion.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def to_meta_tensor(volume: Volume) -> MetaTensor:
    """``[1, Z, Y, X]`` float32 MetaTensor whose affine is the volume's, converted to RAS."""
    affine = torch.as_tensor(LPS_TO_RAS @ volume.affine, dtype=torch.float64)
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(volume.array))[None], affine=affine,
                      meta={"space": "RAS"})


def to_grid(volume: Volume, spacing: Sequence[float], size: Sequence[int], axcodes: str = "RAS",
            *, mode: str = "bilinear", pad_value: float | None = None) -> MetaTensor:
    """Reorient, resample and pad/crop a volume onto a fixed grid.

    Parameters
    ----------
    volume : Volume
        A volume from :func:`client.data.volume.assemble_volumes`.
    spacing : sequence of 3 floats
        Output voxel size in mm, in the order of the output axes (given by ``axcodes``).
    size : sequence of 3 ints
        Output shape, in the same order; the resampled volume is centred and padded or
        cropped to it, so the spacing is kept exactly.
    axcodes : str
        Nibabel/MONAI orientation codes of the output axes, each naming the direction in
        which the index grows: ``"RAS"`` runs axis 0 towards the patient's right, axis 1
        towards anterior, axis 2 towards superior. An oblique volume keeps its rotation;
        each axis goes to the closest code.
    mode : str
        Interpolation (``"bilinear"``, ``"nearest"`` for label maps).
    pad_value : float, optional
        Value of padded voxels. Default: the volume's minimum, i.e. the background (air in
        CT, about 0 in MR); padding with 0 would paint water into a CT.

    Returns
    -------
    MetaTensor
        ``[1, *size]`` float32, its ``affine`` the RAS affine of the output grid.
    """
    if len(spacing) != 3 or not all(float(s) > 0 for s in spacing):
        raise ValueError(f"spacing must be three positive mm values, got {tuple(spacing)}")
    if len(size) != 3 or not all(int(n) == n and n >= 1 for n in size):
        raise ValueError(f"size must be three positive integers, got {tuple(size)}")
    if len(axcodes) != 3:
        raise ValueError(f"axcodes must name three axes (e.g. 'RAS'), got {axcodes!r}")
    if pad_value is None:
        pad_value = float(volume.array.min())
    image = to_meta_tensor(volume)
    image = Orientation(axcodes=axcodes, labels=None)(image)   # labels from meta "space"
    _check_resampled(image, spacing)
    image = Spacing(pixdim=tuple(float(s) for s in spacing), mode=mode,
                    padding_mode="border")(image)
    image = ResizeWithPadOrCrop(spatial_size=tuple(int(n) for n in size), mode="constant",
                                value=pad_value)(image)
    return image.to(torch.float32)


def _check_resampled(image: MetaTensor, spacing: Sequence[float],
                     limits: VolumeLimits = VolumeLimits()) -> None:
    """Refuse a resampling whose intermediate volume (before the pad/crop to ``size``) would be
    over the readers' caps: a fine ``spacing`` from the coordinator on a large field of view
    would otherwise allocate without bound. Raises ``SeriesSkip("grid_too_large")``."""
    extent = np.asarray(image.shape[1:], dtype=np.float64) * np.asarray(image.pixdim[:3])
    shape = np.ceil(extent / np.asarray(spacing, dtype=np.float64))
    if shape.max() > max(MAX_GRID_AXIS, limits.max_slices) or \
            float(np.prod(shape)) * 4 > limits.max_bytes:
        raise SeriesSkip("grid_too_large")
