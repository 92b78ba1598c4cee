"""The guard's reference (the round's global model) read without np.load parsing each npy
header again when it has last round's dtypes and shapes (``update_check.decode_global``);
anything else decoded as Flower decodes it."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord

from strategies.update_check import decode_global
from tests.strategies.rounds import Grid, arrays, fedavg, guard, train_round


@pytest.fixture(autouse=True)
def _identity(task_identity):
    """Real Flower messages need the identity Flower sets in a running app."""


def _counting(monkeypatch) -> list[int]:
    decoded, real = [], Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(1) or real(self))
    return decoded


def test_values_equal_np_load_and_only_a_changed_array_is_parsed(monkeypatch):
    previous = {"w": np.zeros((3, 4), np.float32), "b": np.ones(2, np.float32),
                "c": np.zeros(5, np.float32), "e": np.zeros(0, np.float32)}
    now = {"w": np.arange(12, dtype=np.float32).reshape(3, 4),
           "b": np.array([2.5, -1], np.float32),
           "c": np.arange(5, dtype=np.float64),                 # its dtype changed
           "e": np.zeros(0, np.float32),                        # empty: nothing to view
           "f": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),   # new key
           "g": np.ones(3, np.int64)}                           # new key
    record = ArrayRecord({k: Array(v) for k, v in now.items()})
    want = {k: a.numpy() for k, a in record.items()}
    decoded = _counting(monkeypatch)
    got = decode_global(record, previous)
    assert len(decoded) == 4                                    # c, e, f, g
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape
        np.testing.assert_array_equal(got[key], value)
    assert len(decode_global(record, {})) == len(record) and len(decoded) == 4 + len(record)


def test_the_guard_parses_no_header_of_a_global_model_shaped_like_the_last(monkeypatch):
    real_numpy = Array.numpy
    strategy, grid = guard(fedavg()), Grid()
    new = train_round(strategy, 1, arrays(), grid)
    decoded = _counting(monkeypatch)
    strategy.configure_train(2, new, ConfigRecord(), grid)
    assert decoded == []
    for key, array in new.items():
        np.testing.assert_array_equal(strategy._reference[key], real_numpy(array))
    # the next round's checks against it: the same verdicts as with np.load's
    monkeypatch.setattr(Array, "numpy", real_numpy)
    again = train_round(strategy, 2, new, grid)
    assert strategy.rejected == [] and len(strategy.update_norms) == 3
    fresh = guard(fedavg())
    fresh.configure_train(2, new, ConfigRecord(), grid)            # its first: np.load
    for key in new.keys():
        np.testing.assert_array_equal(strategy._reference[key], fresh._reference[key])
    assert again.keys() == new.keys()
