"""The chest phantom of layout ``chest_xray``: what a finding is and how a frontal or lateral
film of it looks, as density in [0, 1] (bone bright, air dark) before a detector sees it.

Body, lungs, heart, spine, ribs; the finding drawn into one lung:

- ``no_finding`` (0): clear lungs, now and then a faint nodule-like density (overlap, on purpose);
- ``consolidation`` (1): a patchy, mottled opacity in one lung zone, seen on both views;
- ``effusion`` (2): a dependent opacity at a lung base with a meniscus that blunts the
  costophrenic angle, posterior on the lateral view.

Amplitudes are drawn from overlapping ranges, so the task is not trivial.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Finding:
    """What a radiologist would read off the films; drives both pixels and report text."""

    label: int
    side: int                      # -1: right lung (image left), +1: left lung
    zone: float                    # consolidation: vertical centre in the lung, 0 top .. 1 base
    size: float                    # consolidation sigma / effusion height (lung fraction)
    amplitude: float               # added density (display units)
    faint: float = 0.0             # no_finding: a faint incidental density (0 = none)



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
