"""One shape for every reply of a round, so that one site's reply cannot fail the round.

Flower's aggregation refuses to aggregate (``InconsistentMessageReplies``, raised into the
round loop: the round fails for every site) when replies differ in their number of
ArrayRecords or MetricRecords or in their metric keys (``validate_message_reply_consistency``),
and ``aggregate_metricrecords`` raises when a metric is a list in one reply and a number, or
a list of another length, in another; it also sums *every* ArrayRecord of a reply into the
model. The guard therefore brings the replies it accepts to one shape before the inner strategy
sees them:

- records: the ArrayRecord ``wire.ARRAYS`` (train replies) and the MetricRecord
  ``wire.METRICS``; any other ArrayRecord or MetricRecord is stripped. (ConfigRecords are not
  aggregated; the site's identity travels in one.)
- metric keys: the aggregation weight (required) and every key that more than half of the
  round's otherwise acceptable replies carry in the same form (a number, or a list - of one
  length where the aggregation zips lists). That is the honest majority's shape, never the
  first reply's (an attacker can arrange to be first) nor the union or intersection of all
  (one site would then choose the others' keys). A reply that lacks an agreed key, or carries
  it in another form, is rejected: filling it in would invent a site's number. A key that no
  majority carries is stripped from every reply.

A train reply whose weight is 0 (a site with no training study for the task: the engine then
sends no ``train_*`` figures) does not vote, and an agreed key it lacks is filled with zeros of the
agreed form instead of rejecting it: with weight 0 that number enters no weighted mean, and
an honest site without data is not turned into a rejected update by the others' keys.

Why extras are stripped rather than rejected: a stripped record or key reaches no aggregation,
so the rest of the reply is judged as if it had come alone, and a site running a newer client
that reports one more metric keeps its update. Stripping is counted and logged by the guard.
With two replies that disagree there is no majority: the disputed keys are stripped (a loss
of reporting, never a failed round).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, MetricRecord

from protocol import wire

Form = str | int          # "number", "list", or a list's length where lengths must agree


@dataclass(frozen=True)
class ReplyShape:
    """The shape a phase's replies are brought to (module docstring).

    Parameters
    ----------
    arrays : bool
        Train replies carry the ArrayRecord ``wire.ARRAYS``; evaluate replies none.
    weight_key : str
        The aggregation weight: always required, a number.
    list_lengths : bool
        Lists of one key must have one length (Flower's metric averaging zips them); false
        where the aggregation decodes lists itself (evaluation pooling: AUROC is ``[]`` or
        ``[value]`` at honest sites).
    """

    arrays: bool
    weight_key: str
    list_lengths: bool

    def strip_records(self, msg: Message) -> int:
        """Remove every Array/MetricRecord but the expected ones; how many were removed."""
        content = msg.content
        keep = {wire.ARRAYS} if self.arrays else set()
        extra = [name for name in content.array_records if name not in keep]
        extra += [name for name in content.metric_records if name != wire.METRICS]
        for name in extra:
            del content[name]
        return len(extra)

    def form(self, value: object) -> Form:
        """What must agree between replies about one metric's value."""
        if isinstance(value, list):
            return len(value) if self.list_lengths else "list"
        return "number"

    def agree(self, replies: Sequence[Message]) -> dict[str, Form]:
        """The metric keys (and their forms) more than half of ``replies`` carry, with the
        weight key always among them."""
        voters = [msg for msg in replies if not self.fillable(msg)]
        votes = Counter((key, self.form(value)) for msg in voters
                        for key, value in _metrics(msg).items())
        agreed = {key: form for (key, form), n in votes.items() if 2 * n > len(voters)}
        agreed[self.weight_key] = "number"
        return agreed

    def conform(self, msg: Message, agreed: dict[str, Form]) -> tuple[str | None, int]:
        """``(why the reply does not fit the agreed keys or None, keys stripped)``; a reply
        that fits keeps exactly the agreed keys."""
        metrics = _metrics(msg)
        missing = sorted(key for key in agreed if key not in metrics)
        if missing and self.fillable(msg):         # enters no weighted mean: zeros
            for key in missing:
                form = agreed[key]
                metrics[key] = [0.0] * form if isinstance(form, int) else \
                    [] if form == "list" else 0.0
            missing = []
        if missing:
            return (f"metrics lack {len(missing)} key(s) the other sites send "
                    f"(first: {missing[0][:40]!r})"), 0
        for key, form in agreed.items():
            if self.form(metrics[key]) != form:
                return (f"metric {key[:40]!r} is {_describe(self.form(metrics[key]))}, the "
                        f"other sites send {_describe(form)}"), 0
        extra = [key for key in metrics if key not in agreed]
        for key in extra:
            del metrics[key]
        return None, len(extra)


    def fillable(self, msg: Message) -> bool:
        """A train reply whose weight is exactly 0 (it counts in no weighted mean). Never an
        evaluation: every site sends the whole key set there, empty splits included
        (``protocol.metrics``), so an honest site without studies keeps its vote."""
        weight = _metrics(msg).get(self.weight_key)
        return self.arrays and not isinstance(weight, (bool, list)) and weight == 0


SITE_ID_CHARS = re.compile(wire.SITE_ID_RE)


def claimed_site_id(msg: Message) -> str:
    """The site id a reply names itself by, if it is a plain name (letters, digits, ``.``,
    ``_``, ``-``; at most 64), else ``node-<its Flower node id>``: the id becomes MLflow
    metric and tag names and console rows, where an odd one could fail the writer."""
    site = msg.content.config_records.get(wire.SITE, ConfigRecord()) \
        if msg.has_content() else ConfigRecord()
    claimed = site.get(wire.SITE_ID)
    if isinstance(claimed, str) and SITE_ID_CHARS.fullmatch(claimed):
        return claimed
    return f"node-{msg.metadata.src_node_id}"


def _metrics(msg: Message) -> MetricRecord:
    return msg.content.metric_records.get(wire.METRICS, MetricRecord())


def _describe(form: Form) -> str:
    return f"a list of {form}" if isinstance(form, int) else f"a {form}"
