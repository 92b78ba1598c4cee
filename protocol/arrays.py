"""The layout of a model update on the wire: a flat float32 ``after - before`` vector over the
floating-point arrays in sorted key order (what a site masks, what the server unmasks)."""

from __future__ import annotations

import math
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType


def read_header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, offset of the data)`` of an npy payload, parsed by
    NumPy's own header reader (bounded by its ``max_header_size``) and nothing allocated
    for the array: ``np.load`` would allocate the header's shape before it found the data
    missing (a forged ``(2**31,)`` costs 8 GiB), so the header is checked first."""
    buf = BytesIO(data)
    version = np.lib.format.read_magic(buf)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
    else:                            # 3.0 only for unicode field names: never a model's
        raise ValueError(f"npy format version {version} is not 1.0 or 2.0")
    return shape, fortran, dtype, buf.tell()


def view(array: Array) -> np.ndarray:
    """A read-only NumPy view of an ``Array``'s payload, without the copy ``Array.numpy``
    makes (it ``np.load``s the bytes); falls back to it for anything but a plain C-order
    ``.npy`` payload of version 1 or 2. For the server's own arrays and trusted ones: a
    site's reply is checked against what is expected first
    (``strategies.update_check.decode``)."""
    if array.stype == SType.NUMPY:
        try:
            shape, fortran_order, dtype, offset = read_header(array.data)
        except ValueError:
            return array.numpy()
        if not fortran_order and not dtype.hasobject:
            return np.frombuffer(array.data, dtype=dtype, count=math.prod(shape),
                                 offset=offset).reshape(shape)
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
