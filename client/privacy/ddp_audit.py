"""One-run canary audit of distributed site-level DP (Steinke, Nasr & Jagielski 2023).

The audited release is the unmasked secure sum of a distributed-DP round. ``num_canaries``
canary *sites* each take part with probability 1/2; a canary's update is ``s_i C e_{k_i}`` (a
random sign times the clipping norm on its own coordinate) and goes through the real site
path - L2 clip, quantisation at the round's encoding, ``encode`` - as one more contributor to
the sum. The noise comes from ``contributors`` noise-adding sites, each adding its real
``Skellam(V / m)`` share from the site CSPRNG (``SkellamNoise``), ``m = contributors``: the
sum then carries exactly the noise a round with ``m`` honest sites carries. After ``rounds``
such releases (the same canaries every round), canary ``i`` scores ``s_i`` times its
coordinate of the summed averages; ``onerun.best_lower_bound`` turns the top/bottom guesses
into an epsilon lower bound at 95% confidence.

The accounted epsilon is what each site's ledger books: ``rounds`` Gaussian rows
``(sigma, 1, 1)``. A lower bound above it means the distributed path leaks more than it books.
``skip_noise`` sites add nothing (a site that skips its share): with ``skip_noise =
contributors`` the sum carries only rounding noise and the audit must flag it. A single site
skipping one of ``m`` shares lowers the noise by ``1/m`` of its variance, which no one-run
audit can resolve; the chi-square variance test (``tests/protocol/test_skellam.py``) catches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.accounting import epsilon as accounted_epsilon
from protocol.secagg_encoding import HEADER, decode, encode, noisy_encoding
from protocol.skellam import NoiseShare

from .noise import SkellamNoise
from .onerun import MIN_CANARIES, best_lower_bound


@dataclass(frozen=True)
class DistributedAuditConfig:
    noise_multiplier: float
    contributors: int = 3              # noise-adding sites; each share assumes this many
    skip_noise: int = 0                # of them, how many add nothing (a broken site)
    clip_norm: float = 1.0
    num_canaries: int = 1000
    rounds: int = 1
    delta: float = 1e-5
    seed: int = 0
    secure: bool = True                # the site CSPRNG (False: seeded, reproducible)

    def __post_init__(self):
        if not (self.noise_multiplier > 0 and self.contributors >= 1 and self.rounds >= 1
                and 0 <= self.skip_noise <= self.contributors
                and self.num_canaries >= MIN_CANARIES):
            raise ValueError("need noise_multiplier > 0, contributors >= 1, rounds >= 1, "
                             f"0 <= skip_noise <= contributors and num_canaries >= {MIN_CANARIES}")


def run_distributed_audit(config: DistributedAuditConfig) -> dict:
    """Audit ``config.rounds`` distributed-DP releases with canary sites; the lower bound and
    the accounting."""
    rng = np.random.default_rng(config.seed)
    m, dim = config.num_canaries, config.num_canaries
    share = NoiseShare(noise_multiplier=config.noise_multiplier, clip_norm=config.clip_norm,
                       min_contributors=config.contributors)
    encoding = noisy_encoding(clip_range=config.clip_norm,
                              max_sites=config.contributors + m, share=share)
    signs = rng.choice([-1.0, 1.0], m)
    included = rng.random(m) < 0.5
    members = np.flatnonzero(included)
    samplers = [SkellamNoise(secure=config.secure, seed=config.seed * 1000 + j).sample
                for j in range(config.contributors)]
    skipped = lambda variance, n: np.zeros(n, np.int64)                   # noqa: E731
    moved = np.zeros(dim)
    for _ in range(config.rounds):
        total = np.zeros(dim + HEADER, np.uint32)
        for j, sampler in enumerate(samplers):          # the noise sites: nothing to say
            vector, _ = encode(np.zeros(dim, np.float32), 1, encoding, noise=share,
                               sampler=skipped if j < config.skip_noise else sampler)
            total += vector
        for i in members:                               # canary sites, through the real path
            update = np.zeros(dim, np.float32)
            update[i] = signs[i] * config.clip_norm
            vector, _ = encode(update, 1, encoding, noise=share, sampler=skipped)
            total += vector
        average, weight = decode(total, encoding)
        moved += average.astype(np.float64) * weight    # back to the sum
    scores = signs * moved
    result = best_lower_bound(scores, included, delta=config.delta)
    accounted = accounted_epsilon([(config.noise_multiplier, 1.0, 1)] * config.rounds,
                                  config.delta)
    return {"epsilon_lb": float(result["epsilon_lb"]), "accounted_epsilon": accounted,
            "delta": config.delta, "num_canaries": m, "rounds": config.rounds,
            "num_guesses": int(result["num_guesses"]), "num_correct": int(result["num_correct"]),
            "noise_multiplier": config.noise_multiplier, "contributors": config.contributors,
            "skip_noise": config.skip_noise}
