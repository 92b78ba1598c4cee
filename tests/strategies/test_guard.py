import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from client.mods.faults import corrupt
from strategies.guard import check_update

REF = {"w": np.ones((2, 3), np.float32), "b": np.zeros(4, np.float32),
       "steps": np.array([3], np.int64)}


def _record(arrays=REF):
    return ArrayRecord({k: Array(v.copy()) for k, v in arrays.items()})


def test_a_clean_update_passes_and_reports_its_norm():
    update = dict(REF, w=REF["w"] + 0.5)
    reason, norm = check_update(_record(update), REF, max_update_norm=10.0)
    assert reason is None and norm == pytest.approx(np.sqrt(6 * 0.25))


@pytest.mark.parametrize("mode, expected", [
    ("scale", "exceeds bound"), ("nan", "non-finite"),
    ("wrong-shape", "wrong shape"), ("drop-key", "wrong keys"),
])
def test_bad_updates_are_named(mode, expected):
    reason, _ = check_update(corrupt(_record(), mode), REF, max_update_norm=10.0)
    assert reason is not None and expected in reason


def test_dtype_changes_and_missing_records_are_refused():
    reason, _ = check_update(_record(dict(REF, b=REF["b"].astype(np.float64))), REF, None)
    assert "wrong dtype for b" in reason
    assert check_update(None, REF, None)[0] == "no model update in reply"


def test_no_norm_bound_still_checks_finiteness():
    assert check_update(corrupt(_record(), "scale"), REF, None)[0] is None
    assert "non-finite" in check_update(corrupt(_record(), "nan"), REF, None)[0]
