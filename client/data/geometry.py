"""Slice geometry: order the planes of a DICOM series in space and check they form one volume.

Pure NumPy on header values only (positions, direction cosines, pixel spacing), so every check
runs before a single pixel is decoded. DICOM patient coordinates are LPS (x to the patient's
left, y to posterior, z to superior), millimetres.

Index convention of the stacked volume, ``array[k, j, i]``:

- ``i`` (X, last axis) is the column index; it advances along the *row* cosine ``r``
  (the first three ImageOrientationPatient values), by ``PixelSpacing[1]``;
- ``j`` (Y) is the row index; it advances along the *column* cosine ``c`` (the last three),
  by ``PixelSpacing[0]``;
- ``k`` (Z, first axis) is the slice index, sorted ascending along the slice normal
  ``n = r x c``, by the median gap between successive slice positions.

The 4x4 affine maps ``(k, j, i, 1)`` to LPS millimetres: columns ``n*dz, c*dy, r*dx`` and the
position (ImagePositionPatient) of the first slice, i.e. the affine is in *array axis order*,
as MONAI's MetaTensor expects for a channel-first ``[1, Z, Y, X]`` tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


class GeometryError(ValueError):
    """The planes do not form one regular volume; ``reason`` is the counted skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class GeometryTolerance:
    """How far a series may stray from a regular grid before it is skipped.

    Parameters
    ----------
    spacing : float
        Largest allowed ``|gap - median gap| / median gap`` between successive slices.
        A gap that is a whole multiple (>= 2) of the median within this tolerance counts as
        ``missing_slice``; any other deviation as ``inconsistent_spacing``.
    tilt_deg : float
        Largest allowed angle (degrees) between the slice normal and the direction in which
        slice positions advance. Beyond it the voxels are sheared (CT gantry tilt) and an
        orthogonal affine would misplace them: ``gantry_tilt``.
    orientation : float
        Largest allowed absolute difference of direction cosines within one series, and
        deviation from unit length / orthogonality of one plane's cosines.
    pixel_spacing : float
        Largest allowed relative difference of in-plane pixel spacing within one series.
    """

    spacing: float = 0.05
    tilt_deg: float = 1.0
    orientation: float = 1e-3
    pixel_spacing: float = 1e-3

    def __post_init__(self):
        if not (0 < self.spacing < 0.5):
            # at 0.5 a gap of 1.5x the median would be both "missing" and "irregular"
            raise ValueError(f"spacing tolerance must be in (0, 0.5), got {self.spacing}")
        if not (0 <= self.tilt_deg < 90) or self.orientation < 0 or self.pixel_spacing < 0:
            raise ValueError("need 0 <= tilt_deg < 90 and non-negative orientation and "
                             "pixel_spacing tolerances")


@dataclass(frozen=True)
class Plane:
    """Where one 2D image (a file, or one frame of a multi-frame file) lies in LPS space."""

    position: tuple[float, float, float]       # ImagePositionPatient: centre of pixel (0, 0)
    row: tuple[float, float, float]            # cosine along which the column index grows
    column: tuple[float, float, float]         # cosine along which the row index grows
    pixel_spacing: tuple[float, float]         # (between rows, between columns) = (dy, dx)
    shape: tuple[int, int]                     # (Rows, Columns)


@dataclass(frozen=True)
class Stack:
    """The planes of a series in slice order, with the geometry of the resulting volume."""

    order: tuple[int, ...]                     # indices into the input planes, ascending on n
    spacing: tuple[float, float, float]        # (dz, dy, dx) in mm
    affine: np.ndarray                         # [4, 4] (k, j, i, 1) -> LPS mm


def slice_normal(plane: Plane) -> np.ndarray:
    """Unit normal ``row x column`` of a plane (the direction slice index ``k`` grows)."""
    n = np.cross(np.asarray(plane.row, dtype=np.float64), np.asarray(plane.column, np.float64))
    return n / np.linalg.norm(n)


def _check_cosines(plane: Plane, tol: float) -> None:
    """Refuse cosines that are not two orthogonal unit vectors."""
    r, c = np.asarray(plane.row, np.float64), np.asarray(plane.column, np.float64)
    if not (np.all(np.isfinite(r)) and np.all(np.isfinite(c))):
        raise GeometryError("bad_orientation", "direction cosines are not finite")
    # loose bound: vendors write cosines with 5-6 decimals, so unit length holds to ~1e-5
    bound = max(tol, 1e-4) * 10
    if abs(np.linalg.norm(r) - 1) > bound or abs(np.linalg.norm(c) - 1) > bound \
            or abs(float(r @ c)) > bound:
        raise GeometryError("bad_orientation", "direction cosines are not orthonormal")


def stack_planes(planes: Sequence[Plane], tol: GeometryTolerance = GeometryTolerance()) -> Stack:
    """Order ``planes`` along their common normal and check they sample one regular grid.

    Parameters
    ----------
    planes : sequence of Plane
        All planes of one series, in any order (file order and InstanceNumber are ignored:
        both are routinely shuffled or restarted by PACS exports).
    tol : GeometryTolerance
        Tolerances of the checks.

    Returns
    -------
    Stack
        Slice order, spacing ``(dz, dy, dx)`` and the LPS affine (see module docstring).

    Raises
    ------
    GeometryError
        With ``reason`` one of ``single_slice``, ``mixed_shape``, ``bad_orientation``,
        ``mixed_orientation``, ``mixed_pixel_spacing``, ``duplicate_position``,
        ``gantry_tilt``, ``missing_slice``, ``inconsistent_spacing``.
    """
    if len(planes) < 2:
        raise GeometryError("single_slice", "a volume needs at least two slices")
    first = planes[0]
    if any(p.shape != first.shape for p in planes):
        raise GeometryError("mixed_shape", "slices differ in rows/columns")
    for plane in planes:
        _check_cosines(plane, tol.orientation)
    cosines = np.array([p.row + p.column for p in planes], dtype=np.float64)     # [N, 6]
    if np.abs(cosines - cosines[0]).max() > tol.orientation:
        # localizers (three planes in one series) and radial acquisitions land here
        raise GeometryError("mixed_orientation", "slices differ in orientation")
    ps = np.array([p.pixel_spacing for p in planes], dtype=np.float64)          # [N, 2]
    if np.any(ps <= 0) or not np.all(np.isfinite(ps)):
        raise GeometryError("bad_pixel_spacing", "pixel spacing must be positive")
    if np.abs(ps / ps[0] - 1).max() > tol.pixel_spacing:
        raise GeometryError("mixed_pixel_spacing", "slices differ in pixel spacing")

    normal = slice_normal(first)
    positions = np.array([p.position for p in planes], dtype=np.float64)        # [N, 3]
    if not np.all(np.isfinite(positions)):
        raise GeometryError("bad_position", "slice positions are not finite")
    along = positions @ normal                                                  # [N]
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])                                                # [N-1]
    median = float(np.median(gaps))
    if median <= 1e-6 or gaps.min() <= 1e-3 * median:
        # several slices at one position: multi-echo, dynamic or repeated acquisitions
        raise GeometryError("duplicate_position", "two or more slices share a position")

    travel = positions[order[-1]] - positions[order[0]]
    cos_angle = float(travel @ normal) / float(np.linalg.norm(travel))
    tilt = math.degrees(math.acos(min(1.0, max(-1.0, cos_angle))))
    if tilt > tol.tilt_deg:
        raise GeometryError("gantry_tilt", f"slices advance {tilt:.1f} deg off their normal")

    ratio = gaps / median
    whole = np.rint(ratio)
    if np.any(np.abs(ratio - whole) > tol.spacing) or np.any(whole < 1):
        raise GeometryError("inconsistent_spacing", "slice gaps vary beyond the tolerance")
    if np.any(whole >= 2):
        raise GeometryError("missing_slice", f"{int((whole - 1).sum())} slice(s) missing")

    dy, dx = (float(v) for v in ps[0])
    affine = np.eye(4)
    affine[:3, 0] = normal * median
    affine[:3, 1] = np.asarray(first.column, np.float64) * dy
    affine[:3, 2] = np.asarray(first.row, np.float64) * dx
    affine[:3, 3] = positions[order[0]]
    return Stack(tuple(int(i) for i in order), (median, dy, dx), affine)
