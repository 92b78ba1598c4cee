"""Synthetic chest-radiograph hospitals (layout ``chest_xray``): real DICOM CR/DX files, labels
and reports, deterministic in the seed.

Each study has a frontal view (PA, or AP for part of a site's patients) and, for part of them,
a lateral view. The diagnostic logic follows chest radiology, in a deliberately simple phantom
(body, lungs, heart, spine, ribs, noise):

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

import csv
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                         ExplicitVRLittleEndian, generate_uid)

from .reports import fake_phi
from .sites import INSTITUTIONS, _file_name

CLASS_NAMES: tuple[str, ...] = ("no_finding", "consolidation", "effusion")
VIEWS = ("frontal", "lateral")
_SOP = {"CR": ComputedRadiographyImageStorage, "DX": DigitalXRayImageStorageForPresentation}
# (frontal, lateral) SeriesDescription per vendor convention; ViewPosition decides, not these.
_NAMING = (("CHEST {view}", "CHEST LAT"), ("{view} CHEST", "LATERAL"),
           ("Thorax {view}", "Thorax lat"))


@dataclass(frozen=True)
class ChestProfile:
    """How one synthetic radiology department differs from the others."""

    index: int
    name: str
    institution: str
    n_patients: int
    class_probs: tuple[float, ...]
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


@dataclass(frozen=True)
class Finding:
    """What a radiologist would read off the films; drives both pixels and report text."""

    label: int
    side: int                      # -1: right lung (image left), +1: left lung
    zone: float                    # consolidation: vertical centre in the lung, 0 top .. 1 base
    size: float                    # consolidation sigma / effusion height (lung fraction)
    amplitude: float               # added density (display units)
    faint: float = 0.0             # no_finding: a faint incidental density (0 = none)


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


@dataclass
class ChestSite:
    profile: ChestProfile
    studies: list[ChestStudy] = field(default_factory=list)


def make_chest_profiles(n_sites: int, seed: int, *, alpha: float = 2.0, patients: int = 60,
                        external: bool = False, label_fraction: float = 0.5) -> list[ChestProfile]:
    """Deterministic profiles; site 2 (or the last) labels only ``label_fraction`` of its
    studies, site 1 exports junk beside its films."""
    if n_sites < 1:
        raise ValueError(f"need at least one site, got {n_sites}")
    rng = np.random.default_rng([seed, 21])
    profiles = []
    for i in range(n_sites + int(external)):
        is_external = i == n_sites
        probs = rng.dirichlet([alpha] * len(CLASS_NAMES))
        if is_external:
            probs = np.full(len(CLASS_NAMES), 1 / len(CLASS_NAMES))
        modality = ("CR", "DX")[i % 2]
        profiles.append(ChestProfile(
            index=i, name="external" if is_external else f"site-{i}",
            institution=INSTITUTIONS[(i + 2) % len(INSTITUTIONS)],
            n_patients=max(4, int(round(patients * rng.uniform(0.7, 1.3)))),
            class_probs=tuple(float(p) for p in probs), modality=modality,
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


def sample_finding(label: int, rng: np.random.Generator) -> Finding:
    """Class-conditional parameters with overlapping amplitudes (the task is not trivial)."""
    side = int(rng.choice([-1, 1]))
    if label == 0:
        faint = float(rng.uniform(0.04, 0.12)) if rng.random() < 0.3 else 0.0
        return Finding(0, side, float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.05, 0.1)),
                       0.0, faint)
    if label == 1:
        return Finding(1, side, float(rng.uniform(0.15, 0.9)), float(rng.uniform(0.08, 0.16)),
                       float(rng.uniform(0.08, 0.3)))
    return Finding(2, side, 1.0, float(rng.uniform(0.12, 0.35)), float(rng.uniform(0.08, 0.28)))


def _grid(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n) + 0.5) / n * 2 - 1
    return np.meshgrid(c, c, indexing="ij")          # y (rows, head -> feet), x (columns)


def _ellipse(y, x, cy, cx, ry, rx) -> np.ndarray:
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def _smooth_noise(rng: np.random.Generator, n: int, cells: int = 8) -> np.ndarray:
    """Low-frequency texture in [0, 1] (bilinear upsampling of a coarse random grid)."""
    coarse = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, n)
    i0 = np.minimum(t.astype(int), cells - 1)
    f = t - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None] + rows[:, i0 + 1] * f[None]


def render_frontal(finding: Finding, n: int, rng: np.random.Generator) -> np.ndarray:
    """Frontal film as density in [0, 1] (bone bright, air dark), patient's right on the
    image's left as a radiologist reads it."""
    y, x = _grid(n)
    d = np.where(_ellipse(y, x, 0.05, 0, 1.0, 0.9), 0.45, 0.02)
    lungs = []
    for side in (-1, 1):
        lung = _ellipse(y, x, -0.08, side * 0.4, 0.58, 0.3)
        lungs.append(lung)
        d = np.where(lung, 0.14, d)
    ribs = 0.06 * (np.sin((y + 0.25 * np.abs(x)) * 28) > 0.6)
    d = d + ribs * (lungs[0] | lungs[1])
    d = np.where(_ellipse(y, x, 0.25, 0.08, 0.3, 0.24), 0.58, d)           # heart
    d = np.where(np.abs(x) < 0.06, np.maximum(d, 0.7), d)                    # spine
    lung = lungs[0] if finding.side < 0 else lungs[1]
    cx = finding.side * 0.4
    if finding.label == 1:
        cy = -0.08 - 0.58 + 2 * 0.58 * finding.zone * 0.9
        blob = np.exp(-(((y - cy) ** 2 + ((x - cx - rng.uniform(-0.1, 0.1)) ** 2))
                        / (2 * finding.size ** 2)))
        d = d + finding.amplitude * blob * (0.6 + 0.8 * _smooth_noise(rng, n, 12)) * lung
    elif finding.label == 2:
        base = -0.08 + 0.58
        # meniscus: the fluid line climbs towards the lateral chest wall
        level = base - 2 * 0.58 * finding.size + 0.2 * finding.size * (1 - np.abs(x - cx) / 0.3)
        d = d + finding.amplitude * (y > level) * lung * np.clip((y - level) * 12, 0, 1)
    elif finding.faint:
        blob = np.exp(-((y - rng.uniform(-0.4, 0.3)) ** 2 + (x - cx) ** 2) / (2 * 0.06 ** 2))
        d = d + finding.faint * blob * lung
    return d


def render_lateral(finding: Finding, n: int, rng: np.random.Generator) -> np.ndarray:
    """Lateral film: one lung field; an effusion fills the posterior costophrenic recess."""
    y, x = _grid(n)
    d = np.where(_ellipse(y, x, 0.05, 0, 1.0, 0.75), 0.45, 0.02)
    lung = _ellipse(y, x, -0.05, 0.0, 0.62, 0.5)
    d = np.where(lung, 0.16, d)
    d = np.where(_ellipse(y, x, 0.25, -0.2, 0.28, 0.25), 0.5, d)             # heart, anterior
    d = np.where(np.abs(x - 0.62) < 0.07, np.maximum(d, 0.7), d)             # spine, posterior
    if finding.label == 1:
        cy = -0.05 - 0.62 + 2 * 0.62 * finding.zone * 0.9
        blob = np.exp(-(((y - cy) ** 2 + (x - rng.uniform(-0.2, 0.2)) ** 2)
                        / (2 * finding.size ** 2)))
        d = d + finding.amplitude * blob * (0.6 + 0.8 * _smooth_noise(rng, n, 12)) * lung
    elif finding.label == 2:
        level = 0.57 - 2 * 0.62 * finding.size * (0.4 + 0.6 * (x + 1) / 2)   # deeper posteriorly
        d = d + finding.amplitude * (y > level) * lung
    return d


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
                     f"(accession ACC{int(rng.integers(10**7, 10**8))}).")
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
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    phi = study.phi
    ds.PatientName = phi["PatientName"]
    ds.PatientID = phi["PatientID"]
    ds.PatientBirthDate = phi["PatientBirthDate"]
    ds.PatientSex = phi["PatientSex"]
    ds.ReferringPhysicianName = phi["ReferringPhysicianName"]
    ds.InstitutionName = profile.institution
    ds.AccessionNumber = accession
    ds.StudyDate = f"2024{(study.patient_index % 12) + 1:02d}{(study.patient_index % 27) + 1:02d}"
    ds.StudyTime = "141500"
    ds.StudyDescription = "XR CHEST 2 VIEWS" if len(study.views) > 1 else "XR CHEST 1 VIEW"
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
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = profile.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored = 16, profile.bits
    ds.HighBit, ds.PixelRepresentation = profile.bits - 1, 0
    top = 2 ** profile.bits
    ds.WindowCenter, ds.WindowWidth = top // 2, top       # the full detector range
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def write_chest_site(site: ChestSite, out: Path, seed: int) -> None:
    """DICOM files (opaque names), ``labels.csv`` and ``reports.jsonl`` of one site."""
    dicom_dir = out / "dicom"
    dicom_dir.mkdir(parents=True)
    rng = np.random.default_rng([seed, 23, site.profile.index])
    for study in site.studies:
        accession = f"ACC{int(rng.integers(10**7, 10**8))}"
        for view, (position, pixels) in study.views.items():
            ds = _dicom(site.profile, study, view, position, pixels, seed, accession)
            ds.save_as(dicom_dir / _file_name(ds.SOPInstanceUID), enforce_file_format=True)
    if site.profile.junk_files and site.studies:
        _write_junk(site, dicom_dir, seed)
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study_instance_uid", "label"])
        for study in site.studies:
            writer.writerow([study.study_uid, CLASS_NAMES[study.label] if study.labelled else ""])
    with open(out / "reports.jsonl", "w") as f:
        for study in site.studies:
            row = {"study_instance_uid": study.study_uid, "text": study.report}
            f.write(json.dumps(row) + "\n")


def _write_junk(site: ChestSite, dicom_dir: Path, seed: int) -> None:
    """What a radiology export holds besides chest films: a C-spine AP film of the same
    patient (CR/DX + AP, but not the chest: the layout's BodyPartExamined rule skips it) and
    a dose report (no pixels)."""
    study = site.studies[0]
    position, pixels = study.views["frontal"]
    spine = _dicom(site.profile, study, "frontal", "AP", pixels, seed, "ACC0", body_part="CSPINE")
    spine.save_as(dicom_dir / _file_name(spine.SOPInstanceUID), enforce_file_format=True)
    sr = _dicom(site.profile, study, "lateral", position, pixels, seed, "ACC0", body_part="SR")
    del sr.PixelData
    sr.BodyPartExamined, sr.SeriesDescription = "CHEST", "Dose report"
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"
    sr.Modality = "SR"
    sr.save_as(dicom_dir / _file_name("sr" + study.study_uid), enforce_file_format=True)


def synthesize_chest(out: Path, *, n_sites: int, seed: int, alpha: float = 2.0,
                     patients: int = 60, external: bool = False,
                     label_fraction: float = 0.5) -> list[ChestProfile]:
    """Write all sites under ``out`` atomically: a failure leaves nothing half-written."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output directory {out} exists and is not empty; choose another")
    profiles = make_chest_profiles(n_sites, seed, alpha=alpha, patients=patients,
                                   external=external, label_fraction=label_fraction)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for profile in profiles:
            write_chest_site(generate_chest_site(profile, seed), tmp / profile.name, seed)
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return profiles
