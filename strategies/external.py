"""External sites: hospitals that score every global model but never train it.

A site's operator declares ``role = "external"`` in its node config (the server cannot
change it). Before sampling, the server asks each node it has not met yet for its role (a
``query`` message), then:

- training is sampled from the other nodes only (the inner strategy sees a grid without the
  external ones), so an external site never contributes to, or is charged for, an update;
- every evaluation round (when the inner strategy samples one) also goes to every connected
  external site, which scores the model on all of its labelled studies (split
  ``external``); its replies are kept out of the inner strategy's pooled val/test metrics,
  observers see them and record ``external/*``. No strategy pools them, so the values this
  wrapper checks itself (``pooling.evaluation_verdicts``, as the guard does for training
  sites): a refused reply is logged and reported (``external_rejected``), and observers
  leave it out.

A node that does not answer the query is treated as a training site this round and asked
again next round; an external site refuses a train message anyway (``client/app.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from protocol import wire
from protocol.metrics import report_splits

from .guard import Rejection, rejection
from .pooling import evaluation_verdicts
from .site_names import SiteNames, phase_names
from .state import RoundReport, StatelessWrapper

log = logging.getLogger("medfed.server")


class GridWithout:
    """``grid`` as a strategy should see it: the ``hidden`` nodes are not listed (everything
    else, e.g. sending messages, goes to the real grid)."""

    def __init__(self, grid: Grid, hidden: set[int]):
        self._grid, self._hidden = grid, frozenset(hidden)

    def get_node_ids(self):
        return [n for n in self._grid.get_node_ids() if n not in self._hidden]

    def __getattr__(self, name):
        return getattr(self._grid, name)


class ExternalSites(StatelessWrapper, Strategy):
    """Wrap ``strategy`` so that nodes whose role is external evaluate but never train.

    Stateless: roles are re-learnt by one query after a restart (a site's operator may have
    changed its role meanwhile, and a restarted federation's node ids are new anyway).
    A node is named on the console, and a refused reply, by the site id it holds in
    ``sites``, the run's binding (as the guard names one), never by the id it claims."""

    kind = "external-sites"

    def __init__(self, strategy: Strategy, query_timeout: float = 60.0,
                 sites: SiteNames | None = None):
        self.strategy = strategy
        self.query_timeout = query_timeout
        self.sites = sites
        self.roles: dict[int, str] = {}           # node id -> role, learnt by query
        self.rejected: list[Rejection] = []     # external replies refused this round

    def summary(self) -> None:
        self.strategy.summary()

    def round_report(self) -> RoundReport:
        """The external sites' evaluate replies refused in the last evaluation round."""
        return RoundReport(external_rejected=list(self.rejected))

    def external(self) -> set[int]:
        return {n for n, role in self.roles.items() if role == wire.ROLE_EXTERNAL}

    def discover(self, grid: Grid) -> None:
        """Ask every node not met yet for its role (one round trip, bounded by the timeout)."""
        unknown = [n for n in grid.get_node_ids() if n not in self.roles]
        if not unknown:
            return
        ask = RecordDict({wire.CONFIG: ConfigRecord({wire.QUERY: wire.QUERY_ROLE})})
        messages = [Message(content=ask, dst_node_id=n, message_type=MessageType.QUERY)
                    for n in unknown]
        # errors are logged below (asked again next round); a node is named as replies are
        answers = [r for r in grid.send_and_receive(messages, timeout=self.query_timeout)
                   if not r.has_error()]
        names, answered = phase_names(answers, self.sites), set()
        for reply in answers:
            site = reply.content.config_records.get(wire.SITE, ConfigRecord())
            role = str(site.get(wire.NODE_ROLE, wire.ROLE_TRAIN))
            node = reply.metadata.src_node_id
            answered.add(node)
            if role not in wire.ROLES:
                log.warning("site %s answered the role query with %r; treated as a training "
                            "site", names.name(node), role)
                role = wire.ROLE_TRAIN
            self.roles[node] = role
            if role == wire.ROLE_EXTERNAL:
                log.info("site %s is external: it evaluates every round and never trains",
                         names.name(node))
        for node in sorted(set(unknown) - answered):
            log.warning("node %s did not answer the role query; treated as a training site "
                        "this round, asked again next round", node)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.discover(grid)
        return self.strategy.configure_train(server_round, arrays, config,
                                             GridWithout(grid, self.external()))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        self.discover(grid)
        external = self.external() & set(grid.get_node_ids())
        messages = list(self.strategy.configure_evaluate(
            server_round, arrays, config, GridWithout(grid, external)))
        if external and messages:
            # the same instruction the training sites get (arrays and config as the inner
            # strategy and its wrappers built it); no evaluation round, no external one either
            messages += [Message(content=messages[0].content, dst_node_id=n,
                                 message_type=MessageType.EVALUATE) for n in sorted(external)]
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        external = self.external()
        replies = list(replies)
        inner = [m for m in replies if m.metadata.src_node_id not in external]
        scored = [m for m in replies if m.metadata.src_node_id in external
                  and not m.has_error()]
        metrics = [m.content.metric_records.get(wire.METRICS, MetricRecord()) for m in scored]
        self.rejected, names = [], phase_names(replies, self.sites)
        for msg, values, reason in zip(scored, metrics, evaluation_verdicts(metrics)):
            reason = reason or _not_external(values)
            if reason is not None:
                self.rejected.append(rejection(msg, reason, names))
                log.warning("round %d: evaluation from external site %s left out: %s",
                            server_round, self.rejected[-1].site_id, reason)
        return self.strategy.aggregate_evaluate(server_round, inner) if inner else None


def _not_external(metrics: MetricRecord) -> str | None:
    """Why an external site's reply is not an external evaluation (observers would pool its
    val/test figures with the training sites'), or None."""
    if report_splits(metrics)[0] != wire.EXTERNAL_SPLIT:
        return f"an external site must report split {wire.EXTERNAL_SPLIT!r} only"
    return None
