import numpy as np
import pytest

from client.data.dicom import pseudonym, read_directory
from medfed.synth.phantom import SEQUENCES
from medfed.synth.sites import generate_site, make_profiles, synthesize, write_site
from tests.medfed.checks import assert_deterministic_in_seed, tree_digest


def test_dicom_round_trip_equals_generated_arrays_after_lut(tmp_path):
    profile = make_profiles(3, seed=3, patients=6)[2]          # slope 0.25, intercept -64
    assert profile.rescale != (1.0, 0.0)
    site, stored = generate_site(profile, seed=3)
    write_site(site, stored, tmp_path / "site", seed=3)
    images, counts = read_directory(tmp_path / "site" / "dicom")
    assert counts.skipped == {}
    by_key = {(im.study_key, im.sequence): im.pixels for im in images}
    compared = 0
    for study in site.studies:
        for seq, expected in study.images.items():
            got = by_key[(pseudonym("study", study.study_uid), seq)]
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
            compared += 1
    assert compared == len(images) > 0


def test_synthesis_is_deterministic(tmp_path):
    assert_deterministic_in_seed(synthesize, tmp_path, seed=11, n_sites=2, patients=5)


def test_sites_differ_like_hospitals():
    profiles = make_profiles(3, seed=0)
    assert profiles[1].missing_sequence == "T1ce" and profiles[1].missing_fraction > 0
    assert profiles[2].label_fraction < 0.5
    assert len({p.scanner.noise_sigma for p in profiles}) == 3
    assert len({p.class_probs for p in profiles}) == 3
    site, _ = generate_site(profiles[1], seed=0)
    missing = sum("T1ce" not in s.images for s in site.studies)
    assert 0 < missing < len(site.studies)
    assert all(set(s.images) <= set(SEQUENCES) for s in site.studies)


def test_reports_agree_with_labels():
    site, _ = generate_site(make_profiles(1, seed=5, patients=40)[0], seed=5)
    words = {0: "high-grade", 1: "low-grade", 2: "cyst"}
    for study in site.studies:
        assert words[study.label] in study.report.lower()


def test_refuses_non_empty_output_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        synthesize(out, n_sites=1, seed=0, patients=4)

    import medfed.synth.sites as sites

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(sites, "write_site", boom)
    with pytest.raises(OSError):
        synthesize(tmp_path / "new", n_sites=1, seed=0, patients=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_non_iid_scenario_knobs():
    from medfed.synth.sites import Scenario

    iid = make_profiles(5, seed=1, scenario=Scenario(alpha=100.0, quantity_skew=0.0,
                                                     scanner_shift=0.0))
    skewed = make_profiles(5, seed=1, scenario=Scenario(alpha=0.1, quantity_skew=0.6,
                                                        scanner_shift=2.0))
    assert len({p.n_patients for p in iid}) == 1                        # no quantity skew
    assert len({p.n_patients for p in skewed}) > 1
    assert {p.scanner.noise_sigma for p in iid} == {40.0}               # identical scanners
    assert max(max(p.class_probs) for p in iid) < 0.5                   # near-uniform labels
    assert sum(max(p.class_probs) > 0.8 for p in skewed) >= 3           # mostly one class each
    few = make_profiles(3, seed=1, scenario=Scenario(missing_fraction=1.0, label_fraction=0.1))
    assert few[1].missing_fraction == 1.0 and few[2].label_fraction == 0.1
    with pytest.raises(ValueError, match="alpha"):
        Scenario(alpha=0)


# ---------------------------------------------------------------- chest radiographs

def test_chest_sites_are_real_radiograph_dicom_with_site_heterogeneity(tmp_path):
    import csv
    import json

    import pydicom

    from medfed.cli import main
    from medfed.synth.chest import CLASS_NAMES

    assert main(["synth", "--layout", "chest_xray", "--sites", "3", "--patients", "6",
                 "--seed", "4", "--out", str(tmp_path / "a")]) == 0
    seen = {"photometric": set(), "modality": set(), "view": set(), "rows": set()}
    for site in sorted((tmp_path / "a").iterdir()):
        films = 0
        for path in (site / "dicom").iterdir():
            ds = pydicom.dcmread(path)
            if ds.Modality == "SR":
                continue
            if ds.BodyPartExamined != "CHEST":
                assert ds.BodyPartExamined == "CSPINE"   # the export's non-chest film
                continue
            films += 1
            seen["photometric"].add(ds.PhotometricInterpretation)
            seen["modality"].add(ds.Modality)
            seen["view"].add(ds.ViewPosition)
            seen["rows"].add(ds.Rows)
            assert ds.SOPClassUID in ("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1")
            assert len(ds.PixelSpacing) == 2 and float(ds.PixelSpacing[0]) > 0
            assert "WindowCenter" in ds and "WindowWidth" in ds
            assert ds.pixel_array.max() < 2 ** ds.BitsStored
            assert ds.PatientName and ds.PatientID and ds.AccessionNumber   # PHI, as exported
        rows = list(csv.DictReader(open(site / "labels.csv")))
        assert films >= len(rows) > 0
        assert {r["label"] for r in rows} - {""} <= set(CLASS_NAMES)
        reports = [json.loads(line) for line in open(site / "reports.jsonl")]
        assert len(reports) == len(rows) and all("IMPRESSION:" in r["text"] for r in reports)
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"}
    assert seen["modality"] == {"CR", "DX"} and {"PA", "AP", "LL"} <= seen["view"]
    main(["synth", "--layout", "chest_xray", "--sites", "3", "--patients", "6", "--seed", "4",
          "--out", str(tmp_path / "b")])
    main(["synth", "--layout", "chest_xray", "--sites", "3", "--patients", "6", "--seed", "5",
          "--out", str(tmp_path / "c")])
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b") != tree_digest(tmp_path / "c")


def test_chest_reports_agree_with_labels():
    from medfed.synth.chest import generate_chest_site, make_chest_profiles

    for profile in make_chest_profiles(2, seed=1, patients=30):
        for study in generate_chest_site(profile, seed=1).studies:
            impression = study.report.split("IMPRESSION:")[1].lower()
            assert {0: "no acute" in impression or "normal" in impression,
                    1: "consolidation" in impression or "airspace" in impression,
                    2: "effusion" in impression}[study.label]


def test_default_synth_is_still_the_brain_sites(tmp_path):
    """``--layout`` defaults to the demo's brain sites: the same files as before the option."""
    from medfed.cli import main

    main(["synth", "--sites", "2", "--patients", "4", "--seed", "9", "--out", str(tmp_path / "a")])
    synthesize(tmp_path / "b", n_sites=2, seed=9, patients=4, scenario=None)
    assert (tmp_path / "a" / "site-0" / "findings.csv").exists()
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
