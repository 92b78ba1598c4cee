"""Brain-MRI-like 2D phantoms whose lesion appearance across four sequences encodes a class.

The physics is deliberately simple (tissue maps times per-sequence intensities, a smooth
bias field and Rician noise) but the *diagnostic logic* follows real neuroradiology, so the
task needs all sequences together:

- high-grade glioma: ring enhancement on T1ce, necrotic core, large FLAIR/T2 oedema;
- low-grade glioma: T2/FLAIR hyperintense, little or no enhancement, small oedema;
- cyst: CSF-like (T1 dark, T2 very bright) and *suppressed* on FLAIR, no oedema.

Every class-defining parameter is drawn from overlapping class-conditional distributions, so
the Bayes accuracy is well below 100% and learning is visible over several rounds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SEQUENCES: tuple[str, ...] = ("T1", "T1ce", "T2", "FLAIR")
CLASS_NAMES: tuple[str, ...] = ("high_grade_glioma", "low_grade_glioma", "cyst")

# Tissue intensities per sequence (arbitrary MR units): background, scalp, brain, CSF.
_TISSUE = {
    "T1": (0.0, 700.0, 480.0, 160.0),
    "T1ce": (0.0, 720.0, 490.0, 170.0),
    "T2": (0.0, 380.0, 420.0, 900.0),
    "FLAIR": (0.0, 420.0, 440.0, 110.0),
}


@dataclass(frozen=True)
class LesionParams:
    """What a radiologist would read off the images; drives both pixels and report text."""

    label: int
    cx: float               # lesion centre, normalised coordinates in [-1, 1]
    cy: float
    radius: float           # core radius, normalised
    enhancement: float      # T1ce rim gain (0 = none)
    necrosis: float         # fraction of core signal lost in the centre on T1ce
    oedema: float           # oedema radius / core radius (1 = none)
    t1_core: float          # core intensity relative to brain
    t2_core: float
    flair_core: float


@dataclass(frozen=True)
class Scanner:
    """Per-site acquisition differences: gain, noise, bias field strength."""

    gain: tuple[float, float, float, float]
    noise_sigma: float
    bias_strength: float


# Multi-label findings a radiologist reads off the images (``findings.csv``), by threshold on
# what is rendered: a T1ce rim gain, central signal loss on T1ce, oedema well beyond the core.
FINDING_NAMES: tuple[str, ...] = ("contrast_enhancement", "necrosis", "oedema")


def findings(lesion: LesionParams) -> tuple[str, ...]:
    """The findings present in a lesion (a pure function of its parameters)."""
    present = (lesion.enhancement >= 0.3, lesion.necrosis >= 0.35, lesion.oedema >= 1.5)
    return tuple(name for name, yes in zip(FINDING_NAMES, present) if yes)


def sample_lesion(label: int, rng: np.random.Generator) -> LesionParams:
    """Draw lesion parameters from overlapping class-conditional distributions."""
    angle = rng.uniform(0, 2 * np.pi)
    dist = rng.uniform(0.25, 0.55)
    radius = rng.uniform(0.16, 0.28)
    if label == 0:     # high-grade glioma
        enh, nec, oed = rng.normal(0.55, 0.35), rng.uniform(0.2, 0.6), rng.uniform(1.4, 2.2)
        t1, t2, fl = rng.normal(0.75, 0.1), rng.normal(1.55, 0.25), rng.normal(1.45, 0.3)
    elif label == 1:   # low-grade glioma
        enh, nec, oed = rng.normal(0.15, 0.2), 0.0, rng.uniform(1.0, 1.6)
        t1, t2, fl = rng.normal(0.78, 0.1), rng.normal(1.6, 0.25), rng.normal(1.45, 0.3)
    else:              # cyst
        enh, nec, oed = rng.normal(0.05, 0.15), 0.0, rng.uniform(1.0, 1.2)
        t1, t2, fl = rng.normal(0.5, 0.15), rng.normal(1.85, 0.3), rng.normal(0.75, 0.4)
    return LesionParams(
        label=label, cx=float(dist * np.cos(angle)), cy=float(dist * np.sin(angle)),
        radius=float(radius), enhancement=float(max(enh, 0.0)), necrosis=float(nec),
        oedema=float(oed), t1_core=float(max(t1, 0.1)), t2_core=float(max(t2, 0.2)),
        flair_core=float(max(fl, 0.1)),
    )


def _soft_disc(d: np.ndarray, r: float, width: float = 0.025) -> np.ndarray:
    """1 inside radius r, 0 outside, with a smooth edge (avoids aliasing at 64x64)."""
    return 1.0 / (1.0 + np.exp((d - r) / width))


def _smooth_field(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Low-frequency random field in [-1, 1] from a few random cosines."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    field = np.zeros((size, size))
    for _ in range(4):
        fx, fy, ph = rng.uniform(0.3, 1.5), rng.uniform(0.3, 1.5), rng.uniform(0, 2 * np.pi)
        field += np.cos(2 * np.pi * (fx * xx + fy * yy) + ph)
    return scale * field / 4.0


def render_study(
    lesion: LesionParams, scanner: Scanner, rng: np.random.Generator, size: int = 64
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Render one study: ``({sequence: [H, W] float image}, lesion mask [H, W] uint8)``."""
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    a, b = rng.uniform(0.78, 0.88), rng.uniform(0.68, 0.78)
    head = np.sqrt((xx / a) ** 2 + (yy / b) ** 2)
    scalp = _soft_disc(head, 1.0) - _soft_disc(head, 0.88)
    brain = _soft_disc(head, 0.88)
    vx, vy = rng.uniform(0.10, 0.16), rng.uniform(0.18, 0.26)
    csf = np.maximum(
        _soft_disc(np.sqrt(((xx - 0.12) / vx) ** 2 + (yy / vy) ** 2), 1.0, 0.1),
        _soft_disc(np.sqrt(((xx + 0.12) / vx) ** 2 + (yy / vy) ** 2), 1.0, 0.1),
    ) * brain
    parenchyma = brain - csf
    texture = 1.0 + _smooth_field(rng, size, 0.08)       # grey/white matter mix

    d = np.sqrt((xx - lesion.cx) ** 2 + (yy - lesion.cy) ** 2)
    core = _soft_disc(d, lesion.radius) * brain
    inner = _soft_disc(d, lesion.radius * 0.6) * brain
    rim = np.clip(core - inner, 0, 1)
    oedema = np.clip(_soft_disc(d, lesion.radius * lesion.oedema, 0.05) * brain - core, 0, 1)
    bias = 1.0 + _smooth_field(rng, size, scanner.bias_strength)

    images = {}
    for s, seq in enumerate(SEQUENCES):
        bg, sc, br, cf = _TISSUE[seq]
        base = bg + sc * scalp + br * parenchyma * texture + cf * csf
        core_gain = {"T1": lesion.t1_core, "T1ce": lesion.t1_core,
                     "T2": lesion.t2_core, "FLAIR": lesion.flair_core}[seq]
        oedema_gain = {"T1": -0.12, "T1ce": -0.12, "T2": 0.45, "FLAIR": 0.4}[seq]
        img = base * (1 - core) + br * core_gain * core
        img = img * (1 + oedema_gain * oedema)
        if seq == "T1ce":
            img = img + br * lesion.enhancement * rim - br * core_gain * lesion.necrosis * inner
        img = np.clip(img, 0, None) * bias * scanner.gain[s]
        n1 = rng.normal(0, scanner.noise_sigma, img.shape)
        n2 = rng.normal(0, scanner.noise_sigma, img.shape)
        images[seq] = np.sqrt((img + n1) ** 2 + n2**2)     # magnitude image: Rician noise
    mask = (core > 0.5).astype(np.uint8)
    return images, mask
