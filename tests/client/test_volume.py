"""DICOM series -> Volume: slice order from geometry, affine, skips by reason, hostile headers,
enhanced multi-frame, resampling onto a grid, and real files nobody here wrote."""

import copy
import dataclasses
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut
from pydicom.tag import Tag

from client.data.geometry import GeometryTolerance
from client.data.grid import LPS_TO_RAS, to_grid
from client.data.volume import (Volume, VolumeLimits, assemble_volumes, read_volume_directory,
                                read_volumes)
from medfed.synth.volume import (VolumeSpec, enhanced_dataset, make_volume, series_datasets,
                                 write_datasets)


IPP = Tag(0x0020, 0x0032)


def _one(volumes, counts):
    assert counts.skipped == {} and len(volumes) == 1, counts.as_dict()
    return volumes[0]


def _skip_reason(datasets, **options) -> str:
    volumes, counts = assemble_volumes(datasets, **options)
    assert volumes == [] and counts.series == 1 and sum(counts.skipped.values()) == 1
    return next(iter(counts.skipped))


# --- order, values, affine ----------------------------------------------------------------------

def test_oblique_shuffled_series_comes_back_in_spatial_order_with_exact_values(tmp_path):
    truth = make_volume(VolumeSpec(), seed=3)
    datasets = series_datasets(truth, seed=3)
    # the test means something only if neither file order nor InstanceNumber gives the order
    by_instance = sorted(datasets, key=lambda ds: ds.InstanceNumber)
    assert [ds.ImagePositionPatient for ds in by_instance] != \
        [ds.ImagePositionPatient for ds in sorted(datasets, key=lambda ds: float(
            np.asarray(ds.ImagePositionPatient, float) @ truth.normal))]
    paths = write_datasets(datasets, tmp_path / "series")
    volume = _one(*read_volumes(paths))
    assert volume.array.dtype == np.float32 and volume.array.shape == truth.spec.shape
    np.testing.assert_array_equal(volume.array, truth.physical)     # exact after the rescale
    assert len(set(truth.slopes)) > 1                                # per-slice LUT was needed
    assert volume.modality == "CT"


def test_affine_maps_first_voxel_to_first_ipp_and_axes_to_cosines_times_spacing():
    truth = make_volume(VolumeSpec(spacing=(3.0, 0.7, 0.45)), seed=1)
    volume = _one(*assemble_volumes(series_datasets(truth, seed=1)))
    dz, dy, dx = volume.spacing
    assert (dz, dy, dx) == pytest.approx((3.0, 0.7, 0.45), abs=1e-4)
    a = volume.affine
    np.testing.assert_allclose(a @ [0, 0, 0, 1], [*truth.positions[0], 1], atol=1e-6)
    np.testing.assert_allclose(a[:3, 2], truth.row * dx, atol=1e-9)       # column index i
    np.testing.assert_allclose(a[:3, 1], truth.column * dy, atol=1e-9)    # row index j
    np.testing.assert_allclose(a[:3, 0], truth.normal * dz, atol=1e-9)    # slice index k
    # and every slice centre lands on the position written in its header
    for k in range(truth.spec.shape[0]):
        np.testing.assert_allclose((a @ [k, 0, 0, 1])[:3], truth.positions[k], atol=1e-4)


def test_enhanced_multiframe_equals_the_single_frame_series():
    truth = make_volume(VolumeSpec(modality="MR"), seed=5)
    series = _one(*assemble_volumes(series_datasets(truth, seed=5)))
    enhanced_ds = enhanced_dataset(truth, seed=5)
    assert int(enhanced_ds.NumberOfFrames) == truth.spec.shape[0]
    enhanced = _one(*assemble_volumes([enhanced_ds]))
    np.testing.assert_array_equal(enhanced.array, series.array)
    np.testing.assert_allclose(enhanced.affine, series.affine, atol=1e-9)
    assert enhanced.spacing == pytest.approx(series.spacing)
    assert enhanced.series_key == series.series_key


def test_enhanced_file_round_trips_through_disk(tmp_path):
    truth = make_volume(VolumeSpec(), seed=8)
    paths = write_datasets([enhanced_dataset(truth, seed=8)], tmp_path)
    volume = _one(*read_volumes(paths))
    np.testing.assert_array_equal(volume.array, truth.physical)


# --- geometry that is not one regular volume is skipped, by reason ----------------------------

@pytest.mark.parametrize("spec, reason", [
    (VolumeSpec(tilt_deg=12.0), "gantry_tilt"),
    (VolumeSpec(missing=(4,)), "missing_slice"),
    (VolumeSpec(displace=((4, 0.7),)), "inconsistent_spacing"),
])
@pytest.mark.parametrize("form", ["series", "enhanced"])
def test_broken_geometry_is_skipped_with_its_reason(spec, reason, form):
    truth = make_volume(spec, seed=2)
    datasets = series_datasets(truth) if form == "series" else [enhanced_dataset(truth)]
    assert _skip_reason(datasets) == reason


def test_small_tilt_within_tolerance_is_accepted_and_a_tighter_tolerance_refuses_it():
    datasets = series_datasets(make_volume(VolumeSpec(tilt_deg=0.5), seed=2))
    _one(*assemble_volumes(datasets))
    assert _skip_reason(datasets, tolerance=GeometryTolerance(tilt_deg=0.2)) == "gantry_tilt"


def test_mixed_orientation_duplicate_position_and_single_slice():
    datasets = series_datasets(make_volume(VolumeSpec(), seed=4))
    tilted = copy.deepcopy(datasets)
    tilted[3].ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    assert _skip_reason(tilted) == "mixed_orientation"
    echo = datasets + [copy.deepcopy(datasets[2])]         # a second echo at the same place
    echo[-1].SOPInstanceUID = pydicom.uid.generate_uid()
    assert _skip_reason(echo) == "duplicate_position"
    assert _skip_reason(datasets[:1]) == "single_slice"


def test_select_hook_skips_series_the_layout_does_not_want_and_labels_the_rest():
    datasets = series_datasets(make_volume(VolumeSpec(), seed=4))
    assert _skip_reason(datasets, select=lambda ds: None) == "not_selected"
    volume = _one(*assemble_volumes(datasets, select=lambda ds: "ct_chest"))
    assert volume.label == "ct_chest"


# --- hostile headers ------------------------------------------------------------------------

class _NoPixels(Dataset):
    """A header whose pixel data must never be touched."""

    touched = 0

    @property
    def pixel_array(self):
        type(self).touched += 1
        raise AssertionError("pixel data decoded for a refused series")


def _never_load(i):
    raise AssertionError("pixels loaded for a refused series")


@pytest.mark.parametrize("change", [
    {"Rows": 60000}, {"Columns": 60000}, {"NumberOfFrames": 10**7},
])
def test_oversized_header_is_refused_before_any_pixel_is_decoded(change):
    headers = []
    for ds in series_datasets(make_volume(VolumeSpec(), seed=6)):
        header = _NoPixels(ds)
        header.file_meta = ds.file_meta
        for keyword, value in change.items():
            setattr(header, keyword, value)
        headers.append(header)
    _NoPixels.touched = 0
    volumes, counts = assemble_volumes(headers)          # default load: the headers themselves
    assert volumes == [] and counts.skipped == {"too_large": 1}
    assert _NoPixels.touched == 0
    assert _skip_reason(headers, load=_never_load) == "too_large"


def test_volume_over_the_byte_cap_is_refused_without_loading_pixels():
    truth = make_volume(VolumeSpec(), seed=6)
    nbytes = truth.physical.nbytes
    datasets = series_datasets(truth)
    limits = VolumeLimits(max_bytes=nbytes - 1)
    assert _skip_reason(datasets, load=_never_load, limits=limits) == "too_large"
    assert _skip_reason(datasets, load=_never_load,
                        limits=VolumeLimits(max_slices=truth.spec.shape[0] - 1)) == "too_large"
    _one(*assemble_volumes(datasets, limits=VolumeLimits(max_bytes=nbytes)))


def test_read_volumes_reads_headers_only_for_refused_series(tmp_path, monkeypatch):
    paths = write_datasets(series_datasets(make_volume(VolumeSpec(missing=(2,)), seed=7)),
                           tmp_path)
    calls = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread",
                        lambda *a, **kw: calls.append(kw.get("stop_before_pixels")) or real(*a, **kw))
    volumes, counts = read_volumes(paths)
    assert volumes == [] and counts.skipped == {"missing_slice": 1}
    assert calls == [True] * len(paths)


def test_corrupt_and_malformed_inputs_are_counted_not_raised(tmp_path):
    truth = make_volume(VolumeSpec(), seed=9)
    good = write_datasets(series_datasets(truth), tmp_path / "good")
    (tmp_path / "notes.txt").write_text("not dicom")
    stub = tmp_path / "stub.dcm"                   # cut inside the header, before the UIDs
    stub.write_bytes(good[0].read_bytes()[:300])
    good[1].write_bytes(good[1].read_bytes()[:-100])        # pixel data cut short
    volumes, counts = read_volumes([*good, tmp_path / "notes.txt", stub])
    assert volumes == [] and counts.files == len(good) + 2
    assert counts.files_skipped == {"not_dicom": 1, "missing_uid": 1}
    assert counts.skipped == {"pixel_decode_error": 1}
    bad = series_datasets(truth)
    # as read from a hostile file: pydicom keeps an unparsable DS as text
    bad[0][IPP] = RawDataElement(IPP, "DS", 8, b"1\\x\\3.0 ", 0, False, True)
    assert _skip_reason(bad) == "bad_header"
    del bad[0].ImagePositionPatient
    assert _skip_reason(bad) == "missing_geometry"


# --- no PHI ---------------------------------------------------------------------------------

def test_volume_counts_and_logs_hold_no_phi_uid_or_path(tmp_path, caplog):
    truth = make_volume(VolumeSpec(), seed=10)
    broken = make_volume(VolumeSpec(tilt_deg=20), seed=11)
    paths = write_datasets(series_datasets(truth) + series_datasets(broken), tmp_path / "Doe")
    caplog.set_level(logging.DEBUG, logger="client.data")
    volumes, counts = read_volumes(paths)
    assert len(volumes) == 1 and counts.skipped == {"gantry_tilt": 1}
    secrets = [*truth.phi.values(), *broken.phi.values(), truth.study_uid, truth.series_uid,
               broken.series_uid, str(tmp_path)]
    secrets += [p.name for p in paths]
    fields = {f.name: getattr(volumes[0], f.name) for f in dataclasses.fields(Volume)}
    text = repr({k: v for k, v in fields.items() if k not in ("array", "affine")})
    text += repr(counts.as_dict()) + caplog.text
    for secret in secrets:
        assert secret and secret not in text


# --- onto a grid ----------------------------------------------------------------------------

def _blob_volume() -> tuple[Volume, np.ndarray]:
    """An oblique volume with one bright Gaussian blob; returns it and the blob's LPS centre."""
    truth = make_volume(VolumeSpec(shape=(12, 20, 16), spacing=(2.0, 1.2, 0.8)), seed=12)
    volume = _one(*assemble_volumes(series_datasets(truth)))
    k, j, i = np.meshgrid(*(np.arange(n) for n in volume.array.shape), indexing="ij")
    centre = np.array([5.0, 9.0, 7.0])                                   # (k, j, i)
    world = np.stack([k, j, i], -1) * volume.spacing                     # mm along each axis
    r2 = ((world - centre * volume.spacing) ** 2).sum(-1)
    array = (1000.0 * np.exp(-r2 / (2 * 3.0**2))).astype(np.float32)
    blob = dataclasses.replace(volume, array=array)
    return blob, (volume.affine @ [*centre, 1])[:3]


@pytest.mark.parametrize("axcodes", ["RAS", "LPS"])
def test_to_grid_gives_requested_spacing_size_orientation_and_keeps_anatomy_in_place(axcodes):
    volume, centre_lps = _blob_volume()
    spacing, size = (1.0, 1.5, 2.0), (48, 40, 32)
    grid = to_grid(volume, spacing, size, axcodes)
    assert tuple(grid.shape) == (1, *size) and grid.dtype.is_floating_point
    affine = np.asarray(grid.affine, dtype=np.float64)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), spacing, rtol=1e-5)
    assert "".join(nib.aff2axcodes(affine)) == axcodes
    peak = np.unravel_index(int(grid[0].argmax()), size)
    peak_lps = (np.linalg.inv(LPS_TO_RAS) @ affine @ [*peak, 1])[:3]
    assert np.linalg.norm(peak_lps - centre_lps) <= 2.0      # within one output voxel


def test_to_grid_pads_with_background_and_validates_arguments():
    volume, _ = _blob_volume()
    volume = dataclasses.replace(volume, array=volume.array - 1000.0)    # CT-like: air = -1000
    grid = to_grid(volume, (2.0, 2.0, 2.0), (64, 64, 64))
    assert float(grid[0, 0, 0, 0]) == pytest.approx(float(volume.array.min()))
    with pytest.raises(ValueError, match="spacing"):
        to_grid(volume, (1.0, 0.0, 1.0), (8, 8, 8))
    with pytest.raises(ValueError, match="size"):
        to_grid(volume, (1.0, 1.0, 1.0), (8, 8))


# --- real files nobody here wrote -----------------------------------------------------------

def _dicomdir_tests() -> Path:
    return Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"


def test_real_ct_series_from_pydicom_decodes_in_ipp_order():
    series = _dicomdir_tests() / "98892001" / "CT5N"
    volume = _one(*read_volume_directory(series))
    files = [pydicom.dcmread(p) for p in sorted(series.iterdir())]
    # the reader must sort by position along the normal (+z here), not by InstanceNumber
    files.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert [ds.InstanceNumber for ds in files] == sorted((ds.InstanceNumber for ds in files),
                                                         reverse=True)
    expected = np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in files])
    np.testing.assert_array_equal(volume.array, expected.astype(np.float32))
    np.testing.assert_allclose(volume.affine[:3, 3], [float(v) for v in
                                                      files[0].ImagePositionPatient])
    assert volume.spacing == pytest.approx((2.5, 0.488281, 0.488281))


def test_real_enhanced_ct_uses_shared_and_per_frame_groups():
    volume = _one(*read_volumes([get_testdata_file("eCT_Supplemental.dcm", download=False)]))
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm", download=False))
    assert volume.array.shape == (2, 512, 512) and volume.spacing[0] == pytest.approx(10.0)
    # row (-1,0,0) x column (0,1,0) = normal (0,0,-1): the frame at z=-149 comes first, then -159
    positions = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
                 for f in ds.PerFrameFunctionalGroupsSequence]
    assert positions == [-159.0, -149.0]
    np.testing.assert_allclose(volume.affine[:3, 3], [99.5, -301.5, -149.0])
    np.testing.assert_allclose(volume.affine[:3, 0], [0.0, 0.0, -10.0], atol=1e-9)
    # shared Pixel Value Transformation group: slope 1, intercept -1024
    np.testing.assert_array_equal(volume.array, ds.pixel_array[::-1].astype(np.float32) - 1024.0)


REAL_FILES = ["CT_small.dcm", "MR_small.dcm", "emri_small.dcm", "emri_small_RLE.dcm",
              "emri_small_big_endian.dcm", "eCT_Supplemental.dcm", "MR2_UNCR.dcm", "693_UNCR.dcm",
              "US1_UNCR.dcm", "RG1_UNCR.dcm", "liver.dcm", "rtdose.dcm", "MR_truncated.dcm",
              "emri_small_jpeg_2k_lossless_too_short.dcm", "no_meta.dcm", "rtplan.dcm"]


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_pydicom_files_go_through_without_a_crash_every_skip_counted(name):
    path = get_testdata_file(name, download=False)      # never the network
    assert path is not None, f"{name} comes with pydicom-data: install the dev extra"
    volumes, counts = read_volumes([Path(path)], limits=VolumeLimits(max_rows=1024,
                                                                     max_columns=1024))
    assert counts.files == 1
    assert counts.series == counts.volumes + sum(counts.skipped.values())
    assert sum(counts.files_skipped.values()) + counts.series == 1
    for volume in volumes:
        assert volume.array.ndim == 3 and np.isfinite(volume.array).all()


def test_real_dicomdir_tree_every_series_accounted_for():
    volumes, counts = read_volume_directory(_dicomdir_tests())
    assert counts.series == counts.volumes + sum(counts.skipped.values())
    assert counts.volumes >= 1
    # the tree holds localizers (three planes in one series), radial MR, single slices, CR
    # projections and a CT series with a gap in its positions: each has its reason
    for reason in ("mixed_orientation", "single_slice", "not_volumetric", "missing_slice"):
        assert counts.skipped[reason] >= 1, counts.as_dict()


def test_limits_and_tolerances_are_validated():
    with pytest.raises(ValueError):
        VolumeLimits(max_rows=0)
    with pytest.raises(ValueError):
        GeometryTolerance(spacing=0.6)
