"""Sample-level DP-SGD at a site: Poisson sampling, per-sample clipping, secure Gaussian noise.

What the accountant assumes is exactly what happens here: each step includes every training
sample independently with probability ``q`` (Poisson sampling, so batches vary in size and may
be empty), each sample's gradient is clipped to ``max_grad_norm``, and N(0, (sigma C)^2) noise
is added to the sum, which is divided by the *expected* batch size ``q n`` (Opacus'
``loss_reduction="mean"``). With ``head_clip_share`` the class head's part and the rest of
each gradient are clipped to bounds whose squares add up to ``C^2`` (the same sensitivity, so
the same noise and accounting). With ``augmentation_multiplicity`` k (De et al. 2022) a drawn
sample enters the step as k augmented views whose gradients are averaged *before* its clipping:
still one clipped vector of norm <= C per sample, so the same noise and accounting, with less
augmentation noise in what is clipped. Per-sample clipping comes from ``persample`` (one backward
pass), which the tests check against individual backward passes and against Opacus' own
GradSampleModule; ``bench/dp_overhead`` compares its cost with Opacus' hooks and ghost modes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from randomgen import AESCounter
from torch import nn

from models.task import StepOutput

from .noise import GaussianNoise
from .persample import PerSampleClipper, UnsupportedLayerError


def clipping_refusal(model: nn.Module) -> str | None:
    """Why exact per-sample clipping cannot cover every trainable parameter of ``model``
    (the clipper's own admission check, which names each uncovered layer), or None. Cheap: no
    hook is registered, nothing runs; a site asks it before a DP-SGD round is charged."""
    try:
        PerSampleClipper(model, 1.0)
    except UnsupportedLayerError as err:
        return str(err)
    return None


@dataclass(frozen=True)
class DPSGDConfig:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float              # q: each sample's inclusion probability per step
    secure_mode: bool = True        # CSPRNG noise and sampling; False only for reproducible tests
    seed: int = 0                   # used only when secure_mode is False
    allow_no_noise: bool = False    # only the audit's non-private baseline sets this
    head_clip_share: float | None = None   # per-group clipping (PerSampleClipper's head_share)
    augmentation_multiplicity: int = 1     # views per drawn sample, averaged before clipping
    # Only the audit sets this: exactly this many Poisson steps. A training round takes
    # local_epochs * int(1/q), the steps the site's ledger charges.
    steps: int | None = None

    def __post_init__(self):
        if not (self.noise_multiplier > 0 or (self.allow_no_noise
                                              and self.noise_multiplier == 0)):
            raise ValueError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.head_clip_share is not None and not 0 < self.head_clip_share < 1:
            raise ValueError(f"head_clip_share must be in (0, 1), got {self.head_clip_share}")
        k = self.augmentation_multiplicity
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"augmentation_multiplicity must be an integer >= 1, got {k!r}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1 (or None), got {self.steps}")


def steps_per_epoch(sample_rate: float) -> int:
    """Opacus' convention: an epoch is ``int(1/q)`` Poisson steps."""
    return max(1, int(1 / sample_rate))


def poisson_batches(n: int, sample_rate: float, steps: int, *, secure: bool,
                    seed: int = 0) -> Iterator[np.ndarray]:
    """``steps`` index arrays; each index included independently with probability q."""
    bits = AESCounter(key=int.from_bytes(os.urandom(16), "little")) if secure else seed
    rng = np.random.Generator(bits) if secure else np.random.default_rng(bits)
    for _ in range(steps):
        yield np.flatnonzero(rng.random(n) < sample_rate)


class PrivateGradients:
    """Writes the privatised gradient of one Poisson batch into ``p.grad``.

    Parameters
    ----------
    model : nn.Module
        Trained in place; every trainable parameter must have a per-sample rule.
    config : DPSGDConfig
    expected_batch_size : float
        ``q * n``; the noisy sum is divided by it (not by the realised batch size, which
        would leak how many samples were drawn).
    """

    def __init__(self, model: nn.Module, config: DPSGDConfig, expected_batch_size: float):
        self.model = model
        self.config = config
        self.expected_batch_size = float(expected_batch_size)
        self.clipper = PerSampleClipper(model, config.max_grad_norm, config.head_clip_share)
        self.noise = GaussianNoise(secure=config.secure_mode, seed=config.seed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        covered = set(self.clipper.parameters())
        if covered != set(self.params):     # guaranteed by PerSampleClipper; checked anyway
            raise RuntimeError("per-sample clipping does not cover every trainable parameter")

    def backward(self, loss_fn, extra: dict | None = None) -> StepOutput | None:
        """Run ``loss_fn() -> StepOutput`` (``None`` for an empty batch) with per-sample
        capture, then set every ``p.grad`` to ``(sum_i clip(g_i) + noise) / (q n)``. With
        augmentation multiplicity k the batch holds each sample's k views as consecutive rows
        and ``g_i`` is the mean of its views' gradients. ``loss_fn`` may be a list: the
        chunks of one Poisson batch (physical batches, each run and clipped on its own),
        whose clipped sums add up before the one noise draw - the same sum, in less memory.

        ``extra`` (the audit's canaries only): ``{param: summed gradients}`` of further samples
        whose gradients each have norm <= C already, added to the clipped sum before noise.
        """
        grads: dict = {}
        outs = []
        views = self.config.augmentation_multiplicity
        for chunk in loss_fn if isinstance(loss_fn, (list, tuple)) else [loss_fn]:
            with self.clipper.capture(views):
                out = chunk()
                if out is not None:
                    # Tasks return the mean of per-row losses; the clipped quantity is each
                    # sample's own gradient (the mean over its views), so differentiate the
                    # sum over samples of their views' mean.
                    (out.loss * (out.n / views)).backward()
            if out is not None:
                part, _ = self.clipper.clipped_sum()
                for p, value in part.items():
                    grads[p] = value if p not in grads else grads[p] + value
                outs.append(out)
        out = StepOutput.merge(outs)
        for p, value in (extra or {}).items():
            grads[p] = value.clone() if p not in grads else grads[p] + value
        std = self.config.noise_multiplier * self.config.max_grad_norm
        for p in self.params:           # noise added in place, each sum released as it is done
            total = grads.pop(p, None)
            if total is None:
                total = torch.zeros_like(p, memory_format=torch.contiguous_format)
            p.grad = self.noise.add_(total, std).div_(self.expected_batch_size)
        return out
