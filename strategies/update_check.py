"""A reply's model update, decoded and checked without trusting the reply.

:func:`check_update` decides whether a site's update may be aggregated: the global model's
keys, shapes and dtypes, finite values, a bounded distance from the global model. Each array
is decoded by :func:`decode`, which checks the npy header before anything is allocated and
never trusts the reply's own ``dtype``/``shape`` fields; what was checked travels on to the
inner strategy as :class:`CheckedArray`, so it is not decoded a second time.
"""

from __future__ import annotations

import io
import tokenize

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from numpy.lib import format as npy

from protocol.arrays import read_header


def npy_prefixes(reference: dict[str, np.ndarray]) -> dict[str, bytes]:
    """Per key, the bytes ``np.save`` (so Flower's ``Array``) begins an array of the
    reference's dtype and shape with, in C order: magic, format version 1.0, header."""
    out = {}
    for key, ref in reference.items():
        buf = io.BytesIO()
        npy.write_array_header_1_0(buf, {"descr": npy.dtype_to_descr(ref.dtype),
                                         "fortran_order": False, "shape": ref.shape})
        out[key] = buf.getvalue()
    return out


class Refused(ValueError):
    """An array whose npy header says it is not the reference's: the reason names it."""


# Errors a hostile payload can raise while its header is read or its data viewed: each
# is a rejection of that reply, never a failed round.
# NumPy parses an npy header with ast.literal_eval, after its own tokenize pass for old
# headers: a forged header can raise SyntaxError or tokenize.TokenError from there.
UNDECODABLE = (ValueError, TypeError, EOFError, MemoryError, OSError, RecursionError,
               SyntaxError, tokenize.TokenError)


def decode(array: Array, prefix: bytes | None, ref: np.ndarray, key: str = "array"
           ) -> np.ndarray:
    """``array.numpy()``'s values (read-only), checked against ``ref`` before anything is
    allocated for them; :class:`Refused` names a wrong shape, dtype, a short payload or
    bytes after the array (an accepted reply's bytes are kept: :class:`CheckedArray`).

    When the header is byte for byte ``prefix`` (the one for ``ref``'s dtype and shape,
    which ``np.load`` parses to exactly those) it is not parsed (``ast.literal_eval``:
    most of the cost); any other header is parsed by :func:`read_header` and must still
    say ``ref``'s shape and dtype. The reply's own ``dtype`` and ``shape`` fields are never
    trusted. Another serialisation raises ``TypeError``; a malformed header ``ValueError``.
    """
    data = array.data
    if array.stype != SType.NUMPY or not isinstance(data, bytes):
        raise TypeError(f"serialisation {array.stype!r} is not {SType.NUMPY!r}")
    fast = _prefixed(array, prefix, ref)
    if fast is not None:
        return fast
    shape, fortran, dtype, offset = read_header(data)
    if shape != ref.shape:
        raise Refused(f"wrong shape for {key}: {shape} != {ref.shape}")
    if dtype != ref.dtype:
        raise Refused(f"wrong dtype for {key}: {dtype} != {ref.dtype}")
    if len(data) - offset < ref.nbytes:
        raise Refused(f"truncated array for {key}: {len(data) - offset} of {ref.nbytes} bytes")
    if len(data) - offset > ref.nbytes:    # np.save writes none; they would travel unchecked
        raise Refused(f"{len(data) - offset - ref.nbytes} bytes after the array {key}")
    if ref.size == 0:
        empty = np.empty(ref.shape, ref.dtype)
        empty.flags.writeable = False             # like every other decoded value
        return empty
    # Fortran order is what np.save writes for an F-contiguous array (a transposed torch
    # parameter): an honest site's, so read as np.load reads it rather than refused.
    return np.frombuffer(data, dtype=dtype, count=ref.size, offset=offset).reshape(
        shape, order="F" if fortran else "C")


def _prefixed(array: Array, prefix: bytes | None, ref: np.ndarray) -> np.ndarray | None:
    """``array``'s values (a read-only view) when its bytes are ``prefix`` (the npy header
    of ``ref``'s dtype and shape) followed by exactly ``ref``'s size of data; else None."""
    data = array.data
    if (prefix is None or ref.size == 0 or array.stype != SType.NUMPY
            or not isinstance(data, bytes) or not data.startswith(prefix)
            or len(data) - len(prefix) != ref.nbytes):
        return None
    return np.frombuffer(data, dtype=ref.dtype, count=ref.size,
                         offset=len(prefix)).reshape(ref.shape)


def decode_global(arrays: ArrayRecord, previous: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The global model's values (the server's own arrays, not a reply's): each array whose
    npy header is byte for byte the one of ``previous``'s value for its key (the last
    round's global model: same dtype and shape) read without ``np.load`` parsing the header
    (~0.1 ms an array, most of a decode); any other as ``Array.numpy`` reads it."""
    prefixes = npy_prefixes({k: v for k, v in previous.items() if k in arrays})
    out = {}
    for key, array in arrays.items():
        value = _prefixed(array, prefixes.get(key), previous[key]) if key in prefixes else None
        out[key] = array.numpy() if value is None else value
    return out


class CheckedArray(Array):
    """An accepted reply's array as the guard decoded and checked it: the same bytes, its
    fields those of the checked values, and :meth:`numpy` without ``np.load`` parsing the
    npy header again (``ast.literal_eval``: most of what the inner strategy's aggregation
    spent decoding every reply a second time; 10 sites, demo model: see the commit)."""

    def __init__(self, value: np.ndarray, data: bytes):
        super().__init__(dtype=str(value.dtype), shape=tuple(int(n) for n in value.shape),
                         stype=SType.NUMPY, data=data)
        self.__dict__["_checked"] = value       # not a field: ids and chunks are the bytes'

    def __setattr__(self, name: str, value) -> None:
        # Flower's Array drops its cached id and chunks when a field is set; the checked
        # values are such a cache: kept, they would no longer be these bytes' values.
        if name in ("dtype", "shape", "stype", "data"):
            self.__dict__.pop("_checked", None)
        super().__setattr__(name, value)

    def numpy(self) -> np.ndarray:
        """The checked values as ``np.load`` gives them: a fresh, writable array, so a
        strategy that works in place (a DP wrapper's clipping) changes only its copy.
        After a field was set, the bytes are decoded as Flower's ``Array`` decodes them."""
        checked = self.__dict__.get("_checked")
        return super().numpy() if checked is None else checked.copy(order="K")

    def deflate(self) -> bytes:
        """As Flower's ``Array`` of the same fields and bytes (the wire names an object's
        class; a strategy that sends a reply's array on must send an ``Array``)."""
        return Array(dtype=self.dtype, shape=self.shape, stype=self.stype,
                     data=self.data).deflate()


def check_update(arrays: ArrayRecord | None, reference: dict[str, np.ndarray],
                 max_update_norm: float | None, prefixes: dict[str, bytes] | None = None,
                 decoded: dict[str, np.ndarray] | None = None
                 ) -> tuple[str | None, float | None]:
    """``(why the update must not be aggregated or None, its L2 distance from the global)``.

    ``reference`` holds the global arrays this round started from (their dtypes are the
    expected ones); ``prefixes``: :func:`npy_prefixes` of it, computed once per round, so
    that each reply's arrays are decoded without parsing their headers (:func:`decode`);
    ``decoded``, if given, receives each array's checked values (read-only views).
    A payload that cannot be decoded (truncated, another serialisation, a forged header)
    is a reason like any other: one site's bytes never fail the round or exhaust memory.
    """
    if arrays is None:
        return "no model update in reply", None
    if set(arrays.keys()) != set(reference):
        missing, extra = set(reference) - set(arrays.keys()), set(arrays.keys()) - set(reference)
        return f"wrong keys (missing {len(missing)}, unexpected {len(extra)})", None
    squared, prefixes = 0.0, prefixes or {}
    for key, ref in reference.items():
        try:
            value = decode(arrays[key], prefixes.get(key), ref, key)
        except Refused as refused:
            return str(refused), None
        except UNDECODABLE:
            return f"undecodable array for {key}", None
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return f"non-finite values in {key}", None
        if value.dtype.kind == "f":
            squared += float(np.sum((value.astype(np.float64) - ref.astype(np.float64)) ** 2))
        if decoded is not None:
            decoded[key] = value
    norm = float(np.sqrt(squared))
    if max_update_norm is not None and norm > max_update_norm:
        return f"update norm {norm:.3g} exceeds bound {max_update_norm:.3g}", norm
    return None, norm
