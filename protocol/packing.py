"""A model's tensors as one byte array on a deployed federation's wire.

Flower stores every ``Array`` of a message as its own object, and a SuperNode pulls (and
pushes) each object with its own call to the SuperLink: a model of 56 tensors is about 60
calls of ~50 ms each on a loaded 2-core coordinator, about 2 s per message and direction
(``bench/RESULTS.md``, deploy). ``pack`` turns an ``ArrayRecord`` of several arrays into two -
a JSON layout (key, dtype, shape per array, in order) and the concatenated raw bytes - and
``unpack`` restores it exactly. The deployed ServerApp's grid packs what it sends and unpacks
what comes back (``server.prompt_grid``); the site's ``client.mods.packing`` does the reverse.
Simulation never packs.

``unpack`` trusts nothing in the layout: plain numeric dtypes only (no object, no Python
types), non-negative integer shapes, unique string keys, bounded counts, and the sizes must
add up to exactly the bytes received. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord

LAYOUT = "packed.layout"          # uint8: UTF-8 JSON [[key, dtype, shape], ...]
DATA = "packed.data"              # uint8: the arrays' bytes, in layout order
MAX_ARRAYS = 100_000
MAX_LAYOUT_BYTES = 16 * 2**20
_KINDS = "biuf"                   # bool, signed, unsigned, float (no complex/object/void)


class PackingError(ValueError):
    """A packed record that does not decode to exactly its arrays."""


def is_packed(record: ArrayRecord) -> bool:
    return set(record.keys()) == {LAYOUT, DATA}


def pack(record: ArrayRecord) -> ArrayRecord:
    """``record`` as two arrays (layout, bytes); a record of at most one array, or one
    already packed, is returned as it is (nothing to save)."""
    if len(record) <= 1 or is_packed(record):
        return record
    layout, blobs = [], []
    for key in record.keys():
        array = record[key].numpy()          # (ascontiguousarray would make 0-d arrays 1-d)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        layout.append([key, dtype.str, list(array.shape)])
        blobs.append(array.astype(dtype, copy=False).tobytes(order="C"))
    text = json.dumps(layout, separators=(",", ":")).encode()
    data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    return ArrayRecord({LAYOUT: Array(np.frombuffer(text, dtype=np.uint8)),
                        DATA: Array(data)})


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The arrays ``pack`` packed, in their order, with their dtypes and shapes; a record
    that is not packed is returned as it is. Raises ``PackingError`` on anything else."""
    if not is_packed(record):
        return record
    raw_layout, data = (_bytes(record[k]) for k in (LAYOUT, DATA))
    if len(raw_layout) > MAX_LAYOUT_BYTES:
        raise PackingError("packed layout too large")
    try:
        layout = json.loads(raw_layout.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PackingError("packed layout is not JSON") from None
    if not isinstance(layout, list) or not 2 <= len(layout) <= MAX_ARRAYS:
        raise PackingError("packed layout must list 2.. arrays")
    arrays, seen, offset = {}, set(), 0
    for entry in layout:
        key, dtype, shape = _entry(entry)
        if key in seen:
            raise PackingError(f"packed layout names {key!r} twice")
        seen.add(key)
        size = dtype.itemsize * math.prod(shape)          # Python ints: no overflow
        if offset + size > len(data):
            raise PackingError("packed arrays larger than the bytes sent")
        array = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize,
                              offset=offset).reshape(shape).copy()
        arrays[key] = Array(array)
        offset += size
    if offset != len(data):
        raise PackingError("packed bytes longer than the arrays of the layout")
    return ArrayRecord(arrays)


def _bytes(array: Array) -> bytes:
    value = array.numpy()
    if value.dtype != np.uint8 or value.ndim != 1:
        raise PackingError("packed parts must be 1-D uint8 arrays")
    return value.tobytes()


def _entry(entry) -> tuple[str, np.dtype, tuple[int, ...]]:
    if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
            and isinstance(entry[1], str) and isinstance(entry[2], list)):
        raise PackingError("packed layout entries are [key, dtype, shape]")
    key, name, shape = entry
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise PackingError(f"packed dtype {name!r} is not a dtype") from None
    if dtype.kind not in _KINDS or dtype.fields is not None or dtype.subdtype is not None \
            or dtype.str != name or dtype.byteorder == ">":
        raise PackingError(f"packed dtype {name!r} is not a plain numeric dtype")
    if len(shape) > 32 or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                  for d in shape):
        raise PackingError(f"packed shape of {key!r} is not a list of sizes")
    return key, dtype, tuple(shape)
