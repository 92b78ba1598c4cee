"""Synthetic chest-radiograph hospitals (layout ``chest_xray``): real DICOM CR/DX files, labels
and reports, deterministic in the seed.

Each study has a frontal view (PA, or AP for part of a site's patients) and, for part of them,
a lateral view. The diagnostic logic follows chest radiology, in a deliberately simple phantom
(:mod:`.chest_phantom`: body, lungs, heart, spine, ribs):

- ``no_finding``: clear lungs (now and then a faint nodule-like density: overlap, on purpose);
- ``consolidation``: a patchy, mottled opacity in one lung zone, seen on both views;
- ``effusion``: a dependent opacity at a lung base with a meniscus that blunts the
  costophrenic angle, posterior on the lateral view.

Amplitudes are drawn from overlapping ranges and each site's detector adds its own gain and
noise, so the task is learnable over rounds without saturating in the first. Sites differ as
hospitals do: CR or DX, MONOCHROME1 or MONOCHROME2 storage, matrix size and pixel spacing, bit
depth, the share of AP films and of lateral views, series naming, and label mix (Dirichlet).
Headers carry fake PHI (names, IDs, dates, accession numbers), and so do some reports (the
patient's name and MRN, a dated prior, the dictating physician), so the reader's
de-identification of both is exercised; one site also exports a C-spine film and a dose report
the layout must skip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                         generate_uid)

from .chest_phantom import Finding, render_frontal, render_lateral, sample_finding
from .hospital import (INSTITUTIONS, HospitalProfile, Site, atomic_output, class_mix, empty_output,
                       new_dataset, save_dicom, save_dose_report, set_patient, set_pixels,
                       set_study, site_indices, site_name, write_labels, write_reports)
from .reports import fake_accession, fake_phi

CLASS_NAMES: tuple[str, ...] = ("no_finding", "consolidation", "effusion")
VIEWS = ("frontal", "lateral")
_SOP = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation}
# (frontal, lateral) SeriesDescription per vendor convention; ViewPosition decides, not these.
_NAMING = (("CHEST {view}", "CHEST LAT"), ("{view} CHEST", "LATERAL"),
           ("Thorax {view}", "Thorax lat"))


@dataclass(frozen=True)
class ChestProfile(HospitalProfile):
    """How one synthetic radiology department differs from the others."""

    modality: str                  # CR or DX
    photometric: str               # MONOCHROME1 (low stored value = white) or MONOCHROME2
    rows: int                      # square matrix
    pixel_mm: float
    bits: int                      # BitsStored
    gain: float                    # detector response (display = offset + gain * density)
    offset: float
    noise: float                   # in display units
    ap_fraction: float             # frontal films taken AP (portable) instead of PA
    lateral_fraction: float        # studies with a lateral view
    naming: int
    label_fraction: float = 1.0
    junk_files: bool = False       # a C-spine AP film and a dose report in the export


@dataclass
class ChestStudy:
    """One generated study, kept so tests can compare what a reader gets back."""

    patient_index: int
    study_uid: str
    label: int
    labelled: bool
    finding: Finding
    views: dict[str, tuple[str, np.ndarray]]      # view -> (ViewPosition, stored pixels)
    phi: dict[str, str]
    report: str


class ChestSite(Site[ChestProfile, ChestStudy]):
    """A radiology department in memory."""


def make_chest_profiles(n_sites: int, seed: int, *, alpha: float = 2.0, patients: int = 60,
                        external: bool = False, label_fraction: float = 0.5) -> list[ChestProfile]:
    """Deterministic profiles; site 2 (or the last) labels only ``label_fraction`` of its
    studies, site 1 exports junk beside its films."""
    rng = np.random.default_rng([seed, 21])
    profiles = []
    for i in site_indices(n_sites, external):
        is_external = i == n_sites
        probs = class_mix(rng, alpha, len(CLASS_NAMES), external=is_external)
        modality = ("CR", "DX")[i % 2]
        profiles.append(ChestProfile(
            index=i, name=site_name(i, n_sites),
            institution=INSTITUTIONS[(i + 2) % len(INSTITUTIONS)],
            n_patients=max(4, int(round(patients * rng.uniform(0.7, 1.3)))),
            class_probs=probs, modality=modality,
            photometric=("MONOCHROME1", "MONOCHROME2", "MONOCHROME2", "MONOCHROME1")[i % 4],
            rows=int(rng.choice([96, 128, 160])), pixel_mm=float(rng.choice([2.4, 2.8, 3.2])),
            bits=(12, 14)[int(rng.integers(2))], gain=float(rng.uniform(0.85, 1.15)),
            offset=float(rng.uniform(-0.04, 0.04)), noise=float(rng.uniform(0.03, 0.06)),
            ap_fraction=float(rng.uniform(0.1, 0.5)),
            lateral_fraction=float(rng.uniform(0.4, 0.9)), naming=i % len(_NAMING),
            label_fraction=label_fraction if i == min(2, n_sites - 1) and n_sites > 1
            and not is_external else 1.0,
            junk_files=i == 1 and not is_external))
    return profiles


def _detector(density: np.ndarray, profile: ChestProfile, rng: np.random.Generator) -> np.ndarray:
    """Stored pixel values: the site's detector response and noise, in its bit depth and
    photometric interpretation (MONOCHROME1 stores dense as low)."""
    display = profile.offset + profile.gain * density
    display = np.clip(display + rng.normal(0, profile.noise, density.shape), 0, 1)
    top = 2 ** profile.bits - 1
    if profile.photometric == "MONOCHROME1":
        display = 1 - display
    return np.rint(display * top).astype(np.uint16)


def write_chest_report(finding: Finding, views: tuple[str, ...], rng: np.random.Generator, *,
                       referring: str) -> str:
    """A short report consistent with the finding that was rendered."""
    side = "right" if finding.side < 0 else "left"
    technique = "PA and lateral" if "lateral" in views else "Single frontal"
    parts = [f"TECHNIQUE: {technique} views of the chest."]
    if finding.label == 0:
        parts.append("FINDINGS: The lungs are clear. No pleural effusion. Normal heart size.")
        if finding.faint:
            parts.append(f"Tiny density in the {side} lung, likely a vessel end-on.")
        impression = ("No acute cardiopulmonary abnormality.", "Normal chest radiograph.")
    elif finding.label == 1:
        zone = "upper" if finding.zone < 0.4 else ("mid" if finding.zone < 0.7 else "lower")
        parts.append(f"FINDINGS: Patchy airspace opacity in the {side} {zone} zone. "
                     "No pleural effusion.")
        impression = (f"{side.capitalize()} {zone} zone consolidation, likely pneumonia.",
                      "Airspace disease; infection in the appropriate clinical setting.")
    else:
        size = "small" if finding.size < 0.2 else "moderate"
        parts.append(f"FINDINGS: Blunting of the {side} costophrenic angle with a meniscus; "
                     "the lungs are otherwise clear.")
        impression = (f"{size.capitalize()} {side} pleural effusion.",
                      f"{side.capitalize()} pleural effusion, {size}.")
    parts.append(f"IMPRESSION: {impression[int(rng.integers(2))]}")
    if rng.random() < 0.3:
        parts.append(f"Results discussed with Dr. {referring.split('^')[0]}.")
    return " ".join(parts)


def report_with_phi(report: str, phi: dict[str, str], rng: np.random.Generator) -> str:
    """The report as a reporting system exports it: now and then a header line with the
    patient's name and MRN, a comparison with a dated prior (its accession number), a
    dictation line with the physician and date - identifiers the site's de-identification
    (``client.data.report_deid``) must remove before the text is used."""
    last, first = phi["PatientName"].split("^")
    birth = phi["PatientBirthDate"]
    physician = phi["ReferringPhysicianName"].split("^")
    lines = []
    if rng.random() < 0.3:
        lines.append(f"Patient: {last}, {first}. MRN: {phi['PatientID']}. "
                     f"DOB: {birth[6:]}/{birth[4:6]}/{birth[:4]}.")
    lines.append(report)
    if rng.random() < 0.4:
        year, month, day = 2023, int(rng.integers(1, 13)), int(rng.integers(1, 29))
        lines.append(f"COMPARISON: chest radiograph of {year}-{month:02d}-{day:02d} "
                     f"(accession {fake_accession(rng)}).")
    if rng.random() < 0.3:
        lines.append(f"Dictated by Dr. {physician[1]} {physician[0]} on "
                     f"{int(rng.integers(1, 29))} March 2024.")
    return " ".join(lines)


def generate_chest_site(profile: ChestProfile, seed: int) -> ChestSite:
    """A site in memory: studies with their stored pixels, labels and reports."""
    rng = np.random.default_rng([seed, 22, profile.index])
    site = ChestSite(profile)
    for p in range(profile.n_patients):
        phi = fake_phi(rng, profile.index, p)
        label = int(rng.choice(len(CLASS_NAMES), p=profile.class_probs))
        labelled = bool(rng.random() < profile.label_fraction)
        finding = sample_finding(label, rng)
        position = "AP" if rng.random() < profile.ap_fraction else "PA"
        views = {"frontal": (position, _detector(render_frontal(finding, profile.rows, rng),
                                                 profile, rng))}
        if rng.random() < profile.lateral_fraction:
            views["lateral"] = ("LL", _detector(render_lateral(finding, profile.rows, rng),
                                                profile, rng))
        study_uid = generate_uid(entropy_srcs=[str(seed), "chest", profile.name, str(p)])
        report = write_chest_report(finding, tuple(views), rng,
                                    referring=phi["ReferringPhysicianName"])
        # Its own stream: the PHI lines leave the pixels and labels drawn above unchanged.
        report = report_with_phi(report, phi, np.random.default_rng([seed, 24, profile.index, p]))
        site.studies.append(ChestStudy(p, study_uid, label, labelled, finding, views, phi,
                                       report))
    return site


def _dicom(profile: ChestProfile, study: ChestStudy, view: str, position: str,
           pixels: np.ndarray, seed: int, accession: str, *, body_part: str = "CHEST") -> Dataset:
    sop_class = _SOP[profile.modality]
    sop_uid = generate_uid(entropy_srcs=[study.study_uid, view, body_part, "sop", str(seed)])
    ds = new_dataset(sop_class, sop_uid)
    set_patient(ds, study.phi)
    set_study(ds, institution=profile.institution, accession=accession,
              patient_index=study.patient_index, time="141500",
              description="XR CHEST 2 VIEWS" if len(study.views) > 1 else "XR CHEST 1 VIEW")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study.study_uid, view, body_part, "series"])
    ds.Modality = profile.modality
    ds.Manufacturer = ("Fujifilm", "Carestream", "Agfa")[profile.naming]
    frontal_name, lateral_name = _NAMING[profile.naming]
    ds.SeriesDescription = frontal_name.format(view=position) if view == "frontal" \
        else lateral_name
    ds.SeriesNumber = VIEWS.index(view) + 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = body_part
    ds.ViewPosition = position
    ds.PatientOrientation = ["L", "F"] if view == "frontal" else ["P", "F"]
    ds.PixelSpacing = [profile.pixel_mm, profile.pixel_mm]
    if profile.modality == "DX":
        ds.ImagerPixelSpacing = [profile.pixel_mm, profile.pixel_mm]
        ds.PresentationIntentType = "FOR PRESENTATION"
    set_pixels(ds, pixels, photometric=profile.photometric, bits=profile.bits)
    top = 2 ** profile.bits
    ds.WindowCenter, ds.WindowWidth = top // 2, top       # the full detector range
    return ds


def write_chest_site(site: ChestSite, out: Path, seed: int) -> None:
    """DICOM files (opaque names), ``labels.csv`` and ``reports.jsonl`` of one site."""
    dicom_dir = out / "dicom"
    dicom_dir.mkdir(parents=True)
    rng = np.random.default_rng([seed, 23, site.profile.index])
    for study in site.studies:
        accession = fake_accession(rng)
        for view, (position, pixels) in study.views.items():
            save_dicom(_dicom(site.profile, study, view, position, pixels, seed, accession),
                       dicom_dir)
    if site.profile.junk_files and site.studies:
        _write_junk(site, dicom_dir, seed)
    write_labels(out, ((study.study_uid, CLASS_NAMES[study.label] if study.labelled else "")
                       for study in site.studies))
    write_reports(out, ((study.study_uid, study.report) for study in site.studies))


def _write_junk(site: ChestSite, dicom_dir: Path, seed: int) -> None:
    """What a radiology export holds besides chest films: a C-spine AP film of the same
    patient (CR/DX + AP, but not the chest: the layout's BodyPartExamined rule skips it) and
    a dose report (no pixels)."""
    study = site.studies[0]
    position, pixels = study.views["frontal"]
    save_dicom(_dicom(site.profile, study, "frontal", "AP", pixels, seed, "ACC0",
                      body_part="CSPINE"), dicom_dir)
    sr = _dicom(site.profile, study, "lateral", position, pixels, seed, "ACC0", body_part="SR")
    sr.BodyPartExamined = "CHEST"
    save_dose_report(sr, "1.2.840.10008.5.1.4.1.1.88.67", dicom_dir, "sr" + study.study_uid)


def synthesize_chest(out: Path, *, n_sites: int, seed: int, alpha: float = 2.0,
                     patients: int = 60, external: bool = False,
                     label_fraction: float = 0.5) -> list[ChestProfile]:
    """Write all sites under ``out`` atomically: a failure leaves nothing half-written."""
    out = empty_output(out)
    profiles = make_chest_profiles(n_sites, seed, alpha=alpha, patients=patients,
                                   external=external, label_fraction=label_fraction)
    with atomic_output(out) as tmp:
        for profile in profiles:
            write_chest_site(generate_chest_site(profile, seed), tmp / profile.name, seed)
    return profiles
