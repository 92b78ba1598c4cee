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


def test_median_rule_rejects_a_scaled_update_without_an_absolute_bound():
    from types import SimpleNamespace

    from strategies.guard import GuardedStrategy

    class Inner:
        def aggregate_train(self, server_round, replies):
            self.got = replies
            return None, None

    def reply(site, arrays):
        content = SimpleNamespace(array_records={"arrays": arrays}, metric_records={},
                                  config_records={"site": {"site-id": site}})
        return SimpleNamespace(has_error=lambda: False, has_content=lambda: True,
                               content=content, metadata=SimpleNamespace(src_node_id=1))

    inner = Inner()
    guard = GuardedStrategy(inner, min_available_sites=1, min_train_sites=2, quorum_timeout=1)
    guard._reference, guard._dtypes = REF, {k: v.dtype for k, v in REF.items()}
    honest = [reply(f"site-{i}", _record(dict(REF, w=REF["w"] + 0.1 * (i + 1)))) for i in range(3)]
    attacker = reply("site-9", corrupt(_record(dict(REF, w=REF["w"] + 0.1)), "scale"))
    guard.aggregate_train(1, [*honest, attacker])
    assert [r.site_id for r in guard.rejected] == ["site-9"]
    assert "median" in guard.rejected[0].reason and len(inner.got) == 3


def test_quorum_wait_gives_up_with_a_clear_error():
    from types import SimpleNamespace

    from strategies.guard import GuardedStrategy, QuorumError

    polls = []
    grid = SimpleNamespace(get_node_ids=lambda: polls.append(1) or [7])     # one site, forever
    guard = GuardedStrategy(SimpleNamespace(), min_available_sites=3, min_train_sites=1,
                            quorum_timeout=0.3, poll_interval=0.05)
    with pytest.raises(QuorumError, match="only 1 of the 3 required sites connected within 0.3 s"):
        guard.wait_for_quorum(grid)
    assert len(polls) >= 2                       # it polled, then stopped by itself
    enough = SimpleNamespace(get_node_ids=lambda: [1, 2, 3])
    guard.wait_for_quorum(enough)                # returns at once when the quorum is there


def test_the_global_model_keeps_its_dtypes_and_one_already_in_them_is_not_decoded(
        monkeypatch):
    from types import SimpleNamespace

    from strategies.guard import GuardedStrategy

    guard = GuardedStrategy(SimpleNamespace(), min_available_sites=1, min_train_sites=1,
                            quorum_timeout=1)
    guard._dtypes = {k: v.dtype for k, v in REF.items()}
    promoted = _record({k: v.astype(np.float64) if v.dtype.kind == "f" else v
                        for k, v in REF.items()})          # FedAdam computes in float64
    kept = guard._as_model_dtypes(promoted)
    assert {k: a.numpy().dtype for k, a in kept.items()} == guard._dtypes
    np.testing.assert_array_equal(kept["w"].numpy(), REF["w"])
    decoded, numpy = [], Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decoded.append(1) or numpy(self))
    same = guard._as_model_dtypes(_record())
    assert decoded == []            # the round's aggregate is not parsed again to check it
    assert all(np.array_equal(same[k].numpy(), REF[k]) for k in REF)


def _npy_cases():
    rng = np.random.default_rng(0)
    return {"f32": rng.standard_normal((4, 5)).astype(np.float32),
            "f64": rng.standard_normal(7), "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
            "scalar": np.array(2.5, np.float32), "f16": rng.standard_normal(3).astype(np.float16),
            "empty": np.zeros((0, 3), np.float32), "big": np.ones(3, ">f4"),
            "fortran": np.asfortranarray(rng.standard_normal((3, 4)).astype(np.float32))}


@pytest.mark.parametrize("name", list(_npy_cases()))
def test_decoding_without_the_header_parse_gives_what_numpy_gives(name):
    from strategies.guard import decode, npy_prefixes

    value = _npy_cases()[name]
    array = Array(value)
    for ref in (value, np.ascontiguousarray(value, value.dtype.newbyteorder("=")),
                np.zeros((9,), np.float32)):
        got = decode(array, npy_prefixes({"k": ref})["k"], ref)
        expected = array.numpy()
        # read-only: np.frombuffer over the payload, the header not parsed (the fast path)
        fast = ref.dtype == value.dtype and ref.shape == value.shape \
            and name not in ("empty", "fortran")
        assert got.flags.writeable is not fast
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_a_payload_that_disagrees_with_its_arrays_fields_is_judged_by_its_payload():
    """The fast decode trusts the npy header it checked, never the reply's own dtype/shape
    fields: a reply that claims the reference's shape but carries another is refused, and a
    truncated one fails as np.load fails."""
    from strategies.guard import npy_prefixes

    prefixes = npy_prefixes(REF)
    forged = _record()
    wide = Array(np.ones((3, 2), np.float32))           # same size, another shape
    forged["w"] = Array(dtype="float32", shape=(2, 3), stype=wide.stype, data=wide.data)
    assert "wrong shape for w" in check_update(forged, REF, None, prefixes)[0]
    as_int = Array(np.ones(4, np.int32))
    forged = _record()
    forged["b"] = Array(dtype="float32", shape=(4,), stype=as_int.stype, data=as_int.data)
    assert "wrong dtype for b" in check_update(forged, REF, None, prefixes)[0]
    short = _record()
    short["w"] = Array(dtype="float32", shape=(2, 3), stype=short["w"].stype,
                       data=short["w"].data[:-4])
    for fast in (prefixes, None):                       # np.load's own error, both ways
        with pytest.raises(ValueError, match="EOF: reading array data"):
            check_update(short, REF, None, fast)


@pytest.mark.parametrize("mode, expected", [
    ("scale", "exceeds bound"), ("nan", "non-finite"),
    ("wrong-shape", "wrong shape"), ("drop-key", "wrong keys"),
])
def test_bad_updates_are_named_the_same_with_the_fast_decode(mode, expected):
    from strategies.guard import npy_prefixes

    record = corrupt(_record(), mode)
    fast = check_update(record, REF, 10.0, npy_prefixes(REF))
    assert fast == check_update(record, REF, 10.0) and expected in fast[0]
