"""A model's tensors as one byte array on a deployed wire (``protocol.packing``): exact round
trips, and a site that decodes a hostile coordinator's layout refuses it instead of guessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType

from client.mods.packing import packing_mod
from protocol import wire
from protocol.packing import HEADER, PACKED, PackingError, is_packed, pack, unpack
from server.prompt_grid import PromptGrid

pytestmark = pytest.mark.usefixtures("task_identity")

ARRAYS = {"blocks.0.w": np.arange(12, dtype=np.float32).reshape(3, 4),
          "blocks.0.b": np.array([-1.5, 2.25], dtype=np.float16),
          "bn.num_batches": np.array(7, dtype=np.int64),
          "mask": np.array([True, False, True]),
          "empty": np.zeros((0, 5), dtype=np.uint8),
          "big.endian": np.array([1.0, -2.0], dtype=">f8")}


def record(arrays=ARRAYS) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def test_a_packed_record_is_one_array_and_unpacks_to_the_same_bits_in_order():
    packed = pack(record())
    assert list(packed.keys()) == [PACKED] and is_packed(packed)
    back = unpack(packed)
    assert list(back.keys()) == list(ARRAYS)
    for key, value in ARRAYS.items():
        got = back[key].numpy()
        assert got.shape == value.shape and got.dtype.kind == value.dtype.kind
        assert np.array_equal(got, value)
    assert back["big.endian"].numpy().dtype == np.dtype("<f8")       # stored little-endian
    single = record({"w": np.ones(3, np.float32)})
    assert pack(single) is single and unpack(single) is single       # nothing to save
    assert pack(packed) is packed                                    # packed once


def _blob(blob: bytes) -> ArrayRecord:
    return ArrayRecord({PACKED: Array(np.frombuffer(blob, np.uint8))})


def _hostile(layout, data: bytes = b"\0" * 16, raw_layout: bytes | None = None) -> ArrayRecord:
    text = raw_layout if raw_layout is not None else json.dumps(layout).encode()
    return _blob(len(text).to_bytes(HEADER, "little") + text + data)


@pytest.mark.parametrize("layout, why", [
    ([["a", "|O", [2]], ["b", "<f4", [2]]], "object dtype: would unpickle"),
    ([["a", "|V8", [2]], ["b", "<f4", [2]]], "void"),
    ([["a", ">f4", [2]], ["b", "<f4", [2]]], "big-endian"),
    ([["a", "float32", [2]], ["b", "<f4", [2]]], "a name, not the packed form"),
    ([["a", "<c8", [1]], ["b", "<f4", [2]]], "complex"),
    ([["a", "<f4", [-2]], ["b", "<f4", [6]]], "negative size"),
    ([["a", "<f4", [True, 2]], ["b", "<f4", [2]]], "bool size"),
    ([["a", "<f4", [2.0]], ["b", "<f4", [2]]], "float size"),
    ([["a", "<f4", [2]], ["a", "<f4", [2]]], "duplicate key"),
    ([["a", "<f4", [2]], ["b", "<f4", [1]]], "fewer arrays than bytes"),
    ([["a", "<f4", [2]], ["b", "<f4", [3]]], "more arrays than bytes"),
    ([["a", "<f4", [2 ** 62, 2 ** 62]], ["b", "<f4", [0]]], "size that overflows int64"),
    ([["a", "<f4", [2 ** 62, 2 ** 62, 0]], ["b", "<f4", [4]]], "empty, but too big for numpy"),
    ([["a", "<f4", [4]]], "one array"),
    ({"a": 1}, "not a list"),
    ([["a", "<f4"], ["b", "<f4", [2]]], "entry of two"),
])
def test_a_hostile_layout_is_refused(layout, why):
    with pytest.raises(PackingError):
        unpack(_hostile(layout))


def test_non_json_and_non_byte_parts_are_refused():
    with pytest.raises(PackingError):
        unpack(_hostile(None, raw_layout=b"\xff\xfe not json"))
    wrong = ArrayRecord({PACKED: Array(np.zeros(3, np.float32))})
    with pytest.raises(PackingError):
        unpack(wrong)


def test_a_hostile_length_is_refused():
    """The 8-byte length decides where the layout ends: one shorter than the header, one past
    the end of the bytes, one that ends the layout early (the JSON is cut) and a huge one
    are refused before any array is read."""
    text = json.dumps([["a", "<f4", [2]], ["b", "<f4", [2]]]).encode()
    data = b"\0" * 16
    assert len(unpack(_blob(len(text).to_bytes(HEADER, "little") + text + data))) == 2
    for blob in (b"\x01\x00",
                 (len(text) + len(data) + 1).to_bytes(HEADER, "little") + text + data,
                 (len(text) - 1).to_bytes(HEADER, "little") + text + data,
                 (2 ** 64 - 1).to_bytes(HEADER, "little") + text + data):
        with pytest.raises(PackingError):
            unpack(_blob(blob))


def _train(arrays: ArrayRecord) -> Message:
    return Message(RecordDict({wire.ARRAYS: arrays, wire.CONFIG: ConfigRecord({"x": 1})}),
                   dst_node_id=3, message_type=MessageType.TRAIN)


def _context() -> Context:
    return Context(run_id=1, node_id=3, node_config={}, state=RecordDict(), run_config={})


def _handler(seen: list):
    def handler(msg, context):
        arrays = msg.content.array_records[wire.ARRAYS]
        seen.append(list(arrays.keys()))
        update = {k: arrays[k].numpy() + (1 if arrays[k].numpy().dtype.kind == "f" else 0)
                  for k in arrays.keys()}
        return Message(RecordDict({wire.ARRAYS: record(update)}), reply_to=msg)
    return handler


def test_the_site_mod_unpacks_before_the_app_and_packs_the_reply_only_when_asked_packed():
    seen: list = []
    reply = packing_mod(_train(pack(record())), _context(), _handler(seen))
    assert seen == [list(ARRAYS)]                          # the app saw the tensors
    out = reply.content.array_records[wire.ARRAYS]
    assert is_packed(out)
    assert np.array_equal(unpack(out)["blocks.0.w"].numpy(), ARRAYS["blocks.0.w"] + 1)
    # a simulation (nothing packed) is untouched both ways
    reply = packing_mod(_train(record()), _context(), _handler(seen))
    assert list(reply.content.array_records[wire.ARRAYS].keys()) == list(ARRAYS)
    # a hostile packed record never reaches the app
    with pytest.raises(PackingError):
        packing_mod(_train(_hostile([["a", "|O", [2]], ["b", "<f4", [2]]])), _context(),
                    _handler(seen))
    assert len(seen) == 2


class _Inner:
    """Flower's grid stand-in: keeps what was pushed, answers with ``replies``."""

    def __init__(self, replies):
        self.pushed, self.replies = [], replies

    def push_messages(self, messages):
        self.pushed += list(messages)
        return [str(i) for i in range(len(self.pushed))]

    def pull_messages(self, ids):
        return self.replies


def test_the_deployed_grid_packs_what_it_sends_and_unpacks_replies(caplog):
    good = Message(RecordDict({wire.ARRAYS: pack(record())}), reply_to=_train(record()))
    bad = Message(RecordDict({wire.ARRAYS: _hostile([["a", "|O", [2]], ["b", "<f4", [2]]])}),
                  reply_to=_train(record()))
    grid = PromptGrid(_Inner([good, bad]))
    grid.push_messages([_train(record()), _train(record())])
    assert all(is_packed(m.content.array_records[wire.ARRAYS]) for m in grid.inner.pushed)
    got = grid.pull_messages(["0", "1"])
    assert list(got[0].content.array_records[wire.ARRAYS].keys()) == list(ARRAYS)
    # a malformed reply stays packed: not the model's keys, so the update guard drops it
    assert is_packed(got[1].content.array_records[wire.ARRAYS])
    assert "malformed packed arrays" in caplog.text
