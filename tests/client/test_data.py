import csv
import json
import shutil
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from client.data.dataset import StudyDataset
from client.data.sequences import sequence_of
from client.data.site import SiteDataError, assign_split, load_site
from medfed.synth.sites import SERIES_NAMING
from tests.conftest import CLASSES, phi_strings


def _copy_site(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("naming", SERIES_NAMING)
def test_every_vendor_naming_maps_to_its_sequence(naming):
    for sequence, description in naming.items():
        assert sequence_of(description) == sequence


def test_unknown_descriptions_are_not_guessed():
    assert sequence_of("LOCALIZER") is None
    assert sequence_of("", "") is None
    assert sequence_of("", "ax t2 flair") == "FLAIR"          # falls back to ProtocolName


def test_corrupt_and_non_image_files_are_skipped_and_counted(tiny_sites, tmp_path):
    site = _copy_site(tiny_sites / "site-0", tmp_path / "site")
    dicom = site / "dicom"
    good = sorted(dicom.iterdir())[0]
    (dicom / "truncated.dcm").write_bytes(good.read_bytes()[:400])
    (dicom / "half-pixels.dcm").write_bytes(good.read_bytes()[:-2000])
    (dicom / "notes.txt").write_text("not dicom at all")
    sr = pydicom.dcmread(good)
    del sr.PixelData
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"          # Basic Text SR: no image
    sr.save_as(dicom / "sr.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), dicom / "ct.dcm")   # no MR sequence name
    nested = dicom / "sub" / "deeper"
    nested.mkdir(parents=True)
    shutil.copy(get_testdata_file("rtplan.dcm"), nested / "plan.dcm")

    baseline = load_site(tiny_sites / "site-0", CLASSES)
    data = load_site(site, CLASSES)
    skipped = data.report.skipped
    assert skipped["not_dicom"] == 1
    assert skipped["non_image"] == 2                         # SR + RT plan
    assert skipped["unknown_sequence"] == 1                  # CT without MR series naming
    broken = ("unreadable", "missing_pixel_data", "pixel_decode_error")
    assert sum(skipped[k] for k in broken) == 2              # the two truncated copies
    assert data.report.files == baseline.report.files + 6
    assert data.report.studies == baseline.report.studies     # nothing usable was lost


def test_missing_empty_and_all_corrupt_sites_fail_clearly(tmp_path):
    with pytest.raises(SiteDataError, match="does not exist"):
        load_site(tmp_path / "nope")
    (tmp_path / "empty" / "dicom").mkdir(parents=True)
    with pytest.raises(SiteDataError, match="empty"):
        load_site(tmp_path / "empty")
    bad = tmp_path / "bad" / "dicom"
    bad.mkdir(parents=True)
    (bad / "a.dcm").write_bytes(b"\x00" * 10)
    (bad / "b.txt").write_text("hello")
    with pytest.raises(SiteDataError, match="no usable studies"):
        load_site(tmp_path / "bad")


def test_studies_are_deidentified_joined_and_split_by_patient(tiny_sites):
    data = load_site(tiny_sites / "site-1", CLASSES)
    phi = phi_strings(tiny_sites / "site-1")
    assert phi
    for study in data.studies:
        text = repr((study.key, study.patient_key, study.split, study.label))
        assert not any(p in text for p in phi)
        assert study.split == assign_split(study.patient_key)
        assert study.report and "IMPRESSION" in study.report
    by_patient = {}
    for study in data.studies:
        by_patient.setdefault(study.patient_key, set()).add(study.split)
    assert all(len(splits) == 1 for splits in by_patient.values())
    assert any(len([s for s in data.studies if s.patient_key == p]) > 1 for p in by_patient) or \
        len(by_patient) == len(data.studies)
    assert data.report.studies_missing.get("T1ce", 0) > 0     # site-1 lacks T1ce sometimes
    labelled = sum(1 for s in data.studies if s.label >= 0)
    assert 0 < labelled < len(data.studies)                    # site-1 of 2 is the few-label site


def test_unknown_labels_are_counted_not_guessed(tiny_sites, tmp_path):
    site = _copy_site(tiny_sites / "site-0", tmp_path / "site")
    text = (site / "labels.csv").read_text().replace("cyst", "meningioma")
    (site / "labels.csv").write_text(text)
    data = load_site(site, CLASSES)
    assert data.report.labels["unknown_label"] > 0
    assert all(s.label in (-1, 0, 1) for s in data.studies)
    # the names left out stay at the site (client.queries refuses such a class list); a
    # stale row of a study the site does not hold leaves nothing out
    assert data.unlisted == {"meningioma"} and "meningioma" not in json.dumps(
        data.report.as_dict())
    with open(site / "labels.csv", "a") as f:
        f.write("1.2.3.4.5.6.7.8.9,astrocytoma\n")
    assert load_site(site, CLASSES).unlisted == {"meningioma"}
    assert load_site(site, (*CLASSES, "meningioma")).unlisted == frozenset()


def test_dataset_masks_absent_sequences(tiny_sites):
    data = load_site(tiny_sites / "site-1", CLASSES)
    ds = StudyDataset(data.studies, image_size=32)
    items = [ds[i] for i in range(len(ds))]
    assert all(it["image"].shape == (4, 32, 32) for it in items)
    partial = [it for it in items if not it["present"].all()]
    assert partial
    for it in partial:
        absent = ~it["present"]
        assert it["image"][absent].abs().max() == 0
        assert it["image"][it["present"]].std() > 0.5        # z-scored present sequences


def test_sequences_of_different_matrix_sizes_are_all_kept(tiny_sites):
    import numpy as np

    study = load_site(tiny_sites / "site-0", CLASSES).studies[0]
    study.images["T2"] = np.kron(study.images["T2"], np.ones((2, 2), np.float32))   # 128x128
    item = StudyDataset([study], image_size=32)[0]
    assert item["present"].all() and item["image"].shape == (4, 32, 32)
    assert item["image"][2].std() > 0.5


def test_lesion_masks_are_read_aligned_with_the_images(tiny_sites, tmp_path):
    data = load_site(tiny_sites / "site-0", CLASSES)
    with_mask = [s for s in data.studies if s.mask is not None]
    assert with_mask and data.report.masks == len(with_mask)
    assert all(s.label >= 0 for s in with_mask)            # the generator segments labelled ones
    for study in with_mask[:5]:
        assert study.mask.shape == study.images["T2"].shape and study.mask.any()
        t2 = study.images["T2"]                              # lesions are bright on T2
        assert t2[study.mask > 0].mean() > t2[study.mask == 0].mean()
    # A mask path that leaves the site directory, or a missing file, is counted, not read.
    site = tmp_path / "site"
    shutil.copytree(tiny_sites / "site-0", site)
    rows = (site / "segmentations.csv").read_text().splitlines()
    uid = rows[1].split(",")[0]
    (site / "segmentations.csv").write_text("\n".join(
        [rows[0], f"{uid},../../etc/passwd", f"{rows[2].split(',')[0]},masks/nope.nii.gz"]) + "\n")
    report = load_site(site, CLASSES).report
    assert report.masks == 0 and report.skipped["missing_mask_file"] == 2


def test_multi_label_findings_are_read_as_bitmasks(tiny_sites, tmp_path):
    from medfed.synth.phantom import FINDING_NAMES

    by_class = load_site(tiny_sites / "site-0", CLASSES)
    data = load_site(tiny_sites / "site-0", FINDING_NAMES, multi_label=True)
    classes = {s.key: s.label for s in by_class.studies}
    labelled = [s for s in data.studies if s.label >= 0]
    assert labelled and all(s.label < 8 for s in labelled)
    # the same studies are labelled either way (the generator writes findings for those)
    assert {s.key for s in labelled} == {k for k, c in classes.items() if c >= 0}
    rows = list(csv.DictReader(open(tiny_sites / "site-0" / "findings.csv")))
    for k, name in enumerate(FINDING_NAMES):
        with_it = sum(name in r["findings"].split(";") for r in rows)
        assert sum(s.label >> k & 1 for s in labelled) == with_it == data.report.labels[name]
    assert any(s.label == 0 for s in labelled)               # read, nothing found
    assert any(bin(s.label).count("1") > 1 for s in labelled)   # several findings at once
    # necrosis is only generated in high-grade gliomas
    assert all(classes[s.key] == 0 for s in labelled if s.label >> 1 & 1)
    # an unknown finding is counted and that row skipped, not guessed
    site = _copy_site(tiny_sites / "site-0", tmp_path / "site")
    text = (site / "findings.csv").read_text().replace("oedema", "haemorrhage")
    (site / "findings.csv").write_text(text)
    changed = load_site(site, FINDING_NAMES, multi_label=True)
    assert changed.report.labels["unknown_label"] == data.report.labels["oedema"] > 0
    assert all(s.label < 0 or not s.label >> 2 & 1 for s in changed.studies)


def test_study_dataset_plain_is_the_prepared_study_before_augmentation(tiny_sites):
    studies = load_site(tiny_sites / "site-0", CLASSES).split("train", labelled_only=True)[:3]
    augmented = StudyDataset(studies, 32, augment=True)
    plain = StudyDataset(studies, 32)
    for i in range(3):
        assert torch.equal(augmented.plain(i)["image"], plain[i]["image"])
        assert torch.equal(augmented.plain(i)["present"], plain[i]["present"])
    assert any(not torch.equal(augmented[i]["image"], plain[i]["image"]) for i in range(3))
