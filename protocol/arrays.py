"""The layout of a model update on the wire: a flat float32 ``after - before`` vector over the
floating-point arrays in sorted key order (what a site masks, what the server unmasks)."""

from __future__ import annotations

import math
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType


def view(array: Array) -> np.ndarray:
    """A read-only NumPy view of an ``Array``'s payload, without the copy ``Array.numpy``
    makes (it ``np.load``s the bytes); falls back to it for anything but a plain C-order
    ``.npy`` payload of version 1 or 2."""
    if array.stype == SType.NUMPY:
        buffer = BytesIO(array.data)
        version = np.lib.format.read_magic(buffer)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is not None:
            shape, fortran_order, dtype = read_header(buffer)
            if not fortran_order and not dtype.hasobject:
                return np.frombuffer(array.data, dtype=dtype, count=math.prod(shape),
                                     offset=buffer.tell()).reshape(shape)
    return array.numpy()


def float_keys(arrays: ArrayRecord) -> list[str]:
    return sorted(k for k in arrays.keys() if np.dtype(arrays[k].dtype).kind == "f")


def flat_delta(before: ArrayRecord, after: ArrayRecord) -> np.ndarray:
    """``after - before`` over the floating-point arrays in sorted key order, as one float32
    vector written in a single pass (the layout ``apply_delta`` inverts). Different keys or
    shapes raise ``ValueError``."""
    keys = float_keys(before)
    if keys != float_keys(after):
        raise ValueError("the trained model's arrays differ from the global model's")
    pairs = [(view(before[k]), view(after[k])) for k in keys]
    if any(b.shape != a.shape for b, a in pairs):
        raise ValueError("the trained model's array shapes differ from the global model's")
    out, offset = np.empty(sum(b.size for b, _ in pairs), dtype=np.float32), 0
    for b, a in pairs:
        np.subtract(a.ravel(), b.ravel(), out=out[offset:offset + b.size], casting="same_kind")
        offset += b.size
    return out


def apply_delta(like: ArrayRecord, delta: np.ndarray) -> ArrayRecord:
    """``like + delta`` (``flat_delta``'s layout): each float array added in float64 and
    rounded once to its own dtype; other arrays kept as they are, ``like``'s key order kept."""
    keys = float_keys(like)
    expected = sum(math.prod(like[k].shape) for k in keys)
    if expected != delta.size:
        raise ValueError(f"a delta of {delta.size} values for a model of {expected}")
    out, offset = {k: like[k] for k in like.keys()}, 0
    for key in keys:
        ref = view(like[key])
        total = np.empty(ref.shape, dtype=ref.dtype)
        np.add(ref, delta[offset:offset + ref.size].reshape(ref.shape), out=total,
               dtype=np.float64, casting="same_kind")
        out[key] = Array(total)
        offset += ref.size
    return ArrayRecord(out)
