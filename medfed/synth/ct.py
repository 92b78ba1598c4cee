"""Synthetic abdominal CT departments (layout ``ct_volume``): real DICOM CT series with the
geometry of :mod:`medfed.synth.volume`, labels per study, deterministic in the seed.

Each study is one CT volume of a simple torso phantom in patient (LPS) millimetres — body with a
fat rim, lungs at the top, liver on the patient's right, stomach gas on the left, spine at
the back — sampled on the
site's own grid, so an oblique site sees the same anatomy tilted. The label is what a
radiologist would call a focal liver lesion:

- ``no_lesion``: homogeneous liver (now and then a faint inhomogeneity: overlap, on purpose);
- ``hyperdense_lesion``: one to four round foci brighter than the liver (enhancing lesions);
- ``hypodense_lesion``: one to four round foci darker than the liver (cysts, metastases).

Lesion size and contrast come from overlapping ranges and every voxel carries scanner noise, so
the task is learnable over rounds without saturating in the first. Sites differ as hospitals
do: slice thickness, pixel spacing, an oblique acquisition, RescaleSlope/RescaleIntercept
(changing from slice to slice at one site), single-frame files in shuffled order or one
enhanced multi-frame file, noise, an HU calibration offset, and label mix (Dirichlet). One site
exported a series with a missing slice: the reader must skip it with that reason. Headers carry
fake PHI (names, IDs, dates, accession numbers) so the reader's de-identification is exercised.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .hospital import (INSTITUTIONS, HospitalProfile, Site, atomic_output, class_mix, empty_output,
                       set_study, site_indices, site_name, write_labels)
from .reports import fake_accession, fake_phi
from .volume import (SyntheticVolume, VolumeSpec, _rotation, enhanced_dataset, make_volume,
                     series_datasets, write_datasets)

CLASS_NAMES: tuple[str, ...] = ("no_lesion", "hyperdense_lesion", "hypodense_lesion")
FOV_MM = 128.0                   # field of view along each axis, centred on the phantom
_AIR, _FAT, _TISSUE, _LUNG, _LIVER, _BONE = -1000.0, -100.0, 40.0, -850.0, 60.0, 700.0
_LIVER_C, _LIVER_R = np.array([-30.0, 0.0, -25.0]), np.array([58.0, 52.0, 40.0])
# (slopes, intercepts) cycled over slices: the modality LUT the reader must apply per slice
_RESCALES = (((1.0,), (-1024.0,)), ((0.5, 1.0), (-1024.0, -1024.0)), ((2.0,), (-2048.0,)))
_NAMING = ("ABD CT 5MM AXIAL", "Abdomen w/o contrast", "CT ABDOMEN PORTAL")


@dataclass(frozen=True)
class CTProfile(HospitalProfile):
    """How one synthetic CT department differs from the others."""

    thickness: float              # slice spacing, mm
    pixel_mm: float               # in-plane spacing, mm
    angles_deg: tuple[float, float, float]   # acquisition rotation (0: plain axial)
    rescale: int                  # index into _RESCALES
    enhanced: bool                # one enhanced multi-frame file per series
    noise: float                  # HU, per voxel
    hu_shift: float               # scanner calibration offset, HU
    label_fraction: float = 1.0
    broken_series: bool = False   # the first study's series lacks a slice (skipped by reason)

    @property
    def shape(self) -> tuple[int, int, int]:
        n_xy = int(round(FOV_MM / self.pixel_mm))
        return (int(round(FOV_MM / self.thickness)), n_xy, n_xy)


@dataclass(frozen=True)
class Lesion:
    """One to four round foci of the same kind in the liver (e.g. metastases or cysts)."""

    label: int
    centers: tuple[tuple[float, float, float], ...]    # LPS mm
    radii: tuple[float, ...]                           # mm
    contrast: float                                    # HU relative to the liver (signed)


@dataclass
class CTStudy:
    """One generated study, kept so tests can compare what a reader gets back."""

    patient_index: int
    label: int
    labelled: bool
    lesion: Lesion
    volume: SyntheticVolume               # stored pixels, geometry, UIDs and PHI as written
    broken: bool = False


class CTSite(Site[CTProfile, CTStudy]):
    """A CT department in memory."""


def make_ct_profiles(n_sites: int, seed: int, *, alpha: float = 2.0, patients: int = 30,
                     external: bool = False, label_fraction: float = 1.0) -> list[CTProfile]:
    """Deterministic profiles: site 1 writes enhanced multi-frame files, site 2 (or the last)
    acquires obliquely and labels ``label_fraction`` of its studies, site 0 exported one
    series with a missing slice."""
    rng = np.random.default_rng([seed, 31])
    profiles = []
    for i in site_indices(n_sites, external):
        is_external = i == n_sites
        probs = class_mix(rng, alpha, len(CLASS_NAMES), external=is_external)
        oblique = i % 3 == 2
        angles = tuple(float(a) for a in rng.uniform(-10, 10, 3)) if oblique else (0.0, 0.0, 0.0)
        profiles.append(CTProfile(
            index=i, name=site_name(i, n_sites),
            institution=INSTITUTIONS[(i + 1) % len(INSTITUTIONS)],
            n_patients=max(4, int(round(patients * rng.uniform(0.8, 1.2)))),
            class_probs=probs,
            thickness=float(rng.choice([3.2, 4.0, 5.0])), pixel_mm=float(rng.choice([2.0, 2.5, 3.2])),
            angles_deg=angles, rescale=i % len(_RESCALES), enhanced=i % 3 == 1,
            noise=float(rng.uniform(10, 20)), hu_shift=float(rng.uniform(-8, 8)),
            label_fraction=label_fraction if i == min(2, n_sites - 1) and not is_external else 1.0,
            broken_series=i == 0 and not is_external))
    return profiles


def sample_lesion(label: int, rng: np.random.Generator) -> Lesion:
    """Foci inside the liver; count, size and contrast ranges overlap across classes."""
    n = int(rng.integers(1, 5))
    centers = []
    for _ in range(n):
        u = rng.normal(size=3)
        u *= rng.uniform(0, 0.5) / np.linalg.norm(u)
        centers.append(tuple(float(v) for v in _LIVER_C + u * _LIVER_R))
    radii = tuple(float(r) for r in rng.uniform(6.0, 14.0, size=n))
    if label == 0:    # a faint inhomogeneity now and then: no lesion, but not a blank liver
        faint = float(rng.uniform(-12, 12)) if rng.random() < 0.3 else 0.0
        return Lesion(0, tuple(centers), radii, faint)
    contrast = float(rng.uniform(30.0, 120.0))
    return Lesion(label, tuple(centers), radii, contrast if label == 1 else -contrast)


def _inside(p: np.ndarray, center, radii) -> np.ndarray:
    """Inside an axis-aligned ellipsoid (or cylinder: None radius along an axis)."""
    q = sum(((p[..., a] - center[a]) / radii[a]) ** 2 for a in range(3) if radii[a] is not None)
    return q <= 1.0


def phantom_hu(points: np.ndarray, lesion: Lesion) -> np.ndarray:
    """HU of the torso phantom at LPS points ``[..., 3]`` (mm), without noise."""
    hu = np.full(points.shape[:-1], _AIR)
    hu[_inside(points, (0, 0, 0), (120, 90, None))] = _FAT
    hu[_inside(points, (0, 0, 0), (110, 80, None))] = _TISSUE
    hu[_inside(points, (-50, 0, 45), (40, 55, 45))] = _LUNG
    hu[_inside(points, (50, 0, 45), (38, 55, 45))] = _LUNG
    liver = _inside(points, _LIVER_C, _LIVER_R)
    hu[liver] = _LIVER
    hu[_inside(points, (0, 55, 0), (13, 13, None))] = _BONE
    hu[_inside(points, (55, -30, -15), (22, 18, 14))] = _AIR     # gas in the stomach (left)
    # foci with a soft (1.5 mm) edge, inside the liver only
    weight = np.zeros(points.shape[:-1])
    for center, radius in zip(lesion.centers, lesion.radii):
        d = np.linalg.norm(points - np.asarray(center), axis=-1)
        weight = np.maximum(weight, 1.0 / (1.0 + np.exp(np.clip((d - radius) / 1.5, -50, 50))))
    return hu + liver * weight * lesion.contrast


def _voxel_points(vol: SyntheticVolume) -> np.ndarray:
    """``[Z, Y, X, 3]`` LPS position of every voxel, from the geometry as written."""
    dz, dy, dx = vol.spec.spacing
    j = np.arange(vol.spec.shape[1])[None, :, None, None] * dy * vol.column
    i = np.arange(vol.spec.shape[2])[None, None, :, None] * dx * vol.row
    return vol.positions[:, None, None, :] + j + i


def render_study(profile: CTProfile, lesion: Lesion, rng: np.random.Generator, *,
                 uid_seed: int, broken: bool = False) -> SyntheticVolume:
    """The study's series: the phantom on the site's grid, noise, stored through the site's
    rescale (stored = (HU - intercept) / slope, per slice)."""
    shape, thickness = profile.shape, profile.thickness
    spacing = (thickness, profile.pixel_mm, profile.pixel_mm)
    rot = _rotation(profile.angles_deg)        # columns: row, column, normal cosines
    half = np.array([(shape[2] - 1) * spacing[2], (shape[1] - 1) * spacing[1],
                     (shape[0] - 1) * spacing[0]]) / 2
    origin = tuple(float(v) for v in -(rot @ half))          # the FOV centred on the phantom
    slopes, intercepts = _RESCALES[profile.rescale]
    spec = VolumeSpec(shape=shape, spacing=spacing, angles_deg=profile.angles_deg, origin=origin,
                      modality="CT", slopes=slopes, intercepts=intercepts,
                      missing=(shape[0] // 2,) if broken else ())
    vol = make_volume(spec, seed=uid_seed)
    hu = phantom_hu(_voxel_points(vol), lesion) + profile.hu_shift
    hu = np.clip(hu + rng.normal(0.0, profile.noise, size=hu.shape), -1024.0, 3000.0)
    stored = np.rint((hu - vol.intercepts[:, None, None]) / vol.slopes[:, None, None])
    return dataclasses.replace(vol, stored=np.clip(stored, 0, 65535).astype(np.uint16))


def generate_ct_site(profile: CTProfile, seed: int) -> CTSite:
    """A site in memory: studies with their stored volumes and labels."""
    rng = np.random.default_rng([seed, 32, profile.index])
    site = CTSite(profile)
    for p in range(profile.n_patients):
        label = int(rng.choice(len(CLASS_NAMES), p=profile.class_probs))
        labelled = bool(rng.random() < profile.label_fraction)
        lesion = sample_lesion(label, rng)
        broken = profile.broken_series and p == 0
        vol = render_study(profile, lesion, rng, broken=broken,
                           uid_seed=(seed % 10**6) * 10**5 + profile.index * 10**3 + p)
        vol = dataclasses.replace(vol, phi=fake_phi(rng, profile.index, p))
        site.studies.append(CTStudy(p, label, labelled, lesion, vol, broken))
    return site


def _finish(ds, profile: CTProfile, study: CTStudy, accession: str) -> None:
    """Department-level header fields a PACS export carries (institution, dates, naming)."""
    set_study(ds, institution=profile.institution, accession=accession,
              patient_index=study.patient_index, time="093000", description="CT ABDOMEN")
    ds.SeriesDescription = _NAMING[profile.index % len(_NAMING)]
    ds.SeriesNumber = 2
    ds.BodyPartExamined = "ABDOMEN"
    ds.Manufacturer = ("Siemens", "GE", "Philips")[profile.index % 3]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.KVP = "120"


def write_ct_site(site: CTSite, out: Path, seed: int) -> None:
    """DICOM files (opaque names, shuffled order) and ``labels.csv`` of one site."""
    dicom_dir = out / "dicom"
    dicom_dir.mkdir(parents=True)
    rng = np.random.default_rng([seed, 33, site.profile.index])
    for study in site.studies:
        accession = fake_accession(rng)
        datasets = [enhanced_dataset(study.volume, seed)] if site.profile.enhanced \
            else series_datasets(study.volume, seed)
        for ds in datasets:
            _finish(ds, site.profile, study, accession)
        write_datasets(datasets, dicom_dir)
    write_labels(out, ((study.volume.study_uid, CLASS_NAMES[study.label] if study.labelled else "")
                       for study in site.studies))


def synthesize_ct(out: Path, *, n_sites: int, seed: int, alpha: float = 2.0, patients: int = 30,
                  external: bool = False, label_fraction: float = 1.0) -> list[CTProfile]:
    """Write all sites under ``out`` atomically: a failure leaves nothing half-written."""
    out = empty_output(out)
    profiles = make_ct_profiles(n_sites, seed, alpha=alpha, patients=patients,
                                external=external, label_fraction=label_fraction)
    with atomic_output(out) as tmp:
        for profile in profiles:
            write_ct_site(generate_ct_site(profile, seed), tmp / profile.name, seed)
    return profiles
