"""Pixels the right way up, on real files no one here wrote (pydicom's and pydicom-data's
test corpora): a MONOCHROME1 chest radiograph with air dark and its VOI window applied, a CT
in Hounsfield units through rescale slope/intercept, one [0, 1] channel per window."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_color_lut

from client.data.intensity import apply_intensity, ct_windows, hounsfield, us_grey, xray, zscore
from client.data.layout import load_layout
from client.data.matching import Match, header_of, match_series


def _read(name: str, **kw) -> pydicom.Dataset:
    path = get_testdata_file(name)        # installed corpus only (never a download)
    assert path is not None, f"{name} is not in the installed pydicom/pydicom-data corpus"
    return pydicom.dcmread(path, **kw)


def _regions(x: np.ndarray) -> dict[str, float]:
    h, w = x.shape
    return {"corners": float(np.r_[x[:100, :100].ravel(), x[:100, -100:].ravel()].mean()),
            "lung": float(x[h // 2 - 100:h // 2 + 100, w // 4 - 100:w // 4 + 100].mean()),
            "mediastinum": float(x[h // 2 - 100:h // 2 + 100, w // 2 - 50:w // 2 + 50].mean())}


def test_chest_xray_takes_the_monochrome1_radiograph_as_its_frontal_view():
    ds = _read("RG1_UNCR.dcm", stop_before_pixels=True)
    assert (ds.Modality, ds.PhotometricInterpretation, ds.ViewPosition) == \
        ("CR", "MONOCHROME1", "PA")
    layout = load_layout("chest_xray")
    assert match_series(layout, header_of(ds)) == Match("frontal", "frontal_view")
    assert layout.channels[0].intensity.kind == "xray"


def test_monochrome1_radiograph_comes_out_with_air_dark():
    ds = _read("RG1_UNCR.dcm")
    x = apply_intensity(load_layout("chest_xray").channels[0].intensity, ds)[0]
    assert x.dtype == np.float32 and x.shape == (ds.Rows, ds.Columns)
    assert 0.0 <= x.min() and x.max() <= 1.0
    r = _regions(x)
    # As a radiologist sees it: air (outside the body, lungs) dark, mediastinum/spine bright.
    assert r["corners"] < r["lung"] < r["mediastinum"], r
    assert r["mediastinum"] - r["corners"] > 0.3, r
    # The stored values run the other way (MONOCHROME1: the lowest value is white) ...
    raw = _regions(ds.pixel_array.astype(np.float64))
    assert raw["corners"] > raw["mediastinum"]
    # ... so a reader that ignored MONOCHROME1 would show the film inverted.
    ds.PhotometricInterpretation = "MONOCHROME2"
    flipped = _regions(xray(ds))
    assert flipped["corners"] > flipped["mediastinum"]


def test_radiograph_voi_window_is_applied():
    ds = _read("RG1_UNCR.dcm")
    stored = ds.pixel_array.astype(np.float64)     # no rescale in this file: modality = stored
    assert "RescaleSlope" not in ds and "VOILUTSequence" not in ds
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    # DICOM PS3.3 C.11.2.1.2.1 linear window to the full output range, then MONOCHROME1
    # inverted; a min-max scaling of the pixels (VOI ignored) would differ by ~0.03-0.1.
    expected = 1.0 - np.clip((stored - (c - 0.5)) / (w - 1) + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(xray(ds), expected, atol=1e-4)
    # A narrow window saturates both ends: the VOI decides what the model sees.
    ds.WindowCenter, ds.WindowWidth = 10000, 2000
    narrow = xray(ds)
    assert narrow[stored < 9000].min() == 1.0 and narrow[stored > 11000].max() == 0.0


def test_ct_is_read_in_hounsfield_units_and_windowed_per_channel():
    ds = _read("CT_small.dcm")
    layout = load_layout("ct_volume")
    assert match_series(layout, header_of(ds)) == Match("ct", "ct_axial")
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    assert intercept == -1024.0
    hu = hounsfield(ds)
    np.testing.assert_array_equal(hu, ds.pixel_array * slope + intercept)
    out = apply_intensity(layout.channels[0].intensity, ds)
    assert out.shape == (3, ds.Rows, ds.Columns) and out.dtype == np.float32
    soft, lung, bone = out
    assert soft[hu <= 40 - 200].max() == 0.0 and soft[hu >= 40 + 200].min() == 1.0
    assert bone[hu <= 400 - 900].max() == 0.0
    inside = (hu > -160) & (hu < 240)
    assert inside.any()
    np.testing.assert_allclose(soft[inside], (hu[inside] + 160) / 400, atol=1e-6)
    # -600 HU is the lung window's centre: mid-grey there, black in the soft-tissue window.
    mid = ct_windows(ds, [(float(hu.flat[0]), 1500.0)])
    assert mid[0].flat[0] == pytest.approx(0.5)
    assert np.all(lung >= soft[hu < -160].max())    # lung window lifts what soft tissue clips


def test_mr_zscore():
    x = zscore(_read("MR_small.dcm"))
    assert abs(float(x.mean())) < 1e-5 and float(x.std()) == pytest.approx(1.0, abs=1e-4)


def test_ultrasound_palette_and_rgb_to_grey():
    ds = _read("OBXXXX1A.dcm")
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    grey = us_grey(ds)
    rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64)
    top = np.iinfo(apply_color_lut(ds.pixel_array, ds).dtype).max
    np.testing.assert_allclose(grey, (rgb @ [0.299, 0.587, 0.114]) / top, atol=1e-4)
    assert grey.shape == (ds.Rows, ds.Columns) and grey.max() <= 1.0
    ds = _read("US1_UNCR.dcm")
    assert ds.PhotometricInterpretation == "RGB"
    np.testing.assert_allclose(us_grey(ds), (ds.pixel_array @ [0.299, 0.587, 0.114]) / 255,
                               atol=1e-4)


def test_greyscale_kinds_refuse_colour_pixels():
    with pytest.raises(ValueError, match="one sample per pixel"):
        xray(_read("US1_UNCR.dcm"))
