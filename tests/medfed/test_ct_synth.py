"""`medfed synth --layout ct_volume`: deterministic CT departments whose DICOM carries the
geometry and encodings a reader must handle (shuffled slices, enhanced multi-frame, oblique
orientation, per-slice rescale, a missing slice), labels, and fake PHI."""

from __future__ import annotations

import csv
from collections import Counter

import numpy as np
import pydicom
import pytest

from medfed.cli import main
from medfed.synth.ct import (CLASS_NAMES, generate_ct_site, make_ct_profiles, synthesize_ct)
from tests.medfed.checks import assert_deterministic_in_seed

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("ctsynth") / "data"
    return root, synthesize_ct(root, n_sites=3, seed=4, patients=4, external=True)


def test_synthesis_is_deterministic(tmp_path):
    assert_deterministic_in_seed(synthesize_ct, tmp_path, seed=9, n_sites=2, patients=4)
    with pytest.raises(FileExistsError):
        synthesize_ct(tmp_path / "a", n_sites=1, seed=9, patients=4)


def test_dicom_attributes_carry_real_ct_geometry_and_encodings(sites):
    root, profiles = sites
    assert [p.name for p in profiles] == ["site-0", "site-1", "site-2", "external"]
    for profile in profiles:
        headers = [pydicom.dcmread(f, stop_before_pixels=True)
                   for f in sorted((root / profile.name / "dicom").iterdir())]
        assert {h.Modality for h in headers} == {"CT"}
        series = Counter(h.SeriesInstanceUID for h in headers)
        assert len(series) == profile.n_patients                  # one series per study
        if profile.enhanced:
            assert {h.SOPClassUID for h in headers} == {ENHANCED_CT}
            assert all(int(h.NumberOfFrames) > 1 and "PerFrameFunctionalGroupsSequence" in h
                       for h in headers)
            continue
        assert {h.SOPClassUID for h in headers} == {CT}
        one = [h for h in headers if h.SeriesInstanceUID == headers[0].SeriesInstanceUID]
        normal = np.cross(np.array(one[0].ImageOrientationPatient[:3], float),
                          np.array(one[0].ImageOrientationPatient[3:], float))
        along = [float(np.dot(normal, np.array(h.ImagePositionPatient, float))) for h in one]
        by_instance = [along[i] for i in np.argsort([int(h.InstanceNumber) for h in one])]
        assert by_instance != sorted(by_instance)                 # InstanceNumber is no order
        gaps = np.diff(sorted(along))
        assert np.allclose(gaps, profile.thickness, atol=1e-3) or (
            profile.broken_series and np.isclose(gaps, 2 * profile.thickness).sum() == 1)
        gapped = 0                         # series with one slice left out (one, at one site)
        for uid in series:
            pos = sorted(float(np.dot(normal, np.array(h.ImagePositionPatient, float)))
                         for h in headers if h.SeriesInstanceUID == uid)
            gapped += not np.allclose(np.diff(pos), profile.thickness, atol=1e-3)
        assert gapped == int(profile.broken_series)
        assert float(one[0].PixelSpacing[0]) == pytest.approx(profile.pixel_mm)
        slopes = {float(h.RescaleSlope) for h in one}
        assert (len(slopes) > 1) == (profile.rescale == 1)        # per-slice rescale at one site
        iop = np.array(one[0].ImageOrientationPatient, float)
        axial = np.allclose(iop, [1, 0, 0, 0, 1, 0], atol=1e-6)
        assert axial != any(profile.angles_deg)                   # the oblique site is oblique
    # fake PHI in the headers (for the de-identification tests), never in file names
    header = pydicom.dcmread(next((root / "site-0" / "dicom").iterdir()), stop_before_pixels=True)
    assert str(header.PatientName) and str(header.PatientID).startswith("MRN")
    names = " ".join(p.name for p in root.rglob("*"))
    assert str(header.PatientID) not in names and str(header.StudyInstanceUID) not in names


def test_labels_match_the_rendered_lesions_and_sites_differ(sites):
    root, profiles = sites
    for profile in profiles:
        site = generate_ct_site(profile, seed=4)
        rows = list(csv.DictReader(open(root / profile.name / "labels.csv")))
        assert [r["study_instance_uid"] for r in rows] == [s.volume.study_uid for s in site.studies]
        assert [r["label"] for r in rows] == [CLASS_NAMES[s.label] for s in site.studies]
        for s in site.studies:
            if s.label == 1:
                assert s.lesion.contrast >= 30                    # brighter than the liver
            elif s.label == 2:
                assert s.lesion.contrast <= -30
            else:
                assert abs(s.lesion.contrast) < 20
    assert sum(p.broken_series for p in profiles) == 1
    assert len({(p.thickness, p.pixel_mm, p.rescale, p.enhanced) for p in profiles}) > 2
    assert len({p.class_probs for p in profiles[:3]}) == 3
    assert make_ct_profiles(3, seed=4, label_fraction=0.5)[2].label_fraction == 0.5


def test_cli_writes_ct_sites(tmp_path, capsys):
    out = tmp_path / "ct"
    assert main(["synth", "--layout", "ct_volume", "--out", str(out), "--sites", "2",
                 "--patients", "4", "--label-fraction", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 ct_volume sites" in printed and "enhanced multi-frame" in printed
    assert sorted(p.name for p in out.iterdir()) == ["site-0", "site-1"]
