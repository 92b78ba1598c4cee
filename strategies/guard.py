"""Fault guard around any Flower strategy: bounded waiting and update sanitization.

Flower's ``sample_nodes`` waits for ``min_available_nodes`` without a bound; this wrapper waits
at most ``quorum_timeout`` seconds and then fails with a clear error. Before aggregation it
drops replies whose update is not a finite array record with the global model's keys, shapes
and dtypes, or whose distance from the global model exceeds ``max_update_norm``; it names the
site and the reason, and fails the round if fewer than ``min_train_sites`` updates remain.
A wrapped strategy that needs more from a reply (FedNova: the local step count) says so with
a ``check_reply(msg) -> reason or None`` method; the guard rejects such replies the same way.
"""

from __future__ import annotations

import io
import logging
import math
import time
import tokenize
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.constant import SType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from numpy.lib import format as npy

from protocol import wire
from protocol.arrays import read_header

from .state import RoundReport, StatelessWrapper

log = logging.getLogger(__name__)


class QuorumError(RuntimeError):
    """Too few sites connected or too few usable updates to continue the federation."""


def wait_for_quorum(grid: Grid, minimum: int, timeout: float, poll: float = 0.5) -> None:
    """Until ``minimum`` nodes are connected; :class:`QuorumError` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while (connected := len(list(grid.get_node_ids()))) < minimum:
        if time.monotonic() >= deadline:
            raise QuorumError(f"only {connected} of the {minimum} required sites connected "
                              f"within {timeout:g} s (federation.quorum_timeout)")
        time.sleep(poll)


@dataclass(frozen=True)
class Rejection:
    site_id: str
    reason: str


def reply_site_id(msg: Message) -> str:
    site = msg.content.config_records.get(wire.SITE, ConfigRecord()) if msg.has_content() else {}
    return str(site.get(wire.SITE_ID, f"node-{msg.metadata.src_node_id}"))


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
    if (prefix is not None and ref.size > 0 and data.startswith(prefix)
            and len(data) - len(prefix) == ref.nbytes):
        return np.frombuffer(data, dtype=ref.dtype, count=ref.size,
                             offset=len(prefix)).reshape(ref.shape)
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


class CheckedArray(Array):
    """An accepted reply's array as the guard decoded and checked it: the same bytes, its
    fields those of the checked values, and :meth:`numpy` without ``np.load`` parsing the
    npy header again (``ast.literal_eval``: most of what the inner strategy's aggregation
    spent decoding every reply a second time; 10 sites, demo model: see the commit)."""

    def __init__(self, value: np.ndarray, data: bytes):
        super().__init__(dtype=str(value.dtype), shape=tuple(int(n) for n in value.shape),
                         stype=SType.NUMPY, data=data)
        self.__dict__["_checked"] = value       # not a field: ids and chunks are the bytes'

    def numpy(self) -> np.ndarray:
        """The checked values as ``np.load`` gives them: a fresh, writable array, so a
        strategy that works in place (a DP wrapper's clipping) changes only its copy."""
        return self.__dict__["_checked"].copy(order="K")

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


def _sites_in(msg: Message) -> int:
    """Sites behind one reply: 1, or the number summed into a secure-aggregation reply."""
    metrics = msg.content.metric_records.get(wire.METRICS, MetricRecord())
    return int(metrics.get(wire.SECAGG_SITES, 1))


def weight_problem(msg: Message, key: str) -> str | None:
    """Why a reply's aggregation weight (``key``, e.g. num-examples) is unusable, or None.

    FedAvg divides by the weights' sum and scales every update by its weight: a NaN or
    infinite weight makes the whole global model NaN, a negative one can bring the sum to zero
    and fail the round. (Zero - a site with nothing to train on - adds nothing; any finite
    weight >= 0 is taken as sent: weighting by claimed examples trusts the claim.)
    """
    value = msg.content.metric_records.get(wire.METRICS, MetricRecord()).get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"no numeric {key}"
    if not math.isfinite(value) or value < 0:
        return f"{key} {value!r} is not a finite number >= 0"
    return None


def error_summary(msg: Message) -> str:
    """The last line of a site's error reply (Flower puts the exception text there), short."""
    lines = [line.strip() for line in str(msg.error.reason).splitlines() if line.strip()]
    text = lines[-1] if lines else f"error code {msg.error.code}"
    return f"node {msg.metadata.src_node_id}: {text[:300]}"


class GuardedStrategy(StatelessWrapper, Strategy):
    """Wrap ``strategy`` with a bounded quorum wait and update sanitization.

    Parameters
    ----------
    strategy : Strategy
        The aggregation strategy (FedAvg, FedAdam, Krum, ...).
    min_available_sites, min_train_sites : int
        Quorum: sites that must be connected before a phase starts, and usable updates a
        round needs.
    quorum_timeout : float
        Seconds to wait for ``min_available_sites`` before failing.
    max_update_norm : float, optional
        L2 bound on ``local - global``; None disables the absolute bound.
    max_norm_ratio : float, optional
        Scale-free bound, on by default: with at least three well-formed updates, one whose
        norm exceeds this multiple of the round's median norm is rejected (catches a x1e6
        site without knowing the model's scale). None disables it.
    """

    kind = "guard"

    def __init__(self, strategy: Strategy, *, min_available_sites: int, min_train_sites: int,
                 quorum_timeout: float, max_update_norm: float | None = None,
                 max_norm_ratio: float | None = 10.0, poll_interval: float = 0.5):
        self.strategy = strategy
        self.min_available_sites = min_available_sites
        self.min_train_sites = min_train_sites
        self.quorum_timeout = quorum_timeout
        self.max_update_norm = max_update_norm
        self.max_norm_ratio = max_norm_ratio
        self.poll_interval = poll_interval
        self.rejected: list[Rejection] = []
        self.update_norms: dict[str, float] = {}      # site id -> ||local - global|| this round
        self._reference: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] | None = None   # the model's dtypes: the contract
        self._check_reply = getattr(strategy, "check_reply", None)   # the strategy's own needs

    def summary(self) -> None:
        self.strategy.summary()

    def round_report(self) -> RoundReport:
        """The replies rejected in the last aggregated round and every update's norm."""
        return RoundReport(rejected=list(self.rejected), update_norms=dict(self.update_norms))

    def wait_for_quorum(self, grid: Grid) -> None:
        wait_for_quorum(grid, self.min_available_sites, self.quorum_timeout, self.poll_interval)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.wait_for_quorum(grid)
        values = {k: a.numpy() for k, a in arrays.items()}     # each decoded once
        if self._dtypes is None:
            self._dtypes = {k: v.dtype for k, v in values.items()}
        self._reference = {k: v.astype(self._dtypes.get(k, v.dtype), copy=False)
                           for k, v in values.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.rejected, self.update_norms = [], {}
        accepted, verdicts, checked = [], [], {}
        prefixes = npy_prefixes(self._reference)
        for msg in replies:
            if msg.has_error():
                accepted.append(msg)          # the inner strategy counts and logs failures
                continue
            arrays, decoded = msg.content.array_records.get(wire.ARRAYS), {}
            reason, norm = check_update(arrays, self._reference, self.max_update_norm,
                                        prefixes, decoded)
            if reason is None:
                reason = weight_problem(msg, getattr(self.strategy, "weighted_by_key",
                                                     wire.NUM_EXAMPLES))
            if reason is None and self._check_reply is not None:
                reason = self._check_reply(msg)
            if norm is not None:
                self.update_norms[reply_site_id(msg)] = norm
            verdicts.append((msg, reason, norm))
            checked[id(msg)] = decoded
        norms = [n for _, r, n in verdicts if n is not None and (r is None or "exceeds" in r)]
        if self.max_norm_ratio is not None and len(norms) >= 3:
            limit = self.max_norm_ratio * float(np.median(norms))
            verdicts = [(m, r if r is not None or n <= limit else
                         f"update norm {n:.3g} is over {self.max_norm_ratio:g}x the round's "
                         f"median ({limit / self.max_norm_ratio:.3g})", n) for m, r, n in verdicts]
        for msg, reason, _ in verdicts:
            if reason is None:
                accepted.append(msg)
                # what the inner strategy decodes: the values checked (CheckedArray)
                arrays = msg.content.array_records[wire.ARRAYS]
                for key, value in checked[id(msg)].items():
                    arrays[key] = CheckedArray(value, arrays[key].data)
            else:
                self.rejected.append(Rejection(reply_site_id(msg), reason))
                log.warning("round %d: rejected update from %s: %s", server_round,
                            reply_site_id(msg), reason)
        usable = sum(_sites_in(m) for m in accepted if not m.has_error())
        if usable < self.min_train_sites:
            errors = [error_summary(m) for m in accepted if m.has_error()]
            raise QuorumError(f"round {server_round}: {usable} usable update(s), "
                              f"{self.min_train_sites} required (strategy.min_train_sites); "
                              f"rejected: {[f'{r.site_id}: {r.reason}' for r in self.rejected]}; "
                              f"site errors: {errors}")
        arrays, metrics = self.strategy.aggregate_train(server_round, accepted)
        return self._as_model_dtypes(arrays), metrics

    def _as_model_dtypes(self, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """Flower's adaptive strategies compute in float64 (NumPy promotion); the global model
        keeps the dtypes it started with, so sites, checks and checkpoints agree."""
        if arrays is None or not self._dtypes:
            return arrays
        out = {}
        for key, array in arrays.items():
            dtype = self._dtypes.get(key)
            if dtype is not None and array.dtype == str(dtype):
                out[key] = array    # aggregated here: its dtype field is its array's; no decode
                continue
            value = array.numpy()
            dtype = value.dtype if dtype is None else dtype
            out[key] = Array(value.astype(dtype)) if value.dtype != dtype else array
        return ArrayRecord(out)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.wait_for_quorum(grid)
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
