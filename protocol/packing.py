"""A model's tensors as one byte array on a deployed federation's wire.

Flower stores every ``Array`` of a message as its own object, and a SuperNode pulls (and
pushes) each object with its own call to the SuperLink: a model of 56 tensors is about 60
calls of ~50 ms each on a loaded 2-core coordinator, about 2 s per message and direction
(``bench/RESULTS.md``, deploy). ``pack`` turns an ``ArrayRecord`` of several arrays into one
byte array - an 8-byte little-endian length, a JSON layout of that length (key, dtype, shape
per array, in order), then the concatenated raw bytes - and ``unpack`` restores it exactly.
One array, not a layout array and a data array: each array is two objects on Flower's wire
(the array and its chunk), and every object is a call to the SuperLink on each hop. The deployed ServerApp's grid packs what it sends and unpacks
what comes back (``server.prompt_grid``); the site's ``client.mods.packing`` does the reverse.
Simulation never packs.

``unpack`` trusts nothing in the layout: a length that fits the bytes received, plain numeric
dtypes only (no object, no Python types), non-negative integer shapes, unique string keys,
bounded counts, and the sizes must add up to exactly the bytes after the layout. Nothing is
ever unpickled.
"""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord

PACKED = "packed"                 # uint8: length, UTF-8 JSON [[key, dtype, shape], ...], bytes
HEADER = 8                        # bytes of the layout's length (unsigned, little-endian)
MAX_ARRAYS = 100_000
MAX_LAYOUT_BYTES = 16 * 2**20
_KINDS = "biuf"                   # bool, signed, unsigned, float (no complex/object/void)


class PackingError(ValueError):
    """A packed record that does not decode to exactly its arrays."""


def is_packed(record: ArrayRecord) -> bool:
    return list(record.keys()) == [PACKED]


def pack(record: ArrayRecord) -> ArrayRecord:
    """``record`` as one byte array (layout length, layout, bytes); a record of at most one
    array, or one already packed, is returned as it is (nothing to save)."""
    if len(record) <= 1 or is_packed(record):
        return record
    layout, blobs = [], []
    for key in record.keys():
        array = record[key].numpy()          # (ascontiguousarray would make 0-d arrays 1-d)
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        layout.append([key, dtype.str, list(array.shape)])
        blobs.append(array.astype(dtype, copy=False).tobytes(order="C"))
    text = json.dumps(layout, separators=(",", ":")).encode()
    blob = b"".join([len(text).to_bytes(HEADER, "little"), text, *blobs])
    return ArrayRecord({PACKED: Array(np.frombuffer(blob, dtype=np.uint8))})


def unpack(record: ArrayRecord) -> ArrayRecord:
    """The arrays ``pack`` packed, in their order, with their dtypes and shapes; a record
    that is not packed is returned as it is. Raises ``PackingError`` on anything else."""
    if not is_packed(record):
        return record
    blob = _bytes(record[PACKED])
    if len(blob) < HEADER:
        raise PackingError("packed bytes shorter than their header")
    length = int.from_bytes(blob[:HEADER], "little")
    if length > MAX_LAYOUT_BYTES:
        raise PackingError("packed layout too large")
    if HEADER + length > len(blob):
        raise PackingError("packed layout longer than the bytes sent")
    raw_layout, data = blob[HEADER:HEADER + length], memoryview(blob)[HEADER + length:]
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
        try:      # an empty shape numpy cannot hold ([2**62, 2**62, 0]) fails here
            array = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize,
                                  offset=offset).reshape(shape).copy()
        except ValueError:
            raise PackingError(f"packed shape of {key!r} cannot be an array") from None
        arrays[key] = Array(array)
        offset += size
    if offset != len(data):
        raise PackingError("packed bytes longer than the arrays of the layout")
    return ArrayRecord(arrays)


def _bytes(array: Array) -> bytes:
    value = array.numpy()
    if value.dtype != np.uint8 or value.ndim != 1:
        raise PackingError("packed bytes must be a 1-D uint8 array")
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
