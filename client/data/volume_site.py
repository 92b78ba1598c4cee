"""One channel of a study through a 3D layout: its matched series as a true volume, on the
layout's grid, through the channel's intensity.

The series (chosen by :mod:`client.data.matching` from headers) is read by
:func:`client.data.volume.read_volumes`: slices ordered by ImagePositionPatient on the slice
normal, spacing/tilt/missing-slice checks, enhanced multi-frame through functional groups, each
refusal counted under its reason. The volume's physical values (HU for CT) are then put on the
layout's grid by :func:`client.data.grid.to_grid` — one orientation (:data:`GRID_AXCODES`), the
layout's ``spacing`` and ``size`` — and only then windowed (:func:`volume_intensity`), so
interpolation mixes Hounsfield units, not clipped window values.

Grid convention: the layout's ``size``/``spacing`` are ``[Z, Y, X]``; the output axes run
towards the patient's superior, posterior and left (``"SPL"``), which is how an axial DICOM
series is stored (slices foot to head, rows front to back, columns right to left). An axial
series needs no flip; any other orientation is brought to it; an oblique one keeps its small
rotation (each axis goes to the closest code).

Only the pseudonymous patient key of :class:`~client.data.volume.Volume` leaves this module.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from protocol.layout import VOLUME_AXCODES

from .frames import SeriesSkip
from .grid import to_grid
from .intensity import volume_intensity
from .layout import Channel, Layout
from .volume import read_volumes

GRID_AXCODES = VOLUME_AXCODES     # [Z, Y, X]: superior, posterior, left (protocol.layout)
def read_volume_channel(channel: Channel, files: tuple[Path, ...], layout: Layout,
                        skipped: Counter, key: bytes | None = None,
                        ) -> tuple[np.ndarray, str] | None:
    """``([C, Z, Y, X] float32 on the layout's grid, patient key)`` of one series, or None.

    ``skipped`` (a Counter) receives every reason the series or one of its files was refused
    (:class:`~client.data.volume.VolumeCounts`), and ``resample_error`` if the grid failed.
    ``key``: the site's pseudonym secret (None in simulation).
    """
    volumes, counts = read_volumes(files, key=key)   # the matcher selected the series
    skipped.update(counts.files_skipped)
    skipped.update(counts.skipped)
    if len(volumes) != 1:                 # 0: refused and counted above
        if len(volumes) > 1:
            skipped["series_split"] += 1
        return None
    volume = volumes[0]
    planes = grid_planes(volume, layout, channel, skipped)
    return None if planes is None else (planes, volume.patient_key)


def grid_planes(volume, layout: Layout, channel: Channel, skipped: Counter
                ) -> np.ndarray | None:
    """``volume`` on the layout's grid through the channel's intensity (one plane stack per
    window), or None counted as ``resample_error`` (a degenerate affine, a non-finite
    result): the one place a DICOM series or a manifest file becomes model input."""
    try:
        grid = to_grid(volume, layout.spacing, layout.size, GRID_AXCODES)     # [1, Z, Y, X]
        planes = volume_intensity(channel.intensity, np.asarray(grid[0], dtype=np.float32))
    except SeriesSkip as skip:                   # grid_too_large: refused before resampling
        skipped[skip.reason] += 1
        return None
    except Exception:  # noqa: BLE001 - a degenerate affine must not stop the site
        skipped["resample_error"] += 1
        return None
    if not np.isfinite(planes).all():
        skipped["resample_error"] += 1
        return None
    return planes
