"""Which Flower node speaks for which site: a site id is bound to one node id for a run.

A site names itself (``wire.SITE_ID``, a plain name: ``reply_shape.claimed_site_id``); its
node id is Flower's. The first node to claim a name alone holds it for the run - the
preflight's answers first (``server/preflight.py``, which refuses a run two nodes answer as
one site), then each phase's replies - so one node cannot write its figures, norms or
failures under another site's name in MLflow or on the console. A claim that would take a
name from its holder, claim a second name for a node that holds one, or take a name another
node claims in the same phase is refused: the node is shown by the name it holds, else as
``node-<id>``, and the claim flagged (``ClaimRefused``, logged and tagged on the MLflow
run). A name two nodes claimed at once is neither's for the rest of the run (the server
cannot tell which is the site). A restarted site that comes back under a new node id is
flagged too: its restart is then the explanation, and its figures stand under
``node-<id>``, not lost.

The run's binding is one object: the observer (``observed.py``) binds each phase's claims
before the wrappers below it see the replies, and the wrappers that name a site on the
console (the guard, external sites) are given the same object and read it
(:func:`phase_names`), so no log line names a node by the id it claims.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from flwr.app import Message

from protocol import wire

from .reply_shape import claimed_site_id

_FALLBACK = re.compile(r"node-(\d+)")     # how a node without a name is shown


def fallback_name(node: int) -> str:
    """How a node is shown while it holds no site id."""
    return f"node-{node}"


@dataclass(frozen=True)
class ClaimRefused:
    """A node's claim of a site id that the run did not grant, and why."""

    node: int
    site_id: str
    reason: str

    def __str__(self) -> str:
        return f"node {self.node} claims site id {self.site_id!r}, {self.reason}"


class SiteNames:
    """Node id <-> site id for one run, each bound once (module docstring).

    Parameters
    ----------
    bound : mapping, optional
        Node id -> site id already bound (the preflight's answers); each must be a plain
        name held by one node.
    """

    def __init__(self, bound: Mapping[int, str] | None = None):
        self._site: dict[int, str] = {}          # node id -> site id
        self._node: dict[str, int] = {}          # site id -> node id
        self._contested: set[str] = set()        # claimed by two nodes at once: nobody's
        if refused := self.claim((bound or {}).items()):
            raise ValueError(f"site names cannot be bound: {'; '.join(map(str, refused))}")

    @classmethod
    def of(cls, sites: SiteNames | Mapping[int, str] | None) -> SiteNames:
        """``sites`` if it is a run's binding (shared, not copied), else a new one bound from
        node id -> site id (the preflight's answers; None: none)."""
        return sites if isinstance(sites, SiteNames) else cls(sites)

    def name(self, node: int) -> str:
        """The site id ``node`` holds, else ``node-<id>``."""
        return self._site.get(node, fallback_name(node))

    def bound(self) -> dict[int, str]:
        """Node id -> site id of every node that holds a name."""
        return dict(self._site)

    def claim(self, claims: Iterable[tuple[int, str]]) -> list[ClaimRefused]:
        """Bind one phase's claims (node id, the site id it names itself by; not a plain name:
        no claim) where the rules allow, and say which were refused."""
        claimants: dict[str, set[int]] = {}
        for node, site in claims:
            if isinstance(site, str) and re.fullmatch(wire.SITE_ID_RE, site) \
                    and site != fallback_name(node):
                claimants.setdefault(site, set()).add(node)
        refused = []
        for site, nodes in sorted(claimants.items()):
            reasons = {node: self._refusal(site, node, nodes) for node in sorted(nodes)}
            refused += [ClaimRefused(node, site, why) for node, why in reasons.items() if why]
            if len(nodes) > 1 and site not in self._node:
                self._contested.add(site)
            elif len(nodes) == 1 and not any(reasons.values()):
                (node,) = nodes
                self._site[node], self._node[site] = site, node
        return refused

    def _refusal(self, site: str, node: int, nodes: set[int]) -> str | None:
        """Why ``node``'s claim of ``site`` (claimed this phase by ``nodes``) is refused."""
        holder, shown = self._node.get(site), f"shown as {self.name(node)}"
        if holder == node:
            return None
        if holder is not None:
            return (f"which node {holder} holds in this run: {shown} (a site restarted under "
                    "a new node id, or a node impersonating it)")
        if _FALLBACK.fullmatch(site):
            return f"the name another node is shown by: {shown}"
        if node in self._site:
            return f"but it holds {self._site[node]!r} in this run (one site a node): {shown}"
        if site in self._contested:
            return f"which two nodes claimed at once earlier in this run, naming neither: {shown}"
        if len(nodes) > 1:
            others = ", ".join(str(n) for n in sorted(nodes - {node}))
            return (f"as node(s) {others} do: a site id names one node, so it names none of "
                    f"them in this run: {shown} (one is misconfigured or impersonating the "
                    "other: check their site ids)")
        return None


def site_claims(replies: Iterable[Message]) -> list[tuple[int, str]]:
    """(node id, the site id it names itself by) of each reply that is not an error."""
    return [(m.metadata.src_node_id, claimed_site_id(m)) for m in replies if not m.has_error()]


def phase_names(replies: Iterable[Message], names: SiteNames | None = None) -> SiteNames:
    """Whom one phase's ``replies`` come from: ``names``, the run's binding (its owner bound
    these replies' claims into it), else - a wrapper used without a run's binding - a new
    binding of these replies' claims alone (a name two of them claim is neither's)."""
    if names is None:
        names = SiteNames()
        names.claim(site_claims(replies))
    return names
