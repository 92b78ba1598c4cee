import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from client.mods.faults import corrupt
from strategies.update_check import check_update

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


class _Recorder:
    """An inner strategy that keeps the replies the guard let through."""

    def aggregate_train(self, server_round, replies):
        self.got = replies
        return None, None


def _reply(site, arrays, weight=12):
    """A stand-in reply from ``site`` (``site-<k>``, from node k) carrying ``arrays``,
    weighted ``weight``."""
    from types import SimpleNamespace

    from flwr.app import MetricRecord

    from protocol import wire

    metrics = {wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: weight})}
    content = SimpleNamespace(array_records={"arrays": arrays}, metric_records=metrics,
                              config_records={"site": {"site-id": site}})
    return SimpleNamespace(has_error=lambda: False, has_content=lambda: True,
                           content=content,
                           metadata=SimpleNamespace(src_node_id=int(site.split("-")[-1])))


def _guard_over_recorder():
    """A GuardedStrategy over a recorder, its reference set to REF (as configure_train
    would)."""
    from strategies.guard import GuardedStrategy

    inner = _Recorder()
    guard = GuardedStrategy(inner, min_available_sites=1, min_train_sites=2, quorum_timeout=1)
    guard._reference, guard._dtypes = REF, {k: v.dtype for k, v in REF.items()}
    return guard, inner


def test_median_rule_rejects_a_scaled_update_without_an_absolute_bound():
    guard, inner = _guard_over_recorder()
    honest = [_reply(f"site-{i}", _record(dict(REF, w=REF["w"] + 0.1 * (i + 1)))) for i in range(3)]
    attacker = _reply("site-9", corrupt(_record(dict(REF, w=REF["w"] + 0.1)), "scale"))
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
def test_decoding_without_np_load_gives_what_numpy_gives(name):
    from strategies.update_check import Refused, decode, npy_prefixes

    value = _npy_cases()[name]
    array = Array(value)
    expected = array.numpy()
    native = np.ascontiguousarray(value, value.dtype.newbyteorder("="))
    for ref in (value, native, np.zeros((9,), np.float32)):
        prefix = npy_prefixes({"k": ref})["k"]
        if ref.shape != expected.shape or ref.dtype != expected.dtype:
            with pytest.raises(Refused, match="wrong (shape|dtype) for k"):
                decode(array, prefix, ref, "k")       # refused from its header alone
            continue
        got = decode(array, prefix, ref, "k")
        assert not got.flags.writeable              # a view of the payload, never a copy
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)


def test_a_payload_that_disagrees_with_its_arrays_fields_is_judged_by_its_payload():
    """The decode trusts the npy header it checked, never the reply's own dtype/shape
    fields: a reply that claims the reference's shape but carries another is refused, and a
    truncated one is refused (not raised: the round goes on with the other sites)."""
    from strategies.update_check import npy_prefixes

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
    for fast in (prefixes, None):                       # refused both ways, nothing raised
        assert check_update(short, REF, None, fast) == (
            "truncated array for w: 20 of 24 bytes", None)


def _forged(key, data, stype=None):
    record = _record()
    record[key] = Array(dtype="float32", shape=REF[key].shape,
                        stype=record[key].stype if stype is None else stype, data=data)
    return record


def _npy_header(shape, descr="<f4", version=(1, 0), fortran=False):
    import io

    from numpy.lib import format as npy

    buf = io.BytesIO()
    write = npy.write_array_header_1_0 if version == (1, 0) else npy.write_array_header_2_0
    write(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue()



def test_attack_bytes_after_the_array_are_rejected_not_carried():
    """An accepted reply's bytes are what the inner strategy holds (CheckedArray): a tail
    np.save never writes would travel on unchecked, so it is refused, fast path or not."""
    from strategies.update_check import npy_prefixes

    data = _record()["w"].data
    for fast in (npy_prefixes(REF), None):
        reason, norm = check_update(_forged("w", data + b"\x00" * 1000), REF, None, fast)
        assert norm is None and reason == "1000 bytes after the array w", reason
        assert check_update(_forged("w", data), REF, None, fast)[0] is None


@pytest.mark.parametrize("cut", [0, 3, 9, 40, -1])
def test_attack_a_truncated_payload_is_rejected_not_raised(cut):
    """Cut anywhere (in the magic, the header length, the header, the data): a rejection."""
    from strategies.update_check import npy_prefixes

    data = _record()["w"].data
    for fast in (npy_prefixes(REF), None):
        reason, norm = check_update(_forged("w", data[:cut]), REF, None, fast)
        assert norm is None and reason is not None and reason.endswith(
            "array for w" if cut != -1 else "23 of 24 bytes"), reason


@pytest.mark.parametrize("stype", ["torch.Tensor", "pickle", ""])
def test_attack_another_serialisation_is_rejected_not_raised(stype):
    from strategies.update_check import npy_prefixes

    record = _forged("b", _record()["b"].data, stype=stype)     # numpy bytes, wrong label
    for fast in (npy_prefixes(REF), None):
        assert check_update(record, REF, None, fast) == ("undecodable array for b", None)


@pytest.mark.parametrize("header", [
    b"garbage!", b"\x93NUMPY\x03\x00" + bytes(12), _npy_header((6,), descr="|O"),
    b"\x93NUMPY\x01\x00\xff\xff" + b"{" * 100,                    # header past the data
    b"\x93NUMPY\x01\x00\x10\x00{'descr': 'x'}    \n",
    b"\x93NUMPY\x01\x00\x10\x00{'descr': (((",           # tokenize.TokenError in NumPy
    b"\x93NUMPY\x01\x00\x08\x00{'a':\x00}\n",               # a null byte: ValueError
])
def test_attack_a_malformed_header_is_rejected_not_raised(header):
    reason, _ = check_update(_forged("w", header + bytes(24)), REF, None)
    assert reason in ("undecodable array for w", "wrong shape for w: (6,) != (2, 3)")


@pytest.mark.parametrize("shape", [(2**26,), (2**40,), (2, 3 * 2**30)])
@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_attack_a_header_claiming_a_huge_shape_allocates_nothing(shape, version):
    """np.load allocates the header's shape before it reads the data: (2**26,) float32
    would take 256 MiB, (2**40,) raise MemoryError. The header is checked first."""
    import tracemalloc

    from strategies.update_check import npy_prefixes

    record = _forged("w", _npy_header(shape, version=version) + bytes(24))
    prefixes = npy_prefixes(REF)
    tracemalloc.start()
    try:
        reason, norm = check_update(record, REF, None, prefixes)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (reason, norm) == (f"wrong shape for w: {shape} != (2, 3)", None)
    assert peak < 1 << 20                     # NumPy reports its data buffers to tracemalloc


def test_a_header_numpy_writes_otherwise_is_still_read():
    """Another header for the right array (format 2.0, Fortran order) is parsed, not
    refused: only its shape, dtype and length decide."""
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    from strategies.update_check import decode

    ref = np.zeros((2, 3), np.float32)
    v2 = Array(dtype="float32", shape=(2, 3), stype=Array(value).stype,
               data=_npy_header((2, 3), version=(2, 0)) + value.tobytes())
    np.testing.assert_array_equal(decode(v2, None, ref), value)
    fortran = Array(np.asfortranarray(value))
    assert b"'fortran_order': True" in fortran.data
    np.testing.assert_array_equal(decode(fortran, None, ref), value)


@pytest.mark.parametrize("mode, expected", [
    ("scale", "exceeds bound"), ("nan", "non-finite"),
    ("wrong-shape", "wrong shape"), ("drop-key", "wrong keys"),
])
def test_bad_updates_are_named_the_same_with_the_fast_decode(mode, expected):
    from strategies.update_check import npy_prefixes

    record = corrupt(_record(), mode)
    fast = check_update(record, REF, 10.0, npy_prefixes(REF))
    assert fast == check_update(record, REF, 10.0) and expected in fast[0]


def test_attack_one_undecodable_reply_is_rejected_and_the_round_goes_on():
    guard, inner = _guard_over_recorder()
    huge = _forged("w", _npy_header((2**40,)) + bytes(24))
    guard.aggregate_train(1, [_reply("site-0", _record()), _reply("site-9", huge),
                              _reply("site-1", _record())])
    assert [(r.site_id, r.reason) for r in guard.rejected] == [
        ("site-9", "wrong shape for w: (1099511627776,) != (2, 3)")]
    assert len(inner.got) == 2


@pytest.mark.parametrize("weight", [float("nan"), float("inf"), -12.0])
def test_attack_an_unusable_weight_is_rejected_before_fedavg_divides_by_it(weight):
    """FedAvg scales each update by its num-examples and divides by their sum: a NaN or
    infinite weight made the global model NaN, a negative one bringing the sum to zero failed
    the round."""
    guard, inner = _guard_over_recorder()
    guard.aggregate_train(1, [_reply("site-0", _record()), _reply("site-9", _record(), weight),
                              _reply("site-1", _record())])
    assert [r.site_id for r in guard.rejected] == ["site-9"]
    assert "not a finite number >= 0" in guard.rejected[0].reason
    assert len(inner.got) == 2


def test_the_inner_strategy_aggregates_the_values_the_guard_checked(monkeypatch):
    """Flower's FedAvg decodes every reply's arrays again (``Array.numpy``: ``np.load``,
    its header parsed with ``ast.literal_eval``); behind the guard it gets the values the
    guard decoded and checked (``CheckedArray``), without a second decode, and averages
    them to the same bits. A rejected reply's arrays are left as they came."""
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from protocol import wire
    from strategies.guard import GuardedStrategy
    from strategies.update_check import CheckedArray

    rng = np.random.default_rng(1)
    updates = [dict(REF, w=REF["w"] + rng.standard_normal((2, 3)).astype(np.float32))
               for _ in range(3)]
    updates[2]["w"] = np.asfortranarray(updates[2]["w"])    # np.save writes it F-ordered

    def reply(site, arrays, n):
        content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: MetricRecord(
            {wire.NUM_EXAMPLES: n}), wire.SITE: ConfigRecord({wire.SITE_ID: site})})
        return SimpleNamespace(has_error=lambda: False, has_content=lambda: True,
                               content=content,
                           metadata=SimpleNamespace(src_node_id=int(site.split("-")[-1])))

    replies = [reply(f"site-{i}", _record(u), 10 + i) for i, u in enumerate(updates)]
    bad = _record(dict(REF, b=np.full(4, np.nan, np.float32)))
    bad_arrays = dict(bad.items())
    replies.append(reply("site-9", bad, 5))
    expected = FedAvg(weighted_by_key=wire.NUM_EXAMPLES).aggregate_train(
        1, [reply(f"site-{i}", _record(u), 10 + i) for i, u in enumerate(updates)])[0]

    decodes = []
    plain = Array.numpy
    monkeypatch.setattr(Array, "numpy", lambda self: decodes.append(self) or plain(self))
    sent = [a for r in replies for a in r.content[wire.ARRAYS].values()]
    guard = GuardedStrategy(FedAvg(weighted_by_key=wire.NUM_EXAMPLES), min_available_sites=1,
                            min_train_sites=2, quorum_timeout=1, max_norm_ratio=None)
    guard._reference, guard._dtypes = REF, {k: v.dtype for k, v in REF.items()}
    arrays, _ = guard.aggregate_train(1, replies)
    assert [r.site_id for r in guard.rejected] == ["site-9"]
    # neither the guard nor FedAvg called np.load on a reply's array (only the guard's
    # dtype restore on FedAvg's float64 average of the int64 'steps')
    assert not [a for a in decodes if any(a is b for b in sent)] and len(decodes) == 1
    for key in REF:
        same = expected[key].numpy().astype(REF[key].dtype)    # the guard keeps dtypes
        assert arrays[key].numpy().tobytes() == same.tobytes()
    for r, u in zip(replies[:3], updates):
        for key, value in r.content[wire.ARRAYS].items():
            assert isinstance(value, CheckedArray)
            got = value.numpy()
            assert np.array_equal(got, u[key]) and got.dtype == u[key].dtype
            assert (value.dtype, value.shape) == (str(u[key].dtype), u[key].shape)
            got += 1                     # a fresh, writable copy each time, as np.load's
            assert np.array_equal(value.numpy(), u[key])
    assert all(replies[3].content[wire.ARRAYS][k] is v for k, v in bad_arrays.items())


def test_a_checked_array_goes_on_the_wire_as_the_array_it_checked():
    """A strategy that sends a reply's array on (a selecting one) sends Flower's Array:
    the same deflated bytes, so the same object id, and a receiver inflates an Array."""
    from strategies.update_check import CheckedArray

    plain = Array(np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)))
    checked = CheckedArray(plain.numpy(), plain.data)
    assert checked.deflate() == plain.deflate() and checked.object_id == plain.object_id
    back = Array.inflate(checked.deflate(), dict(checked.children))
    assert type(back) is Array and np.array_equal(back.numpy(), plain.numpy())


def test_a_checked_array_whose_fields_are_set_gives_its_new_bytes_values():
    """The checked values are a cache of the bytes (like Flower's own object id and chunks):
    setting data, dtype, shape or stype drops it, so numpy() never answers with values the
    array no longer holds."""
    from strategies.update_check import CheckedArray

    old, new = np.arange(6, dtype=np.float32), np.full(6, 7.0, np.float32)
    checked = CheckedArray(old, Array(old).data)
    checked.data = Array(new).data
    np.testing.assert_array_equal(checked.numpy(), new)
    checked = CheckedArray(old, Array(old).data)
    checked.shape = (2, 3)
    assert checked.numpy().shape == (6,)     # what the bytes say, as Flower's Array decodes
    assert np.array_equal(CheckedArray(old, Array(old).data).numpy(), old)
