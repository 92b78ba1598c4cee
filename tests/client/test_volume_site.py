"""A site read through a 3D layout (ct_volume): each study's CT series comes back as a volume
on the layout's grid, one channel per HU window, in the right orientation, with the same
labels/splits join as the 2D path; refused series are counted by reason; nothing identifying
leaves."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch

from client.data.dicom import pseudonym
from client.data.grid import LPS_TO_RAS, to_grid
from client.data.intensity import hu_windows
from client.data.layout import load_layout
from client.data.layout_site import load_layout_site
from client.data.site import SiteDataError
from client.data.volume import Volume
from client.data.volume_site import GRID_AXCODES
from medfed.synth.ct import CLASS_NAMES, generate_ct_site, phantom_hu, synthesize_ct
from tests.client.layout_sites import cached_splits, synthesized
from tests.conftest import phi_strings

SEED = 3
GRID = dict(size=(32, 32, 32), spacing=(4.0, 4.0, 4.0))


@pytest.fixture(scope="module")
def ct_sites(tmp_path_factory):
    return synthesized(tmp_path_factory, synthesize_ct, "ct", n_sites=3, seed=SEED, patients=5)


@pytest.fixture(scope="module")
def layout():
    return dataclasses.replace(load_layout("ct_volume"), **GRID)


def _truth(study) -> Volume:
    """The generator's volume with its exact geometry, never written to or read from DICOM."""
    vol = study.volume
    dz, dy, dx = vol.spec.spacing
    affine = np.eye(4)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = vol.normal * dz, vol.column * dy, vol.row * dx
    affine[:3, 3] = vol.positions[0]
    return Volume(vol.physical, vol.spec.spacing, affine, "CT", "", "", "", "")


def _windows(layout) -> list[tuple[float, float]]:
    return [(w.center, w.width) for w in layout.channels[0].intensity.windows]


def test_every_site_reads_as_the_generators_volumes_on_the_layout_grid(ct_sites, layout):
    """Shuffled files, enhanced multi-frame, per-slice rescale and an oblique site all come
    back as the generator's HU volume, resampled and windowed (within float tolerance)."""
    root, profiles = ct_sites
    assert {p.enhanced for p in profiles} == {True, False} and any(any(p.angles_deg) for p in profiles)
    for profile in profiles:
        data = load_layout_site(root / profile.name, layout, CLASS_NAMES)
        by_key = {s.key: s for s in data.studies}
        for study in generate_ct_site(profile, SEED).studies:
            if study.broken:
                continue
            read = by_key.pop(pseudonym("study", study.volume.study_uid))
            assert set(read.images) == set(layout.input_channels)
            grid = np.asarray(to_grid(_truth(study), GRID["spacing"], GRID["size"], GRID_AXCODES)[0])
            expected = hu_windows(grid, _windows(layout))
            got = np.stack([read.images[c] for c in layout.input_channels])
            assert got.shape == (3, 32, 32, 32) and got.dtype == np.float32
            np.testing.assert_allclose(got, expected, atol=2e-3)
            assert read.label == (study.label if study.labelled else -1)
        assert not by_key, profile.name                  # every read study was generated


def test_the_grid_is_oriented_superior_posterior_left_and_matches_the_phantom(ct_sites):
    """Independent of the reader: on the output grid's own affine the voxels hold the
    phantom's anatomy (lungs up, liver on the patient's right, spine at the back). A flipped
    or transposed axis puts the anatomy elsewhere and fails the comparison."""
    _, profiles = ct_sites
    for profile in profiles:
        study = next(s for s in generate_ct_site(profile, SEED).studies if not s.broken)
        grid = to_grid(_truth(study), GRID["spacing"], GRID["size"], GRID_AXCODES)
        affine = grid.affine.numpy()
        assert "".join(nib.aff2axcodes(affine)) == "SPL"
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in GRID["size"]], indexing="ij"), -1)
        ras = ijk @ affine[:3, :3].T + affine[:3, 3]
        lps = (ras @ LPS_TO_RAS[:3, :3].T)                  # the same flip back to LPS
        phantom = phantom_hu(lps, study.lesion) + profile.hu_shift
        got = np.asarray(grid[0])
        inside = np.abs(lps).max(-1) < 60                  # away from the padded border
        err = np.abs(got - phantom)[inside]
        # noise (<= 25 HU), partial volume at organ edges; a flipped axis (lungs, stomach gas,
        # liver elsewhere) drops the correlation to ~0.85 (checked by mutation)
        assert np.median(err) < 25, (profile.name, np.median(err))
        assert np.corrcoef(got[inside], phantom[inside])[0, 1] > 0.95


def test_a_series_with_a_missing_slice_is_skipped_with_its_reason(ct_sites, layout):
    root, profiles = ct_sites
    broken = next(p for p in profiles if p.broken_series)
    study = next(s for s in generate_ct_site(broken, SEED).studies if s.broken)
    data = load_layout_site(root / broken.name, layout, CLASS_NAMES)
    assert data.report.skipped["missing_slice"] == 1
    assert data.report.skipped["study_missing_channel"] == 1
    assert pseudonym("study", study.volume.study_uid) not in {s.key for s in data.studies}
    assert data.report.studies == broken.n_patients - 1
    others = [p for p in profiles if not p.broken_series]
    assert all(not load_layout_site(root / p.name, layout, CLASS_NAMES).report.skipped
               for p in others)


def test_a_coordinator_spacing_that_would_resample_without_bound_is_skipped_unallocated(
        ct_sites, layout, monkeypatch):
    # A job's layout may set any spacing; 0.001 mm over a 10 cm field of view is 10^5 voxels
    # per axis. The site refuses it per series, counted, before MONAI's Spacing allocates.
    import client.data.grid as grid
    from monai.transforms import Spacing
    root, profiles = ct_sites
    calls = []
    real = Spacing.__call__
    monkeypatch.setattr(Spacing, "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    fine = dataclasses.replace(layout, spacing=(0.001, 0.001, 0.001))
    site = profiles[0]
    whole = site.n_patients - int(site.broken_series)
    with pytest.raises(SiteDataError, match=rf"'grid_too_large': {whole}\b") as refused:
        load_layout_site(root / site.name, fine, CLASS_NAMES)
    assert calls == [] and "resample_error" not in str(refused.value)
    # the cap is the readers' byte cap: a grid just under it resamples
    study = generate_ct_site(profiles[0], SEED).studies[0]
    assert grid.to_grid(_truth(study), (4.0, 4.0, 4.0), (8, 8, 8)).shape == (1, 8, 8, 8)


def test_nothing_identifying_leaves_and_the_site_key_reaches_the_volume_pseudonyms(
        ct_sites, layout):
    root, profiles = ct_sites
    site = root / profiles[1].name
    plain = load_layout_site(site, layout, CLASS_NAMES)
    phi = phi_strings(site)
    assert phi
    blob = repr([(s.key, s.patient_key, s.split, s.label) for s in plain.studies]) \
        + repr(plain.report) + plain.fingerprint
    assert not [v for v in phi if v in blob]
    uids = {row.split(",")[0] for row in (site / "labels.csv").read_text().splitlines()[1:]}
    assert not [u for u in uids if u in blob]
    # keyed: neither study nor patient pseudonyms are the unkeyed (recomputable) hashes
    keyed = load_layout_site(site, layout, CLASS_NAMES, key=b"k" * 32)
    assert len(keyed.studies) == len(plain.studies)
    assert not {s.key for s in keyed.studies} & {s.key for s in plain.studies}
    assert not {s.patient_key for s in keyed.studies} & {s.patient_key for s in plain.studies}


@pytest.mark.parametrize("image_size", [32, 16])
def test_the_site_cache_builds_volumes_for_a_3d_model(ct_sites, layout, image_size):
    root, profiles = ct_sites
    data, splits = cached_splits(root, profiles[1], CLASS_NAMES, image_size, layout)
    shape = (3, image_size, image_size, image_size)         # [C, D, H, W]: no middle slice
    items = [splits[name][i] for name in splits for i in range(len(splits[name]))]
    assert items and all(item["image"].shape == shape for item in items)
    images = torch.stack([item["image"] for item in items])
    assert images.min() >= 0 and images.max() <= 1        # HU windows, not a z-score
    assert all(item["present"].all() for item in items)
    if image_size == 32:             # the grid is the model's cube: the reader's values as they are
        studies = data.split("val", labelled_only=True)
        assert len(studies) == len(splits["val"])
        for i, study in enumerate(studies):
            expected = np.stack([study.images[c] for c in layout.input_channels])
            np.testing.assert_array_equal(splits["val"][i]["image"].numpy(), expected)


def test_a_3d_version_says_its_volume_preprocessing_and_reads_back(layout):
    """The serving record of a 3D layout names the cube input, the grid and its orientation;
    it reads back from the metadata, and a 2D record for the same layout is refused."""
    from protocol.serving import KEY_PREPROCESSING, ServingSpec, ServingSpecError

    spec = ServingSpec(layout=layout, class_names=CLASS_NAMES, task="classification",
                       output="softmax", image_size=32)
    prep = spec.preprocessing()
    assert prep["input_shape"] == [3, 32, 32, 32] and prep["grid_orientation"] == GRID_AXCODES
    assert prep["grid_size"] == [32, 32, 32] and "ImagePositionPatient" in prep["image"]
    assert ServingSpec.from_metadata(spec.to_metadata()) == spec
    meta = spec.to_metadata()
    meta[KEY_PREPROCESSING] = dict(prep, image_size=[32, 32], input_shape=[3, 32, 32])
    with pytest.raises(ServingSpecError, match="differs"):
        ServingSpec.from_metadata(meta)
