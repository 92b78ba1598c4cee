"""Cross-check: the same inputs through our SecAgg+ and through Flower's own legacy
SecAggPlusWorkflow + secaggplus_mod (run end to end over an in-process grid, as in
bench/secagg.py) give the same aggregate - the plaintext weighted average - each within its
quantization error, so within the sum of both of each other."""

from __future__ import annotations

import numpy as np

from bench.secagg import _data, flower_round, ours_round
from strategies.secagg_encoding import Encoding

SIZE = 4000


def test_same_inputs_same_aggregate_as_flowers_secaggplus():
    deltas, counts = _data(SIZE, seed=3)
    ours = ours_round(SIZE, deltas, counts)
    flower = flower_round(SIZE, deltas, counts)
    ours_bound = Encoding(clip_range=0.5, max_sites=10, max_weight=1000).resolution
    flower_step = 2 * 8.0 / 2**22        # Flower's defaults: clipping range 8, 2^22 levels
    assert ours["max_abs_error"] <= ours_bound
    assert flower["max_abs_error"] <= 4 * flower_step
    assert ours["max_abs_error"] + flower["max_abs_error"] < 2e-5
    assert np.isfinite([ours["ns_per_param_site"], flower["ns_per_param_site"]]).all()


def test_same_aggregate_with_a_site_dropped():
    deltas, counts = _data(SIZE, seed=4)
    ours = ours_round(SIZE, deltas, counts, drop=(4,))
    flower = flower_round(SIZE, deltas, counts, drop=(4,))
    assert ours["max_abs_error"] <= Encoding(clip_range=0.5, max_sites=10,
                                             max_weight=1000).resolution
    assert flower["max_abs_error"] <= 4 * 2 * 8.0 / 2**22
