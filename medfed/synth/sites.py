"""Synthetic hospitals: site profiles, deterministic generation, and DICOM/label/report files.

Sites differ the way hospitals do: label mix (Dirichlet), scanner gain/noise/bias, series
naming conventions, rescale slope/intercept (so the modality LUT matters), one site missing
post-contrast T1 for part of its studies, and one site with few labels. Everything is a pure
function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from .hospital import (INSTITUTIONS, HospitalProfile, Site, atomic_output, class_mix, empty_output,
                       new_dataset, opaque_name, save_dicom, save_dose_report, set_patient,
                       set_pixels, set_study, site_indices, site_name, write_csv, write_labels,
                       write_reports)
from .phantom import (CLASS_NAMES, SEQUENCES, LesionParams, Scanner, findings, render_study,
                      sample_lesion)
from .reports import fake_accession, fake_phi, write_report

SERIES_NAMING = (
    {"T1": "T1", "T1ce": "T1CE", "T2": "T2", "FLAIR": "FLAIR"},
    {"T1": "AX T1 SE", "T1ce": "AX T1 POST GD", "T2": "AX T2 FSE", "FLAIR": "AX T2 FLAIR"},
    {"T1": "t1_se_tra", "T1ce": "t1_se_tra_post_contrast", "T2": "t2_tse_tra",
     "FLAIR": "t2_tirm_tra_dark-fluid"},
)
RESCALE = ((1.0, 0.0), (0.5, 0.0), (0.25, -64.0))     # (slope, intercept) per vendor
FOLLOW_UP_FRACTION = 0.15


@dataclass(frozen=True)
class SiteProfile(HospitalProfile):
    """How one synthetic hospital differs from the others."""

    scanner: Scanner
    naming: int
    rescale: tuple[float, float]
    pixel_mm: float
    missing_sequence: str | None = None
    missing_fraction: float = 0.0
    label_fraction: float = 1.0
    junk_files: bool = False


@dataclass
class SyntheticStudy:
    """One generated study, with everything needed to check what a reader gets back."""

    patient_index: int
    study_uid: str
    label: int
    labelled: bool
    lesion: LesionParams
    images: dict[str, np.ndarray]      # physical values after the modality LUT, present only
    mask: np.ndarray
    phi: dict[str, str]
    report: str


class SyntheticSite(Site[SiteProfile, SyntheticStudy]):
    """A brain-MRI site in memory."""


@dataclass(frozen=True)
class Scenario:
    """How non-IID the federation is. Defaults are the demo's hospitals."""

    alpha: float = 2.0              # Dirichlet label skew (small = each site sees few classes)
    patients: int = 200             # mean patients per site
    quantity_skew: float = 0.3      # site sizes uniform in patients * [1 - q, 1 + q]
    scanner_shift: float = 1.0      # scales per-site gain/noise deviations (0 = identical scanners)
    missing_fraction: float = 0.4   # share of site 1's studies without T1ce
    label_fraction: float = 0.25    # share of site 2's studies with a label

    def __post_init__(self):
        if self.alpha <= 0:
            raise ValueError(f"Dirichlet alpha must be > 0, got {self.alpha}")
        if self.patients < 1 or not 0 <= self.quantity_skew < 1 or self.scanner_shift < 0:
            raise ValueError("need patients >= 1, 0 <= quantity_skew < 1, scanner_shift >= 0")
        if not (0 <= self.missing_fraction <= 1 and 0 < self.label_fraction <= 1):
            raise ValueError("missing_fraction must be in [0, 1], label_fraction in (0, 1]")


def make_profiles(n_sites: int, seed: int, *, alpha: float = 2.0, patients: int = 200,
                  external: bool = False, scenario: Scenario | None = None) -> list[SiteProfile]:
    """Deterministic site profiles; site 1 lacks T1ce for some studies, site 2 has few labels.

    ``scenario`` overrides ``alpha`` and ``patients`` when given.
    """
    scenario = scenario or Scenario(alpha=alpha, patients=patients)
    q, shift = scenario.quantity_skew, scenario.scanner_shift
    rng = np.random.default_rng([seed, 1])
    missing_site = 1 if n_sites > 1 else 0
    few_label_site = 2 if n_sites > 2 else n_sites - 1
    profiles = []
    for i in site_indices(n_sites, external):
        is_external = i == n_sites
        probs = class_mix(rng, scenario.alpha, len(CLASS_NAMES), external=is_external)
        gains = rng.uniform(0.8, 1.25, len(SEQUENCES))
        noise = rng.uniform(25, 60)
        if shift != 1.0:                 # keep the default draws bit-identical
            gains, noise = 1 + shift * (gains - 1), 40 + shift * (noise - 40)
        scanner = Scanner(gain=tuple(float(g) for g in gains), noise_sigma=float(noise),
                          bias_strength=float(rng.uniform(0.05, 0.2)))
        profiles.append(SiteProfile(
            index=i,
            name=site_name(i, n_sites),
            institution=INSTITUTIONS[i % len(INSTITUTIONS)],
            n_patients=max(4, int(round(scenario.patients * rng.uniform(1 - q, 1 + q)))),
            class_probs=probs,
            scanner=scanner,
            naming=i % len(SERIES_NAMING),
            rescale=RESCALE[i % len(RESCALE)],
            pixel_mm=float(rng.choice([0.9, 1.0, 1.2])),
            missing_sequence="T1ce" if i == missing_site and not is_external else None,
            missing_fraction=scenario.missing_fraction if i == missing_site and not is_external
            else 0.0,
            label_fraction=scenario.label_fraction if i == few_label_site and not is_external
            else 1.0,
            junk_files=i == missing_site and not is_external,
        ))
    return profiles


def _quantize(image: np.ndarray, slope: float, intercept: float) -> tuple[np.ndarray, np.ndarray]:
    """Stored uint16 values and the physical values a reader recovers through the LUT."""
    stored = np.clip(np.rint((image - intercept) / slope), 0, 65535).astype(np.uint16)
    return stored, stored.astype(np.float64) * slope + intercept


def generate_site(profile: SiteProfile, seed: int) -> tuple[SyntheticSite, dict]:
    """Generate a site in memory: studies plus the stored pixel arrays per (study, sequence)."""
    rng = np.random.default_rng([seed, 2, profile.index])
    site = SyntheticSite(profile)
    stored: dict[tuple[str, str], np.ndarray] = {}
    slope, intercept = profile.rescale
    for p in range(profile.n_patients):
        phi = fake_phi(rng, profile.index, p)
        label = int(rng.choice(len(CLASS_NAMES), p=profile.class_probs))
        labelled = bool(rng.random() < profile.label_fraction)
        n_studies = 2 if rng.random() < FOLLOW_UP_FRACTION else 1
        for s in range(n_studies):
            lesion = sample_lesion(label, rng)
            images, mask = render_study(lesion, profile.scanner, rng)
            missing = ()
            if profile.missing_sequence and rng.random() < profile.missing_fraction:
                missing = (profile.missing_sequence,)
            study_uid = generate_uid(entropy_srcs=[str(seed), profile.name, str(p), str(s), "st"])
            physical = {}
            for seq in SEQUENCES:
                if seq in missing:
                    continue
                stored[(study_uid, seq)], physical[seq] = _quantize(images[seq], slope, intercept)
            report = write_report(lesion, rng, referring=phi["ReferringPhysicianName"],
                                  missing=missing, pixel_mm=profile.pixel_mm)
            site.studies.append(SyntheticStudy(p, study_uid, label, labelled, lesion, physical,
                                               mask, dict(phi, StudyIndex=str(s)), report))
    return site, stored


def _dicom(profile: SiteProfile, study: SyntheticStudy, seq: str, pixels: np.ndarray,
           seed: int, accession: str) -> Dataset:
    sop_uid = generate_uid(entropy_srcs=[study.study_uid, seq, "sop", str(seed)])
    ds = new_dataset(MRImageStorage, sop_uid)
    set_patient(ds, study.phi)
    set_study(ds, institution=profile.institution, accession=accession,
              patient_index=study.patient_index, time="093000",
              description="MRI BRAIN W/WO CONTRAST")
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study.study_uid, seq, "series"])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[study.study_uid, "for"])
    ds.Modality = "MR"
    ds.Manufacturer = ("GE", "Siemens", "Philips")[profile.naming]
    ds.SeriesDescription = SERIES_NAMING[profile.naming][seq]
    ds.SeriesNumber = SEQUENCES.index(seq) + 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [profile.pixel_mm, profile.pixel_mm]
    ds.SliceThickness = 5.0
    set_pixels(ds, pixels)
    slope, intercept = profile.rescale
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    return ds


def write_site(site: SyntheticSite, stored: dict, out: Path, seed: int) -> None:
    """Write DICOM files, ``labels.csv`` (class), ``findings.csv`` (multi-label findings of the
    labelled studies), ``reports.jsonl`` and lesion masks (NIfTI under ``masks/``, listed in
    ``segmentations.csv``) for one site into ``out``."""
    dicom_dir = out / "dicom"
    dicom_dir.mkdir(parents=True)
    rng = np.random.default_rng([seed, 3, site.profile.index])
    last = None
    for study in site.studies:
        accession = fake_accession(rng)
        for seq in SEQUENCES:
            if seq not in study.images:
                continue
            ds = _dicom(site.profile, study, seq, stored[(study.study_uid, seq)], seed, accession)
            last = save_dicom(ds, dicom_dir)
    write_labels(out, ((study.study_uid, CLASS_NAMES[study.label] if study.labelled else "")
                       for study in site.studies))
    write_csv(out / "findings.csv", ["study_instance_uid", "findings"],
              ([study.study_uid, ";".join(findings(study.lesion))]
               for study in site.studies if study.labelled))
    write_reports(out, ((study.study_uid, study.report) for study in site.studies))
    write_masks(site, out)
    if site.profile.junk_files and last is not None:
        _write_junk(dicom_dir, last, site.studies[0])


def write_masks(site: SyntheticSite, out: Path) -> None:
    """Lesion masks of the labelled studies, as a segmentation team would export them."""
    import nibabel as nib

    (out / "masks").mkdir()
    rows = []
    for study in site.studies:
        if not study.labelled:
            continue
        name = f"masks/{opaque_name(study.study_uid + ':mask')[:-4]}.nii.gz"
        affine = np.diag([site.profile.pixel_mm, site.profile.pixel_mm, 5.0, 1.0])
        # NIfTI is x-major: store the [rows, columns] mask transposed, as converters do.
        nib.save(nib.Nifti1Image(study.mask.T[..., None].astype(np.uint8), affine), out / name)
        rows.append([study.study_uid, name])
    write_csv(out / "segmentations.csv", ["study_instance_uid", "mask_file"], rows)


def _write_junk(dicom_dir: Path, image_file: Path, study: SyntheticStudy) -> None:
    """What real PACS exports contain besides images: an SR, a truncated file, OS litter."""
    save_dose_report(pydicom.dcmread(image_file), "1.2.840.10008.5.1.4.1.1.88.11", dicom_dir,
                     "sr" + study.study_uid)
    data = image_file.read_bytes()
    (dicom_dir / opaque_name("trunc" + study.study_uid)).write_bytes(data[: len(data) // 3])
    (dicom_dir / "Thumbs.db").write_bytes(b"\x00\x01not a dicom file")


def synthesize(out: Path, *, n_sites: int, seed: int, alpha: float = 2.0, patients: int = 200,
               external: bool = False, scenario: Scenario | None = None) -> list[SiteProfile]:
    """Write all sites under ``out`` atomically: a failure leaves nothing half-written."""
    out = empty_output(out)
    profiles = make_profiles(n_sites, seed, alpha=alpha, patients=patients, external=external,
                             scenario=scenario)
    with atomic_output(out) as tmp:
        for profile in profiles:
            site, stored = generate_site(profile, seed)
            write_site(site, stored, tmp / profile.name, seed)
    return profiles
