"""Per-channel intensity handling: stored DICOM pixel values to model input, the right way up.

Each function takes a pydicom dataset (pixels not yet decoded, or decoded: pydicom caches) and
returns ``[C, *spatial]`` float32, ``C`` = :attr:`~client.data.layout.Intensity.n_outputs`:

- ``zscore`` (MR): the modality LUT, then zero mean and unit variance over the image;
- ``ct_window`` (CT): Hounsfield units through RescaleSlope/RescaleIntercept (the modality
  LUT), then each window ``[center - width/2, center + width/2]`` mapped to ``[0, 1]``,
  clipped; one output channel per window;
- ``xray`` (CR/DX/MG): the modality LUT, then the VOI LUT or window the file carries (the
  view the radiologist saw), scaled to ``[0, 1]`` by the VOI output range, and MONOCHROME1
  inverted so that air is dark (0) and bone bright, as in MONOCHROME2;
- ``us_grey`` (US): palette colour through its LUT and YBR/RGB as RGB, to luma (ITU-R BT.601),
  scaled by the sample range to ``[0, 1]``.
"""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from .layout import Intensity

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)   # ITU-R BT.601


def apply_intensity(intensity: Intensity, ds: pydicom.Dataset) -> np.ndarray:
    """``[C, *spatial]`` float32 for one dataset (see the module docstring).

    Raises
    ------
    ValueError
        The pixels do not suit the kind (e.g. colour pixels for ``ct_window``); any pydicom
        decode error propagates (the caller counts it as ``pixel_decode_error``).
    """
    if intensity.kind == "zscore":
        return zscore(ds)[None]
    if intensity.kind == "ct_window":
        return ct_windows(ds, [(w.center, w.width) for w in intensity.windows])
    if intensity.kind == "xray":
        return xray(ds)[None]
    if intensity.kind == "us_grey":
        return us_grey(ds)[None]
    raise ValueError(f"unknown intensity kind {intensity.kind!r}")


def _mono(ds: pydicom.Dataset) -> np.ndarray:
    """Pixels after the modality LUT; refuses colour data (the kinds below are greyscale)."""
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise ValueError("expected one sample per pixel (greyscale), got colour data")
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)


def zscore(ds: pydicom.Dataset) -> np.ndarray:
    """MR: zero mean, unit variance (a constant image stays all zeros)."""
    return standardize(_mono(ds))


def standardize(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole array (a constant one stays all zeros)."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std()
    return ((x - x.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def hounsfield(ds: pydicom.Dataset) -> np.ndarray:
    """CT pixels in Hounsfield units (RescaleSlope * stored + RescaleIntercept)."""
    return _mono(ds)


def ct_windows(ds: pydicom.Dataset, windows: list[tuple[float, float]]) -> np.ndarray:
    """``[len(windows), *spatial]``: each (center, width) window of the HU image to [0, 1]."""
    return hu_windows(hounsfield(ds), windows)


def hu_windows(hu: np.ndarray, windows: list[tuple[float, float]]) -> np.ndarray:
    """``[len(windows), *hu.shape]``: each (center, width) window of HU values to [0, 1]."""
    hu = np.asarray(hu, dtype=np.float64)
    out = [np.clip((hu - (center - width / 2)) / width, 0.0, 1.0) for center, width in windows]
    return np.stack(out).astype(np.float32)


def volume_intensity(intensity: Intensity, values: np.ndarray) -> np.ndarray:
    """``[C, Z, Y, X]`` float32 for a volume of physical values (modality LUT already
    applied per slice by :mod:`client.data.frames`, then resampled onto the layout's grid).

    Only the cross-sectional kinds apply: ``ct_window`` (HU windows) and ``zscore`` (over
    the whole volume). ``xray``/``us_grey`` describe projection images and raise ValueError.
    """
    if intensity.kind == "ct_window":
        return hu_windows(values, [(w.center, w.width) for w in intensity.windows])
    if intensity.kind == "zscore":
        return standardize(values)[None]
    raise ValueError(f"intensity {intensity.kind!r} is for 2D projection images, not volumes "
                     "(3D layouts use ct_window or zscore)")


def xray(ds: pydicom.Dataset) -> np.ndarray:
    """Radiograph in [0, 1] as displayed: VOI LUT/window applied, air dark."""
    x = _mono(ds)
    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    if has_voi:
        x = np.asarray(apply_voi_lut(x, ds, index=0), dtype=np.float64)
        lo, hi = _voi_range(ds)
    else:
        lo, hi = float(x.min()), float(x.max())
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(x)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        x = 1.0 - x           # MONOCHROME1: the lowest value is displayed white
    return x.astype(np.float32)


def _voi_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """The output range of the file's first VOI transform: the LUT's entries, or for a
    window what pydicom saturates to (probed with values far outside any window)."""
    if "VOILUTSequence" in ds:
        data = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float64)
        return float(data.min()), float(data.max())
    ends = np.asarray(apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0), dtype=np.float64)
    return float(ends.min()), float(ends.max())


def us_grey(ds: pydicom.Dataset) -> np.ndarray:
    """Ultrasound to grey in [0, 1]: palette through its LUT, colour to luma."""
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    pixels = ds.pixel_array        # pydicom returns YBR as RGB by default
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if photometric == "PALETTE COLOR" or int(ds.get("SamplesPerPixel", 1) or 1) == 3:
        # apply_color_lut gives uint8 or uint16 by the LUT's entry size: scale by that
        top = float(np.iinfo(pixels.dtype).max) if pixels.dtype.kind in "ui" else 1.0
        grey = pixels.astype(np.float32) @ _LUMA
    else:
        top = float(2 ** int(ds.get("BitsStored", 8) or 8) - 1)
        grey = pixels.astype(np.float32)
    return np.clip(grey / top, 0.0, 1.0).astype(np.float32)
