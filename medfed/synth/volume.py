"""Synthetic DICOM volumes with known geometry, for readers that must get geometry right.

A :class:`SyntheticVolume` is a known array ``[Z, Y, X]`` laid out along an oblique orientation
with non-unit spacing and per-slice rescale slope/intercept. It is written either as a
single-frame series — files in shuffled order with shuffled InstanceNumber, so only
ImagePositionPatient can order them — or as one enhanced multi-frame file whose frames are
shuffled too. Variants break the geometry on purpose: a gantry tilt, a missing slice, an
irregular gap. Names, IDs and dates are fake PHI, present so tests can prove none leaks.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (CTImageStorage, EnhancedCTImageStorage, EnhancedMRImageStorage,
                         MRImageStorage, generate_uid)

from .hospital import new_dataset, set_patient
from .reports import fake_phi

_SOP = {("CT", False): CTImageStorage, ("CT", True): EnhancedCTImageStorage,
        ("MR", False): MRImageStorage, ("MR", True): EnhancedMRImageStorage}


@dataclass(frozen=True)
class VolumeSpec:
    """Geometry and encoding of one synthetic volume (all lengths in mm, LPS)."""

    shape: tuple[int, int, int] = (9, 14, 11)                # (Z, Y, X)
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.6)    # (dz, dy, dx)
    angles_deg: tuple[float, float, float] = (20.0, -15.0, 30.0)   # about x, y, z: oblique
    origin: tuple[float, float, float] = (-80.0, -95.5, 40.25)     # IPP of slice 0
    modality: str = "CT"
    slopes: tuple[float, ...] = (1.0, 0.5, 2.0)              # cycled over slices
    intercepts: tuple[float, ...] = (-1024.0, -512.0, 0.0)   # powers of two: exact in float32
    tilt_deg: float = 0.0          # slices advance this far off their normal (gantry tilt)
    missing: tuple[int, ...] = ()  # slice indices not written
    displace: tuple[tuple[int, float], ...] = ()   # (slice, mm along the normal): irregular gap

    def __post_init__(self):
        if self.modality not in ("CT", "MR"):
            raise ValueError(f"modality must be CT or MR, got {self.modality!r}")
        if min(self.shape) < 1 or min(self.spacing) <= 0:
            raise ValueError("shape and spacing must be positive")


@dataclass
class SyntheticVolume:
    """What was written, so a reader's result can be compared voxel by voxel."""

    spec: VolumeSpec
    stored: np.ndarray             # [Z, Y, X] uint16, as in PixelData
    slopes: np.ndarray             # [Z]
    intercepts: np.ndarray         # [Z]
    row: np.ndarray                # [3] cosine of increasing column index, as written
    column: np.ndarray             # [3] cosine of increasing row index, as written
    positions: np.ndarray          # [Z, 3] ImagePositionPatient, as written
    phi: dict[str, str]
    study_uid: str
    series_uid: str

    @property
    def physical(self) -> np.ndarray:
        """``[Z, Y, X]`` float32 values after the modality LUT, slice ``k`` along the normal."""
        values = self.stored.astype(np.float64) * self.slopes[:, None, None]
        return (values + self.intercepts[:, None, None]).astype(np.float32)

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row, self.column)
        return n / np.linalg.norm(n)

    @property
    def present(self) -> list[int]:
        """Slice indices that are written (all but ``spec.missing``)."""
        return [k for k in range(self.spec.shape[0]) if k not in self.spec.missing]


def _rotation(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation ``Rz @ Ry @ Rx``; its columns are the row, column and normal cosines."""
    ax, ay, az = (math.radians(a) for a in angles_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_volume(spec: VolumeSpec = VolumeSpec(), seed: int = 0) -> SyntheticVolume:
    """A random volume (every voxel distinct enough that a misplaced slice shows)."""
    rng = np.random.default_rng([seed, 11])
    z, y, x = spec.shape
    stored = rng.integers(0, 4096, size=spec.shape, dtype=np.uint16)
    slopes = np.array([spec.slopes[k % len(spec.slopes)] for k in range(z)], dtype=np.float64)
    intercepts = np.array([spec.intercepts[k % len(spec.intercepts)] for k in range(z)], np.float64)
    rot = _rotation(spec.angles_deg)
    # written with 6 decimals, as a vendor would; the reader sees these, not the exact ones
    row, column = np.round(rot[:, 0], 6), np.round(rot[:, 1], 6)
    normal = rot[:, 2]
    tilt = math.radians(spec.tilt_deg)
    advance = math.cos(tilt) * normal + math.sin(tilt) * rot[:, 1]     # tilted towards column
    offsets = dict(spec.displace)
    positions = np.array([np.asarray(spec.origin) + (k * spec.spacing[0] + offsets.get(k, 0.0))
                          * advance for k in range(z)])
    uid = generate_uid(entropy_srcs=[str(seed), repr(spec)])
    return SyntheticVolume(spec, stored, slopes, intercepts, row, column, np.round(positions, 5),
                           fake_phi(rng, 0, seed), generate_uid(entropy_srcs=[uid, "study"]),
                           generate_uid(entropy_srcs=[uid, "series"]))


def _ds(values) -> list[str]:
    return [f"{float(v):.6f}".rstrip("0").rstrip(".") for v in values]


def _base(vol: SyntheticVolume, sop_class: str, sop_uid: str) -> Dataset:
    """Header shared by the single-frame files and the enhanced file (image pixel module)."""
    ds = new_dataset(sop_class, sop_uid)
    set_patient(ds, vol.phi)
    ds.AccessionNumber = "ACC" + vol.phi["PatientID"][-6:]
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = vol.study_uid, vol.series_uid
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[vol.study_uid, "for"])
    ds.Modality = vol.spec.modality
    ds.SeriesDescription = "SYNTHETIC OBLIQUE VOLUME"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = vol.spec.shape[1:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def series_datasets(vol: SyntheticVolume, seed: int = 0) -> list[Dataset]:
    """One single-frame dataset per present slice, in shuffled order, InstanceNumber shuffled."""
    rng = np.random.default_rng([seed, 12])
    present = vol.present
    instance = rng.permutation(len(present)) + 1
    out = []
    for n, k in enumerate(present):
        ds = _base(vol, _SOP[(vol.spec.modality, False)],
                   generate_uid(entropy_srcs=[vol.series_uid, str(k)]))
        ds.InstanceNumber = int(instance[n])
        ds.ImagePositionPatient = _ds(vol.positions[k])
        ds.ImageOrientationPatient = _ds(np.concatenate([vol.row, vol.column]))
        ds.PixelSpacing = _ds(vol.spec.spacing[1:])
        ds.SliceThickness = _ds([vol.spec.spacing[0]])[0]
        ds.RescaleSlope, ds.RescaleIntercept = _ds([vol.slopes[k], vol.intercepts[k]])
        ds.RescaleType = "HU" if vol.spec.modality == "CT" else "US"
        ds.PixelData = vol.stored[k].astype("<u2").tobytes()
        out.append(ds)
    return [out[i] for i in rng.permutation(len(out))]


def _item(**elements) -> Sequence:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return Sequence([item])


def enhanced_dataset(vol: SyntheticVolume, seed: int = 0) -> Dataset:
    """The present slices as one enhanced multi-frame dataset, frames in shuffled order."""
    rng = np.random.default_rng([seed, 13])
    frames = [vol.present[i] for i in rng.permutation(len(vol.present))]
    ds = _base(vol, _SOP[(vol.spec.modality, True)],
               generate_uid(entropy_srcs=[vol.series_uid, "enhanced"]))
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    shared.PlaneOrientationSequence = _item(
        ImageOrientationPatient=_ds(np.concatenate([vol.row, vol.column])))
    shared.PixelMeasuresSequence = _item(PixelSpacing=_ds(vol.spec.spacing[1:]),
                                         SliceThickness=_ds([vol.spec.spacing[0]])[0])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for n, k in enumerate(frames):
        item = Dataset()
        item.PlanePositionSequence = _item(ImagePositionPatient=_ds(vol.positions[k]))
        slope, intercept = _ds([vol.slopes[k], vol.intercepts[k]])
        item.PixelValueTransformationSequence = _item(RescaleSlope=slope,
                                                      RescaleIntercept=intercept,
                                                      RescaleType="US")
        item.FrameContentSequence = _item(InStackPositionNumber=n + 1)   # decoy: frame order
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = np.stack([vol.stored[k] for k in frames]).astype("<u2").tobytes()
    return ds


def write_datasets(datasets: list[Dataset], out_dir: Path) -> list[Path]:
    """Save datasets under opaque names (a hash of the SOP instance UID), in the given order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out_dir / (hashlib.sha256(str(ds.SOPInstanceUID).encode()).hexdigest()[:16] + ".dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
