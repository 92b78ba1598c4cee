"""Cross-check: the same inputs through our SecAgg+ and through Flower's own legacy
SecAggPlusWorkflow + secaggplus_mod (run end to end over an in-process grid, as in
bench/secagg.py) give the same aggregate - the plaintext weighted average - each within its
quantization error, so within the sum of both of each other."""

from __future__ import annotations

import numpy as np

from bench.secagg import _data, flower_round, ours_round
from protocol.secagg_encoding import Encoding

SIZE = 4000
FLOWER_STEP = 2 * 8.0 / 2**22        # Flower's defaults: clipping range 8, 2^22 levels
OURS_BOUND = Encoding(clip_range=0.5, max_sites=10, max_weight=1000).resolution


def flower_bound(counts: dict[int, int], drop=()) -> float:
    """Worst-case error of Flower's weighted average: each surviving site scales its update by
    its quantized weight ratio dq_i = round(n_i / max_weight * 2^22) / 2^22 and stochastically
    rounds it (error < one step); the server divides the sum by sum(dq_i), so the error is at
    most (surviving sites) * step / sum(dq_i)."""
    dq = [round(n / 1000 * 2**22) / 2**22 for i, n in counts.items() if i not in drop]
    return len(dq) * FLOWER_STEP / sum(dq)


def test_same_inputs_same_aggregate_as_flowers_secaggplus():
    deltas, counts = _data(SIZE, seed=3)
    ours = ours_round(SIZE, deltas, counts)
    flower = flower_round(SIZE, deltas, counts)
    assert ours["max_abs_error"] <= OURS_BOUND
    assert flower["max_abs_error"] <= flower_bound(counts)
    assert np.isfinite([ours["ns_per_param_site"], flower["ns_per_param_site"]]).all()


def test_same_aggregate_with_a_site_dropped():
    deltas, counts = _data(SIZE, seed=4)
    ours = ours_round(SIZE, deltas, counts, drop=(4,))
    flower = flower_round(SIZE, deltas, counts, drop=(4,))
    assert ours["max_abs_error"] <= OURS_BOUND
    assert flower["max_abs_error"] <= flower_bound(counts, drop=(4,))
