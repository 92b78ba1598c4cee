"""A site read through a 2D layout for training: channels matched from headers, intensities
the right way up, labels/reports/splits joined as for the brain reader, PHI left behind."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from client.data.dicom import pseudonym
from client.data.layout import Layout, load_layout
from client.data.layout_site import load_layout_site
from client.data.site import SiteDataError, load_site
from medfed.synth.chest import (CLASS_NAMES, generate_chest_site,
                                synthesize_chest)
from protocol.layout import LayoutError
from tests.client.layout_sites import cached_splits, synthesized
from tests.conftest import phi_strings

SEED = 5


@pytest.fixture(scope="module")
def chest_sites(tmp_path_factory):
    return synthesized(tmp_path_factory, synthesize_chest, "chest", n_sites=3, seed=SEED,
                       patients=10)


@pytest.fixture(scope="module")
def chest():
    return load_layout("chest_xray")


def test_every_photometric_reads_the_right_way_up(chest_sites, chest):
    """MONOCHROME1 (dense stored low) and MONOCHROME2 sites both come back as the
    generator's display image (bone bright, air dark), equal within quantisation."""
    root, profiles = chest_sites
    assert {p.photometric for p in profiles} == {"MONOCHROME1", "MONOCHROME2"}
    for profile in profiles:
        data = load_layout_site(root / profile.name, chest, CLASS_NAMES)
        by_key = {s.key: s for s in data.studies}
        top = 2 ** profile.bits - 1
        for study in generate_chest_site(profile, SEED).studies:
            read = by_key[pseudonym("study", study.study_uid)]
            for view, (_, stored) in study.views.items():
                shown = stored / top
                expected = 1 - shown if profile.photometric == "MONOCHROME1" else shown
                np.testing.assert_allclose(read.images[view], expected, atol=1e-3)
            assert set(read.images) == set(study.views)
            # not inverted as a whole: a clear lung (air) is darker than the spine (bone)
            frontal, n = read.images["frontal"], profile.rows
            if study.label == 0:
                assert frontal[n // 2, int(n * 0.28)] + 0.3 < frontal[n // 2, n // 2]


def test_labels_reports_splits_and_counts_join_as_for_the_brain_reader(chest_sites, chest):
    root, profiles = chest_sites
    junk = next(p for p in profiles if p.junk_files)
    data = load_layout_site(root / junk.name, chest, CLASS_NAMES)
    r = data.report
    assert r.studies == len(data.studies) == junk.n_patients
    assert r.skipped["no_rule_matched"] == 1          # the C-spine AP film
    assert r.skipped["non_image"] == 1                # the dose report
    assert r.sequences["frontal"] == r.studies
    assert r.sequences["lateral"] + r.studies_missing["lateral"] == r.studies
    labels = {row["study_instance_uid"]: row for row in
              __import__("csv").DictReader(open(root / junk.name / "labels.csv"))}
    assert sum(s.label >= 0 for s in data.studies) == sum(bool(v["label"]) for v in labels.values())
    assert all(s.report and "TECHNIQUE:" in s.report for s in data.studies)
    assert set(r.splits) <= {"train", "val", "test"} and sum(r.splits.values()) == r.studies
    # only pseudonymous keys: 16 hex characters, never a UID
    for s in data.studies:
        assert len(s.key) == len(s.patient_key) == 16 and s.key not in labels
    # a layout site's manifest is a different one from its brain reading, and stable
    assert data.fingerprint == load_layout_site(root / junk.name, chest, CLASS_NAMES).fingerprint


def test_nothing_identifying_leaves_the_reader(chest_sites, chest):
    root, profiles = chest_sites
    phi = phi_strings(root)
    assert len(phi) > 10
    for profile in profiles:
        data = load_layout_site(root / profile.name, chest, CLASS_NAMES)
        blob = json.dumps(data.report.as_dict()) + data.fingerprint + \
            " ".join(f"{s.key} {s.patient_key} {sorted(s.images)}" for s in data.studies)
        for secret in phi:
            assert secret not in blob


def test_missing_channel_policies(chest_sites, chest):
    root, profiles = chest_sites
    site = root / profiles[0].name
    allow = load_layout_site(site, chest, CLASS_NAMES)
    without_lateral = sum("lateral" not in s.images for s in allow.studies)
    assert without_lateral > 0
    strict = load_layout_site(site, dataclasses.replace(chest, missing="skip_study"), CLASS_NAMES)
    assert len(strict.studies) == len(allow.studies) - without_lateral
    assert strict.report.skipped["study_missing_channel"] == without_lateral
    lateral = Layout.from_dict(chest.to_dict() | {"channels": [
        c | {"required": c["name"] == "lateral"} for c in chest.to_dict()["channels"]]})
    needs_lateral = load_layout_site(site, lateral, CLASS_NAMES)
    assert all("lateral" in s.images for s in needs_lateral.studies)
    assert needs_lateral.report.skipped["study_missing_channel"] == without_lateral


def test_a_3d_layout_finds_no_volume_in_radiographs_and_the_brain_reader_is_unchanged(
        chest_sites, chest):
    root, profiles = chest_sites
    with pytest.raises(SiteDataError, match="no usable studies"):
        load_layout_site(root / profiles[0].name, load_layout("ct_volume"))
    no_grid = Layout.from_dict(load_layout("ct_volume").to_dict() | {"size": None})
    with pytest.raises(SiteDataError, match="needs size"):
        load_layout_site(root / profiles[0].name, no_grid)
    with pytest.raises(SiteDataError, match="no usable studies"):
        load_site(root / profiles[0].name, CLASS_NAMES)      # no MR sequence in a chest site
    with pytest.raises(LayoutError):
        Layout.from_dict(chest.to_dict() | {"dims": "4d"})


def test_the_site_cache_builds_layout_channels_at_their_own_scale(chest_sites, chest):
    root, profiles = chest_sites
    data, splits = cached_splits(root, profiles[0], CLASS_NAMES, 32, chest)
    item = splits["train"][0]
    assert item["image"].shape == (2, 32, 32)              # frontal, lateral at the job's size
    images = torch.stack([splits["val"][i]["image"] for i in range(len(splits["val"]))])
    present = torch.stack([splits["val"][i]["present"] for i in range(len(splits["val"]))])
    assert images.min() >= 0 and images.max() <= 1          # the VOI window, not a z-score
    assert (images[~present[:, 1], 1] == 0).all()            # no lateral: zeros, not present
    assert present[:, 0].all() and (~present[:, 1]).any()
