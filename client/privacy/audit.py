"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski 2023), white-box.

``m`` gradient canaries are each included with probability 1/2. An included canary behaves
like one more training sample of the real DP-SGD path: it is Poisson-sampled with rate ``q``
at every step, its per-sample gradient ``s_i C e_{k_i}`` (a random sign times the clipping
bound on its own coordinate ``k_i``) is clipped with the real samples and summed before the
noise. After training, canary ``i`` scores ``-s_i (theta_final - theta_init)[k_i]``: how far
the model moved in the direction that canary pushed it. The auditor guesses "in" for the top
scores and "out" for the bottom ones; ``onerun.best_lower_bound`` turns the correct guesses
into an epsilon lower bound at 95% confidence.

The bound holds for any correct (epsilon, delta)-DP implementation, so ``epsilon_lb >
accounted epsilon`` means the DP path is broken (noise off, clipping skipped, wrong
scaling). Without noise the canaries are found almost perfectly and the bound is large.
Gradient canaries are the strongest (white-box) adversary that DP-SGD's analysis allows;
input-space canaries would give weaker, less informative bounds from one run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from protocol.accounting import epsilon as accounted_epsilon

from ..engine import Engine, TrainConfig
from .dpsgd import DPSGDConfig
from .onerun import MIN_CANARIES, best_lower_bound


@dataclass(frozen=True)
class AuditConfig:
    noise_multiplier: float         # 0: no noise (a non-private baseline the audit must catch)
    max_grad_norm: float = 1.0
    sample_rate: float = 0.5
    steps: int = 40                 # Poisson steps; the accounting charges exactly these
    num_canaries: int = 1000
    delta: float = 1e-5
    lr: float = 1e-3
    seed: int = 0
    secure_mode: bool = True

    def __post_init__(self):
        if self.noise_multiplier < 0 or self.steps < 1 or self.num_canaries < MIN_CANARIES:
            raise ValueError(f"need noise_multiplier >= 0, steps >= 1, "
                             f"num_canaries >= {MIN_CANARIES}")


def _canary_target(model: nn.Module) -> nn.Parameter:
    """The parameter the canaries write to: the largest trainable one."""
    return max((p for p in model.parameters() if p.requires_grad), key=lambda p: p.numel())


def canary_refusal(model: nn.Module, num_canaries: int) -> str | None:
    """Why ``num_canaries`` canaries do not fit ``model`` (each needs its own coordinate of the
    largest trainable parameter), or None."""
    size = _canary_target(model).numel()
    if size < num_canaries:
        return (f"the largest trainable parameter has {size} entries; {num_canaries} canaries "
                "need one coordinate each")
    return None


def run_audit(model: nn.Module, task, data: Dataset, config: AuditConfig) -> dict:
    """Train ``model`` (a copy) with DP-SGD plus canaries; the lower bound and the accounting."""
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    model = copy.deepcopy(model).train()
    refusal = canary_refusal(model, config.num_canaries)
    if refusal:
        raise ValueError(refusal)
    target = _canary_target(model)
    coords = torch.from_numpy(rng.choice(target.numel(), config.num_canaries, replace=False))
    signs = torch.from_numpy(rng.choice([-1.0, 1.0], config.num_canaries)).to(target.dtype)
    included = rng.random(config.num_canaries) < 0.5
    members = torch.from_numpy(np.flatnonzero(included))
    start = target.detach().flatten()[coords].clone()

    # Each included canary is one more "sample": Poisson-sampled at rate q every step, its
    # gradient s_i C e_{k_i} (norm C, so clipping leaves it as it is) added before the noise.
    draws = np.random.default_rng(config.seed + 1)

    def canaries() -> dict:
        sampled = members[torch.from_numpy(draws.random(len(members)) < config.sample_rate)]
        canary = torch.zeros(target.numel(), dtype=target.dtype)
        canary.index_add_(0, coords[sampled], signs[sampled] * config.max_grad_norm)
        return {target: canary.reshape(target.shape)}

    dp = DPSGDConfig(noise_multiplier=config.noise_multiplier, allow_no_noise=True,
                     max_grad_norm=config.max_grad_norm, sample_rate=config.sample_rate,
                     secure_mode=config.secure_mode, seed=config.seed, steps=config.steps)
    fit = Engine(task, torch.device("cpu")).fit(
        model, data, TrainConfig(lr=config.lr, weight_decay=0.0, seed=config.seed),
        privacy=dp, extra_gradients=canaries)
    steps = int(fit["steps"])                # what ran (config.steps), what is accounted

    moved = target.detach().flatten()[coords] - start
    scores = (-signs * moved).numpy()
    result = best_lower_bound(scores, included, delta=config.delta)
    history = [(config.noise_multiplier, config.sample_rate, steps)]
    accounted = (accounted_epsilon(history, config.delta) if config.noise_multiplier > 0
                 else float("inf"))
    return {"epsilon_lb": float(result["epsilon_lb"]), "accounted_epsilon": accounted,
            "delta": config.delta, "num_canaries": config.num_canaries,
            "num_guesses": int(result["num_guesses"]), "num_correct": int(result["num_correct"]),
            "noise_multiplier": config.noise_multiplier, "sample_rate": config.sample_rate,
            "steps": steps, "max_grad_norm": config.max_grad_norm}
