"""A strategy wrapper that reports every round to observers (tracking, console, checkpoints).

It holds an inner Flower strategy and delegates all four phases to it, as Flower's DP
wrappers do; Flower's ``Strategy.start`` keeps owning the round loop. Observers see per-site
replies (site id, metrics) next to the aggregate, and the wall time of each round.

What observers see of a reply is what the wrappers below accepted: an evaluate reply the
guard (or, from an external site, ``ExternalSites``) refused is not among ``evaluate`` but in
``evaluate_rejected`` (observers decode evaluations; a refused one may not decode), and a
site's metric keys are only those a majority of the phase's replies carry (``ReplyShape``'s
rule: the guard's), so one site cannot choose per-site MLflow keys or console figures.

Two things make runs reproducible and resumable: replies are handed on in site-id order
(floating-point sums depend on order, and replies arrive in completion order), and a
``round_offset`` lets a resumed run continue its round numbering (sites derive their seeds
from it) while Flower's loop counts from 1 again.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from protocol import wire
from protocol.metrics import report_splits

from .guard import QuorumError
from .reply_shape import ReplyShape
from .site_names import ClaimRefused, SiteNames, phase_names, site_claims
from .state import StatelessWrapper, chain_reports, merge_reports

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteReply:
    """What one site answered in one phase (numbers and ids only; never patient data)."""

    site_id: str
    node_id: int
    metrics: dict[str, float | list]    # evaluate: decode with protocol.metrics.from_record
    manifest: str = ""
    ingest: str = ""          # JSON of ingest counts (files, skipped by reason, ...)


@dataclass(frozen=True)
class SiteFailure:
    """A site's failed reply in one phase: which site (named from its earlier replies, else
    ``node-<id>``), its node id, and the error reason Flower carried."""

    site: str
    node: int
    reason: str

    def __str__(self) -> str:
        return f"{self.site} (node {self.node}): {self.reason}"


@dataclass
class RoundRecord:
    """Everything observers learn about one round."""

    round: int
    started: float = field(default_factory=time.perf_counter)
    train: list[SiteReply] = field(default_factory=list)
    evaluate: list[SiteReply] = field(default_factory=list)
    failures: dict[str, list[SiteFailure]] = field(default_factory=dict)   # by phase
    train_metrics: dict[str, float] = field(default_factory=dict)
    rejected: list = field(default_factory=list)     # guard.Rejection: site id and reason
    evaluate_rejected: list = field(default_factory=list)   # guard.Rejection, evaluate replies
    update_norms: dict[str, float] = field(default_factory=dict)   # site id -> ||local - global||
    arrays: ArrayRecord | None = None
    wall_seconds: float = 0.0
    site_level_epsilon: float | None = None   # site-level DP: epsilon spent after this round
    arrays_sha256: str = ""     # of ``arrays``, once an observer computed it (once a round)
    secagg_clipped: int | None = None         # secure aggregation: values clipped by encoding
    secagg_capped: int | None = None          # ... and sites whose weight it capped
    names_refused: list[ClaimRefused] = field(default_factory=list)   # site ids not granted
    # ``arrays`` decoded, once a round: (the ArrayRecord they were decoded from, values)
    _decoded: tuple | None = field(default=None, repr=False, compare=False)

    def dropped(self, phase: str) -> list[str]:
        """Ids of the sites whose reply in ``phase`` failed, sorted."""
        return sorted(f.site for f in self.failures.get(phase, []))

    def values(self) -> dict[str, np.ndarray]:
        """``arrays`` decoded, each array once a round whichever observer asks first (the
        tracker's model and digest, the checkpoint's file and digest: ~4 ms of the round
        loop's CPU per decode of the demo model, most of it ``np.load`` parsing headers).
        Shared: read them, never write into them. Empty when the round has no arrays."""
        if self.arrays is None:
            return {}
        if self._decoded is None or self._decoded[0] is not self.arrays:
            self._decoded = (self.arrays, {k: a.numpy() for k, a in self.arrays.items()})
        return self._decoded[1]


class RoundObserver(Protocol):
    def on_train(self, record: RoundRecord) -> None: ...
    def on_round_end(self, record: RoundRecord) -> None: ...


def site_replies(replies: Iterable[Message], names: SiteNames | None = None,
                 targets: dict[str, int] | None = None
                 ) -> tuple[list[SiteReply], list[SiteFailure]]:
    """Split replies into per-site results and failures, each named by the site id its node
    holds in ``names`` (the run's, whose claims were made; none given: these replies'
    claims, in a new one), else ``node-<id>``: one node cannot write its figures under
    another site's name (``strategies.site_names``: the rule).

    An error the SuperLink writes for a vanished node comes from the SuperLink itself; its
    ``reply_to_message_id`` finds the node the instruction went to in ``targets``.
    """
    ok, failed = [], []
    targets = targets or {}
    replies = list(replies)
    names = phase_names(replies, names)
    for msg in replies:
        if msg.has_error():
            node = targets.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            failed.append(SiteFailure(names.name(node), node, msg.error.reason))
            continue
        content = msg.content
        site = content.config_records.get(wire.SITE, ConfigRecord())
        metrics = content.metric_records.get(wire.METRICS, MetricRecord())
        ok.append(SiteReply(
            site_id=names.name(msg.metadata.src_node_id),
            node_id=msg.metadata.src_node_id,
            # lists too: an evaluate reply's confusion counts and AUROC (protocol.metrics)
            metrics={k: list(v) if isinstance(v, list) else float(v) for k, v in metrics.items()
                     if isinstance(v, (int, float, list))},
            manifest=str(site.get(wire.MANIFEST, "")),
            ingest=str(site.get(wire.INGEST, "")),
        ))
    return sorted(ok, key=lambda r: r.site_id), failed


def ordered(replies: Iterable[Message]) -> list[Message]:
    """Replies sorted by site id (then node id), independent of arrival order."""
    def key(msg: Message):
        site = msg.content.config_records.get(wire.SITE, ConfigRecord()) if msg.has_content() else {}
        return (str(site.get(wire.SITE_ID, "")), msg.metadata.src_node_id)
    return sorted(replies, key=key)


class ObservedStrategy(StatelessWrapper, Strategy):
    """Wrap ``strategy`` and call ``observers`` after training and at the end of each round.

    Stateless: the round offset is the checkpoint's round, given again when a run resumes.

    What the wrappers below it did in a round (rejected updates, update norms, site-level
    epsilon, clipped values) comes from their merged round reports (``strategies/state.py``).
    """

    kind = "observed"

    def __init__(self, strategy: Strategy, observers: list[RoundObserver], round_offset: int = 0,
                 sites: SiteNames | dict[int, str] | None = None):
        self.strategy = strategy
        self.observers = list(observers)
        self.round_offset = round_offset
        self._round: RoundRecord | None = None
        # node id <-> site id for the run (strategies.site_names), to name every reply and a
        # site that fails: bound by the preflight's answers (``sites``; the run's SiteNames,
        # shared by its phases), then by the run's replies
        self._sites = SiteNames.of(sites)
        self._sent: dict[str, list[Message]] = {}   # phase -> instructions (ids set when pushed)

    def _record(self, record: RoundRecord, phase: str, replies: list[Message],
                refused: frozenset[int] = frozenset(), *, keep_refused: bool = False
                ) -> list[SiteReply]:
        """The phase's site replies, each with only the metric keys a majority of the
        replies the wrappers accepted carry (module docstring); a reply from a ``refused``
        node neither votes nor, unless ``keep_refused``, is listed. A training site's
        figures are numbers only (one MLflow metric each; NaN/inf kept, they are news)."""
        # the instructions are needed only until their replies are in (one per site)
        targets = {m.metadata.message_id: m.metadata.dst_node_id
                   for m in self._sent.pop(phase, [])}
        ok, record.failures[phase] = site_replies(replies, self._sites, targets)
        # external sites' evaluations carry other keys than the training sites': each its own
        groups: dict[bool, list[Message]] = {}
        for msg in replies:
            if not msg.has_error() and msg.metadata.src_node_id not in refused:
                metrics = msg.content.metric_records.get(wire.METRICS, MetricRecord())
                groups.setdefault(wire.EXTERNAL_SPLIT in report_splits(metrics), []).append(msg)
        shape = ReplyShape(arrays=False, weight_key=wire.NUM_EXAMPLES, list_lengths=False)
        known = {key for group in groups.values() for key in shape.agree(group)}
        kept = (lambda v: isinstance(v, float)) if phase == "train" else (lambda v: True)
        return [dataclasses.replace(r, metrics={k: v for k, v in r.metrics.items()
                                                if k in known and kept(v)})
                for r in ok if keep_refused or r.node_id not in refused]

    def _named(self, rejections: list) -> list:
        """Rejections named as this round's replies are (a name two nodes claimed: node-<id>)."""
        return [dataclasses.replace(r, site_id=self._sites.name(r.node))
                if r.node is not None else r for r in rejections]

    def _claim(self, record: RoundRecord, replies: list[Message]) -> None:
        """Bind the phase's site-id claims for the run; a refused one is logged loudly and
        kept in the round record (MLflow tags it)."""
        for refused in self._sites.claim(site_claims(replies)):
            log.warning("site id refused: %s", refused)
            record.names_refused.append(refused)

    def summary(self) -> None:
        self.strategy.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._round = RoundRecord(server_round)
        self._sent["train"] = list(self.strategy.configure_train(server_round, arrays, config, grid))
        return self._sent["train"]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = ordered(replies)
        record = self._round or RoundRecord(server_round)
        self._claim(record, replies)
        try:
            arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        except QuorumError as err:     # the failed sites by the names this run knows them by
            raise err.named(self._sites.bound()) from None
        finally:       # also when the round fails: what was rejected is part of the story
            report = merge_reports(chain_reports(self.inner))
            rejected = list(report.get("rejected", []))
            # read after the wrappers: the replies they accepted are in their agreed shape,
            # and a rejected one neither chooses the keys shown nor shows more than them
            record.train = self._record(record, "train", replies, frozenset(
                r.node for r in rejected if r.node is not None), keep_refused=True)
            record.rejected = self._named(rejected)
            # by node, named as the replies are (a name two nodes claimed: node-<id> for
            # both), so one site's norm never stands under, or overwrites, another's
            record.update_norms = {self._sites.name(node): norm
                                   for node, norm in report.get("update_norms", {}).items()}
            record.site_level_epsilon = report.get("site_level_epsilon")
            record.secagg_clipped = report.get("secagg_clipped")
            record.secagg_capped = report.get("secagg_capped")
        record.arrays = arrays
        record.train_metrics = dict(metrics or {})
        for observer in self.observers:
            observer.on_train(record)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._sent["evaluate"] = list(self.strategy.configure_evaluate(server_round, arrays, config,
                                                                       grid))
        return self._sent["evaluate"]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        server_round += self.round_offset
        replies = ordered(replies)
        record = self._round or RoundRecord(server_round)
        self._claim(record, replies)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        report = merge_reports(chain_reports(self.inner))
        rejected = [*report.get("evaluate_rejected", []), *report.get("external_rejected", [])]
        record.evaluate = self._record(record, "evaluate", replies, frozenset(
            r.node for r in rejected))
        record.evaluate_rejected = self._named(rejected)
        record.wall_seconds = time.perf_counter() - record.started
        for observer in self.observers:
            observer.on_round_end(record)
        self._round = None
        return metrics
