"""What every MedFed strategy wrapper owns and reports, and the walk down a wrapper chain.

A MedFed server strategy is a chain: wrappers (fault guard, external sites, partial sharing,
secure aggregation, site-level DP, the observer) each hold one inner strategy, down to a Flower
strategy that aggregates (FedAvg, FedAdam, FedNova, ...). Like Opacus' accountants, each
wrapper owns its state (``state_dict()`` / ``load_state_dict()``) and says what it did in the
last round (``round_report()``); checkpointers and observers walk the chain instead of reading
attributes by name through it.

State and reports are namespaced per link of the chain (``guard``, ``site-dp``, ...; a second
wrapper of the same kind gets ``guard#2``), so two wrappers never overwrite each other. The
aggregating Flower strategy at the bottom is not ours: the walker saves the attributes
Flower's strategies carry across rounds (server-optimizer moments, momentum, the current
global arrays) under the namespace ``aggregator``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import numpy as np
from flwr.app import Array, ArrayRecord

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from .guard import Rejection

# Attributes of Flower's strategies that carry state across rounds (FedOpt family, FedAvgM).
FLOWER_STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "current_arrays")
AGGREGATOR = "aggregator"
_SEP = "/"          # namespace separator in state keys (npz member names allow it)


class RoundReport(TypedDict, total=False):
    """What a wrapper did in the last round; each key is reported by at most one wrapper."""

    rejected: list[Rejection]          # guard: replies not aggregated, with the reason
    evaluate_rejected: list[Rejection]  # guard: evaluate replies left out of the pooling
    external_rejected: list[Rejection]  # external sites: evaluate replies refused
    update_norms: dict[int, float]     # guard: node id -> ||local - global|| (named by observed)
    site_level_epsilon: float          # site-level DP: server-accountant epsilon so far
    secagg_clipped: int                # secure aggregation: values clipped by the encoding
    secagg_capped: int                 # secure aggregation: sites whose weight was capped


class StrategyWrapper(ABC):
    """Mixin every MedFed strategy wrapper implements (next to Flower's ``Strategy``).

    A wrapper holds its inner strategy in ``strategy`` (Flower's convention for its own DP
    wrappers) and exposes it as ``inner``. ``state_dict`` returns what must survive a server
    restart as named NumPy arrays (no pickle: a checkpoint must not execute code on load);
    ``load_state_dict`` puts it back into a freshly built wrapper and refuses state it does not
    know; ``round_report`` says what the wrapper did in the round just aggregated.
    """

    kind: ClassVar[str]                 # the wrapper's namespace in merged state and reports
    strategy: Strategy

    @property
    def inner(self) -> Strategy:
        """The strategy this wrapper delegates to."""
        return self.strategy

    @abstractmethod
    def state_dict(self) -> dict[str, np.ndarray]:
        """State that must survive a restart, as named arrays ({} if none)."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what ``state_dict`` returned (into a freshly built wrapper)."""

    @abstractmethod
    def round_report(self) -> RoundReport:
        """What this wrapper did in the last aggregated round ({} if nothing of its own)."""


class StatelessWrapper(StrategyWrapper):
    """A wrapper that keeps nothing across a restart and reports nothing of its own (a
    subclass says why in its docstring; it may still override ``round_report``)."""

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        expect_no_state(state, type(self).__name__)

    def round_report(self) -> RoundReport:
        return RoundReport()


def expect_no_state(state: Mapping[str, np.ndarray], owner: str) -> None:
    """``load_state_dict`` of a wrapper without state: anything given is a mismatch."""
    if state:
        raise ValueError(f"{owner} keeps no state, but the checkpoint has {sorted(state)}; "
                         "it was written by a differently built strategy")


def json_array(value: Any) -> np.ndarray:
    """A JSON-serialisable value as a 0-d string array (stored in npz without pickle)."""
    return np.array(json.dumps(value, sort_keys=True))


def from_json_array(array: np.ndarray) -> Any:
    return json.loads(str(array))


def chain(strategy: Strategy) -> Iterator[tuple[str, Strategy]]:
    """``(namespace, link)`` from ``strategy`` down to the aggregating Flower strategy."""
    seen: dict[str, int] = {}
    visited: set[int] = set()
    while True:
        if id(strategy) in visited:
            raise ValueError(f"strategy chain loops back to {type(strategy).__name__}")
        visited.add(id(strategy))
        if not isinstance(strategy, StrategyWrapper):
            yield AGGREGATOR, strategy
            return
        seen[strategy.kind] = seen.get(strategy.kind, 0) + 1
        count = seen[strategy.kind]
        yield (strategy.kind if count == 1 else f"{strategy.kind}#{count}"), strategy
        strategy = strategy.inner


def chain_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """The state of every link, ``namespace/key -> array``."""
    out: dict[str, np.ndarray] = {}
    for namespace, link in chain(strategy):
        own = link.state_dict() if isinstance(link, StrategyWrapper) else aggregator_state(link)
        out |= {f"{namespace}{_SEP}{key}": value for key, value in own.items()}
    return out


def load_chain_state(strategy: Strategy, state: Mapping[str, np.ndarray]) -> None:
    """Put ``chain_state``'s output back into a freshly built chain of the same shape.

    Every link is given its part (possibly empty: a stateful link then refuses it); state for
    a namespace the chain does not have is an error, never silently dropped.
    """
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for name, value in state.items():
        if _SEP not in name:
            raise ValueError(f"strategy state key {name!r} has no namespace")
        namespace, key = name.split(_SEP, 1)
        grouped.setdefault(namespace, {})[key] = value
    links = dict(chain(strategy))
    unknown = sorted(set(grouped) - set(links))
    if unknown:
        raise ValueError(f"saved strategy state for {unknown}, which this strategy chain "
                         f"({' > '.join(links)}) does not have")
    for namespace, link in links.items():
        own = grouped.get(namespace, {})
        if isinstance(link, StrategyWrapper):
            link.load_state_dict(own)
        else:
            load_aggregator_state(link, own)


def chain_reports(strategy: Strategy) -> dict[str, RoundReport]:
    """Every wrapper's report of the last round, by namespace (wrappers with nothing left out)."""
    return {namespace: report for namespace, link in chain(strategy)
            if isinstance(link, StrategyWrapper) and (report := link.round_report())}


def merge_reports(reports: Mapping[str, RoundReport]) -> RoundReport:
    """One report for the round; a key two wrappers both report is an error, not a guess."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for namespace, report in reports.items():
        for key, value in report.items():
            if key in merged:
                raise ValueError(f"both {owner[key]} and {namespace} report {key!r}")
            merged[key], owner[key] = value, namespace
    return RoundReport(**merged)


def aggregator_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Flower's cross-round attributes as named arrays (``attr|kind|key``)."""
    out: dict[str, np.ndarray] = {}
    for attr in FLOWER_STATE_ATTRIBUTES:
        value = getattr(strategy, attr, None)      # Flower's classes, not ours: no protocol
        if value is None:
            continue
        if isinstance(value, ArrayRecord):
            out |= {f"{attr}|record|{k}": a.numpy() for k, a in value.items()}
        elif isinstance(value, dict):
            out |= {f"{attr}|dict|{k}": np.asarray(v) for k, v in value.items()}
        elif isinstance(value, list):
            out |= {f"{attr}|list|{i:06d}": np.asarray(v) for i, v in enumerate(value)}
        else:
            raise TypeError(f"cannot save {type(strategy).__name__}.{attr} of type "
                            f"{type(value).__name__}")
    return out


def load_aggregator_state(strategy: Strategy, state: Mapping[str, np.ndarray]) -> None:
    grouped: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, value in state.items():
        attr, kind, key = name.split("|", 2)
        if attr not in FLOWER_STATE_ATTRIBUTES:
            raise ValueError(f"unknown aggregator state {attr!r}")
        grouped.setdefault((attr, kind), {})[key] = value
    for (attr, kind), values in grouped.items():
        if kind == "record":
            restored: Any = ArrayRecord({k: Array(v) for k, v in values.items()})
        elif kind == "dict":
            restored = dict(values)
        else:
            restored = [values[k] for k in sorted(values)]
        setattr(strategy, attr, restored)
