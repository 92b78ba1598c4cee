"""Fault guard around any Flower strategy: bounded waiting and update sanitization.

Flower's ``sample_nodes`` waits for ``min_available_nodes`` without a bound; this wrapper waits
at most ``quorum_timeout`` seconds and then fails with a clear error. Before aggregation it
drops replies whose update is not a finite array record with the global model's keys, shapes
and dtypes, or whose distance from the global model exceeds ``max_update_norm``
(``update_check``); it names the site (by the id its node holds in the run's binding,
``site_names``) and the reason, and fails the round if fewer than ``min_train_sites``
updates remain (a site's reply counts as one site; only the server's :class:`SummedReply`
of a secure round counts as the sites summed into it).
A wrapped strategy that needs more from a reply (FedNova: the local step count) says so with
a ``check_reply(msg) -> reason or None`` method; the guard rejects such replies the same way.
Train and evaluate replies alike are brought to one shape of records and metric keys
(``reply_shape``), so that no site's reply can make Flower's aggregation refuse the round;
where the aggregating strategy pools evaluations (``pooling.aggregate_evaluate_records``),
an evaluate reply whose values that pooling refuses is left out too (``evaluation_verdicts``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from protocol import wire
from protocol.site_errors import one_line

from .pooling import aggregate_evaluate_records, evaluation_verdicts
from .reply_shape import ReplyShape
from .site_names import SiteNames, phase_names
from .state import AGGREGATOR, RoundReport, StatelessWrapper, chain
from .update_check import CheckedArray, check_update, decode_global, npy_prefixes

log = logging.getLogger(__name__)


class QuorumError(RuntimeError):
    """Too few sites connected or too few usable updates to continue the federation.

    A round's error names each failed site by node id (``site_errors``: node -> its line);
    :meth:`named` says it with the site ids a wrapper that knows them has seen."""

    def __init__(self, message: str, site_errors: dict[int, str] | None = None):
        self.base, self.site_errors = message, dict(site_errors or {})
        super().__init__(self._text(lambda node: f"node {node}"))

    def _text(self, name) -> str:
        if not self.site_errors:
            return self.base
        return f"{self.base}; site errors: " + "; ".join(
            f"{name(node)}: {line}" for node, line in self.site_errors.items())

    def named(self, sites: dict[int, str]) -> QuorumError:
        """This error with each failed node named ``<site> (node <id>)`` where ``sites``
        (node id -> site id) knows it."""
        named = QuorumError(self.base, self.site_errors)
        named.args = (self._text(lambda node: f"{sites[node]} (node {node})" if node in sites
                                 else f"node {node}"),)
        return named


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
    """A reply left out: the site id its node holds in the run (``site_names``; else
    ``node-<id>``, never the id the reply claims), why, and the node it came from (Flower's
    node id, which a site cannot forge, unlike the site id in its reply; None where unknown)."""

    site_id: str
    reason: str
    node: int | None = None


def _metrics_of(msg: Message) -> MetricRecord:
    return msg.content.metric_records.get(wire.METRICS, MetricRecord())


class SummedReply(Message):
    """A reply the server built from ``sites`` sites' updates (SecAgg+'s unmasked sum).

    Only server code makes one: Flower decodes what a site sends into a plain ``Message``, so
    the class, unlike a number in a reply's metrics, cannot be forged by a site. The guard
    counts a reply as ``sites`` sites towards ``min_train_sites`` only if it is one.
    """

    def __init__(self, content: RecordDict, *, reply_to: Message, sites: int):
        super().__init__(content=content, reply_to=reply_to)
        self.sites = sites


SECURE_SUM = "secure-sum"       # how a summed reply is named: several sites', no one site's


def sender(msg: Message, names: SiteNames) -> str:
    """Who ``msg`` is from, for a log line or a rejection: the site id its node holds in
    ``names`` (the run's binding; else ``node-<id>``), never the id the reply claims; a
    :class:`SummedReply` is :data:`SECURE_SUM` (its node is one of the sites summed)."""
    if isinstance(msg, SummedReply):
        return SECURE_SUM
    return names.name(msg.metadata.src_node_id)


def rejection(msg: Message, reason: str, names: SiteNames) -> Rejection:
    """``msg`` left out for ``reason``, named by :func:`sender` (a secure sum: no node)."""
    node = None if isinstance(msg, SummedReply) else msg.metadata.src_node_id
    return Rejection(sender(msg, names), reason, node)


def sites_problem(msg: Message, sampled: int) -> str | None:
    """Why a summed reply's site count is not an int in [1, ``sampled``], or None (a
    site's own reply counts as 1 whatever its metrics say)."""
    if not isinstance(msg, SummedReply):
        return None
    if isinstance(msg.sites, bool) or not isinstance(msg.sites, int) or not (
            1 <= msg.sites <= sampled):
        return f"a secure sum of {msg.sites!r} sites, {sampled} sampled this round"
    return None


def _sites_in(msg: Message) -> int:
    """Sites behind one accepted reply: 1 for a site's own, the count of a summed one."""
    return msg.sites if isinstance(msg, SummedReply) else 1


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
    if key == wire.DP_UNIT_WEIGHT and value != 1.0:   # Flower's accounted DP raises otherwise
        return f"{key} {value!r} is not 1.0 (site-level DP: one vote per site)"
    return None


def error_line(msg: Message) -> str:
    """A site's error reply as one short line (``protocol.site_errors.one_line``)."""
    text = one_line(str(msg.error.reason)) if str(msg.error.reason).strip() else \
        f"error code {msg.error.code}"
    return text[:300]


def error_summary(msg: Message) -> str:
    """:func:`error_line` after the node id that sent it."""
    return f"node {msg.metadata.src_node_id}: {error_line(msg)}"


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
    sites : SiteNames, optional
        The run's site-id binding, which the observer above binds each phase's claims into:
        a reply is named on the console and in a rejection by the site id its node holds,
        so a node claiming another site's id cannot have that site blamed. None (the guard
        on its own): each phase's own claims (``site_names.phase_names``).

    Rejected train replies are in ``rejected``, rejected evaluate replies in
    ``evaluate_rejected`` (both logged and in the round report).
    """

    kind = "guard"

    def __init__(self, strategy: Strategy, *, min_available_sites: int, min_train_sites: int,
                 quorum_timeout: float, max_update_norm: float | None = None,
                 max_norm_ratio: float | None = 10.0, poll_interval: float = 0.5,
                 sites: SiteNames | None = None):
        self.strategy = strategy
        self.sites = sites
        self.min_available_sites = min_available_sites
        self.min_train_sites = min_train_sites
        self.quorum_timeout = quorum_timeout
        self.max_update_norm = max_update_norm
        self.max_norm_ratio = max_norm_ratio
        self.poll_interval = poll_interval
        self.rejected: list[Rejection] = []
        self.evaluate_rejected: list[Rejection] = []
        self._sampled = 0                       # train messages configured this round
        self.update_norms: dict[int, float] = {}      # node id -> ||local - global|| this round
        self._reference: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] | None = None   # the model's dtypes: the contract
        self._check_reply = getattr(strategy, "check_reply", None)   # the strategy's own needs
        # the weight is the aggregating Flower strategy's, at the bottom of the chain (a DP
        # wrapper in between has none of its own: site-level DP weighs by dp-unit-weight)
        aggregator = dict(chain(strategy))[AGGREGATOR]
        self._weight_key = getattr(aggregator, "weighted_by_key", wire.NUM_EXAMPLES)
        # the pooled evaluation decodes every value: what it would refuse is checked first
        self._pools_evaluations = getattr(aggregator, "evaluate_metrics_aggr_fn",
                                          None) is aggregate_evaluate_records

    def summary(self) -> None:
        self.strategy.summary()

    def round_report(self) -> RoundReport:
        """The replies rejected in the last aggregated round (train and evaluate) and every
        update's norm."""
        return RoundReport(rejected=list(self.rejected), update_norms=dict(self.update_norms),
                           evaluate_rejected=list(self.evaluate_rejected))

    def wait_for_quorum(self, grid: Grid) -> None:
        wait_for_quorum(grid, self.min_available_sites, self.quorum_timeout, self.poll_interval)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.wait_for_quorum(grid)
        self.rejected, self.update_norms = [], {}     # none reported before this round's replies
        values = decode_global(arrays, self._reference)     # each decoded once
        if self._dtypes is None:
            self._dtypes = {k: v.dtype for k, v in values.items()}
        self._reference = {k: v.astype(self._dtypes.get(k, v.dtype), copy=False)
                           for k, v in values.items()}
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self._sampled = len(messages)      # bounds what a secure sum can stand for
        return messages

    def _shape(self, *, train: bool) -> ReplyShape:
        # Flower's train metric averaging zips lists; evaluation pooling decodes its own
        return ReplyShape(arrays=train, weight_key=self._weight_key, list_lengths=train)

    def _conform(self, server_round: int, phase: str, candidates: list[Message],
                 shape: ReplyShape, names: SiteNames) -> list[tuple[Message, str | None]]:
        """Each candidate with why it does not fit the round's agreed metric keys (or None,
        its extra keys then stripped); stripped keys and records are logged, counted."""
        agreed = shape.agree(candidates)
        out = []
        for msg in candidates:
            reason, stripped = shape.conform(msg, agreed)
            if stripped:
                log.warning("round %d: %d metric key(s) from %s that the other sites do not "
                            "send left out of %s", server_round, stripped,
                            sender(msg, names), phase)
            out.append((msg, reason))
        return out

    def _strip_records(self, server_round: int, phase: str, msg: Message,
                       shape: ReplyShape, names: SiteNames) -> None:
        stripped = shape.strip_records(msg)
        if stripped:
            log.warning("round %d: %d unexpected record(s) from %s left out of %s",
                        server_round, stripped, sender(msg, names), phase)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.rejected, self.update_norms = [], {}
        accepted, verdicts, checked = [], [], {}
        prefixes, shape = npy_prefixes(self._reference), self._shape(train=True)
        replies = list(replies)
        names = phase_names(replies, self.sites)
        for msg in replies:
            if msg.has_error():
                accepted.append(msg)          # the inner strategy counts and logs failures
                continue
            self._strip_records(server_round, "aggregation", msg, shape, names)
            arrays, decoded = msg.content.array_records.get(wire.ARRAYS), {}
            reason, norm = check_update(arrays, self._reference, self.max_update_norm,
                                        prefixes, decoded)
            if reason is None:
                reason = weight_problem(msg, self._weight_key) or sites_problem(
                    msg, self._sampled)
            if reason is None and self._check_reply is not None:
                reason = self._check_reply(msg)
            if norm is not None:
                self.update_norms[msg.metadata.src_node_id] = norm
            verdicts.append((msg, reason, norm))
            checked[id(msg)] = decoded
        norms = [n for _, r, n in verdicts if n is not None and (r is None or "exceeds" in r)]
        if self.max_norm_ratio is not None and len(norms) >= 3:
            limit = self.max_norm_ratio * float(np.median(norms))
            verdicts = [(m, r if r is not None or n <= limit else
                         f"update norm {n:.3g} is over {self.max_norm_ratio:g}x the round's "
                         f"median ({limit / self.max_norm_ratio:.3g})", n) for m, r, n in verdicts]
        # the metric keys are agreed among the updates otherwise accepted (reply_shape)
        fits = {id(m): r for m, r in self._conform(
            server_round, "aggregation", [m for m, r, _ in verdicts if r is None], shape,
            names)}
        for msg, reason, _ in verdicts:
            reason = reason or fits[id(msg)]
            if reason is None:
                accepted.append(msg)
                # what the inner strategy decodes: the values checked (CheckedArray)
                arrays = msg.content.array_records[wire.ARRAYS]
                for key, value in checked[id(msg)].items():
                    arrays[key] = CheckedArray(value, arrays[key].data)
            else:
                self.rejected.append(rejection(msg, reason, names))
                log.warning("round %d: rejected update from %s: %s", server_round,
                            self.rejected[-1].site_id, reason)
        usable = sum(_sites_in(m) for m in accepted if not m.has_error())
        if usable < self.min_train_sites:
            raise QuorumError(f"round {server_round}: {usable} usable update(s), "
                              f"{self.min_train_sites} required (strategy.min_train_sites); "
                              f"rejected: {[f'{r.site_id}: {r.reason}' for r in self.rejected]}",
                              {m.metadata.src_node_id: error_line(m)
                               for m in accepted if m.has_error()})
        weights = [_metrics_of(m).get(self._weight_key, 0.0) for m in accepted
                   if not m.has_error()]
        if weights and sum(weights) == 0:   # FedAvg would divide by it: the round fails
            log.warning("round %d: every accepted update has %s 0 (no site had anything to "
                        "train on): the global model stays as it was", server_round,
                        self._weight_key)
            return None, None
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
        self.evaluate_rejected = []      # a round whose evaluation is never aggregated reports none
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        """Evaluate replies get the same records and metric-key checks as train replies
        (``reply_shape``), a usable weight and, where evaluations are pooled, values the
        pooling accepts (``evaluation_verdicts``); one that fails is left out (logged, in
        ``evaluate_rejected``), never the round's evaluation."""
        replies, shape, reasons = list(replies), self._shape(train=False), {}
        names = phase_names(replies, self.sites)
        self.evaluate_rejected = []
        for msg in replies:
            if not msg.has_error():
                self._strip_records(server_round, "evaluation", msg, shape, names)
                reasons[id(msg)] = weight_problem(msg, self._weight_key)
        candidates = [m for m in replies if id(m) in reasons and reasons[id(m)] is None]
        reasons |= {id(m): r for m, r in self._conform(server_round, "evaluation",
                                                        candidates, shape, names)}
        if self._pools_evaluations:      # judged among the replies of the agreed shape
            candidates = [m for m in candidates if reasons[id(m)] is None]
            reasons |= {id(m): r for m, r in zip(candidates, evaluation_verdicts(
                [m.content.metric_records[wire.METRICS] for m in candidates]))}
        self.evaluate_rejected = [rejection(m, reasons[id(m)], names)
                                  for m in replies if reasons.get(id(m)) is not None]
        for refused in self.evaluate_rejected:
            log.warning("round %d: evaluation from %s left out: %s", server_round,
                        refused.site_id, refused.reason)
        kept = [m for m in replies if reasons.get(id(m)) is None]
        return self.strategy.aggregate_evaluate(server_round, kept)
