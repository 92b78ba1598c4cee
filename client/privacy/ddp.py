"""Distributed site-level DP at a site: the noise share it adds, and the sums it helps unmask.

The train handler has already admitted the round and charged the ledger ``(sigma, 1, 1)`` with
``trust = sites>=m`` (``sites>=m,server-counted`` under the semi-honest SecAgg+;
``client.privacy.policy``). Here, at the masked stage, the site reads the
same request from the same message - noise multiplier ``sigma``, clipping norm ``C`` and
``min_contributors`` ``m`` - and hands the encoding a ``NoiseShare``: clip to ``C``, quantise,
add ``Skellam(V / m)`` from the site's CSPRNG (``noise.SkellamNoise``), then mask. ``V`` is the
site's own computation from the encoding's scale and the update's size
(``protocol.skellam.share_variance``); no noise level is ever taken from the server.

Replays: the share's CSPRNG key is kept per task and server round (the last ``KEEP_KEYS``),
so a train request the server repeats is masked with the *same* noise (the handler answers a
replay with its cached update); fresh noise on each copy would let the server average a site's
share away.
The keys live in the node's state: a site process restarted between a round and its replay
draws fresh noise (the cached replies survive on disk; their noise keys do not).

Dropouts: the share assumes only ``m`` contributors, so at the unmask stage the site refuses
to reveal anything for a sum it cannot count at least ``m`` contributors in: itself and the
neighbours the request says survived. (Under SecAgg+ a site sees only its neighbours; the
server's configuration checks refuse ``min_contributors`` above ``degree + 1``. With a signed
survivor set - the consistency round of the malicious-secure protocol - the count is that
set's size.)
"""

from __future__ import annotations

import logging
import os

import numpy as np
from flwr.app import ConfigRecord, Context

from protocol import wire
from protocol.job import privacy_from_record
from protocol.skellam import NoiseShare

from .noise import SkellamNoise

log = logging.getLogger(__name__)

STATE = "medfed.ddp"                 # node state between the masked and the unmask stage
_MIN_CONTRIBUTORS, _ROUNDS, _KEYS = "min-contributors", "rounds", "noise-keys"
KEEP_KEYS = 16                       # (task, round)s whose noise key a site keeps (>= its
                                     # cached replies)


class DistributedDPRefused(ValueError):
    """The site will not help unmask a sum its noise share was not calibrated for."""


def round_share(config: ConfigRecord) -> NoiseShare | None:
    """The noise share a train message's job config asks this site to add (None: none)."""
    p = privacy_from_record(config)
    if p.mechanism != wire.DP_SITE or p.noise != wire.DP_NOISE_DISTRIBUTED:
        return None
    return NoiseShare(noise_multiplier=float(p.noise_multiplier),
                      clip_norm=float(p.clipping_norm),
                      min_contributors=p.min_contributors or 1)   # unset: this site alone


def masked_stage_noise(context: Context, config: ConfigRecord
                       ) -> tuple[NoiseShare | None, callable | None]:
    """``(share, sampler)`` for ``encode`` at the masked stage; remembers ``m`` for unmask
    and the round's noise key (a replay of a recent round draws the same noise)."""
    share = round_share(config)
    saved = dict(context.state[STATE]) if STATE in context.state else {}
    saved.pop(_MIN_CONTRIBUTORS, None)
    if share is None:
        context.state[STATE] = ConfigRecord(saved)
        return None, None
    # per task and round: two tasks of a run (e.g. pretraining and fine-tuning phases) both
    # have a round 1, and one noise draw in two sums would cancel in their difference
    round_ = f"{config.get(wire.TASK_NAME, '')}/{int(config.get(wire.SERVER_ROUND, 0))}"
    keys = dict(zip(saved.get(_ROUNDS, []), saved.get(_KEYS, [])))
    key = keys.get(round_) or os.urandom(16)
    keys = dict(list((keys | {round_: key}).items())[-KEEP_KEYS:])
    context.state[STATE] = ConfigRecord({_MIN_CONTRIBUTORS: share.min_contributors,
                                         _ROUNDS: list(keys), _KEYS: list(keys.values())})
    log.info("distributed DP: adding a Skellam share for sigma %.3g, clip %.3g, assuming %d "
             "contributors", share.noise_multiplier, share.clip_norm, share.min_contributors)
    return share, SkellamNoise(key=key).sample


def check_unmask(context: Context, survived: list) -> int:
    """Refuse to unmask a sum of fewer contributors than this round's share assumed; the
    number assumed (0: no distributed-DP share this round). The caller makes the survivor
    set's signatures prove that many contributors (a listed id alone is the server's word)."""
    if STATE not in context.state or _MIN_CONTRIBUTORS not in context.state[STATE]:
        return 0
    saved = dict(context.state[STATE])
    needed = int(saved.pop(_MIN_CONTRIBUTORS))
    # this site and its surviving neighbours, each once (naming this site again adds nothing)
    counted = 1 + len({str(j) for j in survived} - {str(context.node_id)})
    context.state[STATE] = ConfigRecord(saved)              # the noise keys stay
    if counted < needed:
        raise DistributedDPRefused(
            f"asked to unmask a sum of {counted} contributors this site can count; its noise "
            f"share assumed at least {needed} (privacy.min_contributors); refusing")
    return needed


def sum_noise_std(*, share: NoiseShare, scale: float, dim: int, contributors: int) -> float:
    """Std of the noise in the decoded *average* of ``contributors`` honest sites (model
    units): ``sqrt(contributors * V / m) / (scale * contributors)``."""
    variance = contributors * share.variance(scale=scale, dim=dim)
    return float(np.sqrt(variance) / (scale * contributors))
