"""Strategies by name: Flower's own classes, configured (never re-implemented) here, and
FedNova (``fednova.py``: Flower's FedAvg on step-normalised updates).

Each name maps to an entry: a Flower ``flwr.serverapp.strategy`` class, what its aggregate can
run behind (secure aggregation, site-level DP noise on the sum) and checks of its option values.
Options are validated against the class's signature (the ones it accepts beyond the
sampling/keys arguments every strategy shares), so a typo fails at config time with the list of
valid options.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from flwr.serverapp.strategy import (FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx,
                                     FedTrimmedAvg, FedYogi, Krum, MultiKrum, Strategy)

from protocol import wire
from .fednova import FedNova
from .pooling import aggregate_evaluate_records


@dataclass(frozen=True)
class StrategyEntry:
    """A registered strategy: its Flower class and what its aggregate can run behind.

    The capabilities are what the server's config validation asks of a strategy (secure
    aggregation, site-level DP); declared here, next to the class, never kept as name lists.
    """
    cls: type[Strategy]
    # Aggregates individual updates (median, trimmed mean, Krum) rather than a weighted sum.
    needs_individual_updates: bool = False
    # The aggregate is FedAvg's plain weighted sum: Gaussian noise on the sum is exactly the
    # site-level mechanism the accountant describes (server optimisers rescale it; not these).
    sum_aggregating: bool = False
    # Needs only the weighted average of the updates (server optimisers included), so it can
    # run behind secure aggregation, where the server sees nothing but the sum.
    secagg_ready: bool = False
    # Option values the class signature cannot refuse: returns the problem, or None.
    check: Callable[[dict[str, Any]], str | None] = lambda options: None

    def __post_init__(self):
        if self.needs_individual_updates and (self.secagg_ready or self.sum_aggregating):
            raise ValueError(f"{self.cls.__name__}: a strategy that needs individual updates "
                             "cannot be sum-aggregating or secagg-ready")
        if self.sum_aggregating and not self.secagg_ready:
            raise ValueError(f"{self.cls.__name__}: a sum-aggregating strategy is secagg-ready")


_SUM = dict(sum_aggregating=True, secagg_ready=True)
_AVERAGE = dict(secagg_ready=True)
_INDIVIDUAL = dict(needs_individual_updates=True)

STRATEGIES: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry(FedAvg, **_SUM),
    "fedavgm": StrategyEntry(FedAvgM, **_AVERAGE, check=lambda o: "server_momentum must be in "
                             "[0, 1)" if not 0 <= o.get("server_momentum", 0.0) < 1 else None),
    "fedprox": StrategyEntry(FedProx, **_SUM, check=lambda o: "proximal_mu must be >= 0"
                             if o.get("proximal_mu", 0.0) < 0 else None),
    "fednova": StrategyEntry(FedNova, **_INDIVIDUAL),   # rescales each update by its steps
    "fedadam": StrategyEntry(FedAdam, **_AVERAGE),
    "fedyogi": StrategyEntry(FedYogi, **_AVERAGE),
    "fedadagrad": StrategyEntry(FedAdagrad, **_AVERAGE),
    "fedmedian": StrategyEntry(FedMedian, **_INDIVIDUAL),
    "fedtrimmedavg": StrategyEntry(FedTrimmedAvg, **_INDIVIDUAL, check=lambda o: "beta must be "
                                   "in [0, 0.5)" if not 0 <= o.get("beta", 0.2) < 0.5 else None),
    "krum": StrategyEntry(Krum, **_INDIVIDUAL),
    "multikrum": StrategyEntry(MultiKrum, **_INDIVIDUAL),
}

_SHARED = {"fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
           "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
           "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "self"}

class StrategyConfigError(ValueError):
    """Unknown strategy, unknown option or an invalid option value."""


def strategy_options(name: str) -> list[str]:
    """The options ``name`` accepts besides the shared sampling arguments."""
    return sorted(p for p in inspect.signature(STRATEGIES[name].cls.__init__).parameters
                  if p not in _SHARED)


def strategy_entry(name: str) -> StrategyEntry:
    """The registry entry of ``name``; an unknown name fails listing the valid ones."""
    if name not in STRATEGIES:
        raise StrategyConfigError(f"unknown strategy {name!r}; available: "
                                  f"{', '.join(sorted(STRATEGIES))}")
    return STRATEGIES[name]


def strategies_with(capability: str) -> list[str]:
    """The registered names whose entry declares ``capability`` (a StrategyEntry flag)."""
    return [name for name, entry in STRATEGIES.items() if getattr(entry, capability)]


def validate_strategy(name: str, options: dict[str, Any]) -> None:
    """Refuse an unknown strategy, an option its class does not take, or a bad option value."""
    entry = strategy_entry(name)
    valid = strategy_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise StrategyConfigError(f"unknown option(s) {unknown} for strategy {name!r}; "
                                  f"valid: {valid}")
    problem = entry.check(options)
    if problem:
        raise StrategyConfigError(f"strategy {name!r}: {problem}")


def build_strategy(name: str, options: dict[str, Any], *, fraction_train: float,
                   fraction_evaluate: float, min_train_nodes: int, min_evaluate_nodes: int,
                   min_available_nodes: int, weighted_by_key: str = wire.NUM_EXAMPLES
                   ) -> Strategy:
    """A configured Flower strategy using MedFed's wire keys and pooled evaluation metrics."""
    validate_strategy(name, options)
    return STRATEGIES[name].cls(
        fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
        min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
        min_available_nodes=min_available_nodes, weighted_by_key=weighted_by_key,
        arrayrecord_key=wire.ARRAYS, configrecord_key=wire.CONFIG,
        evaluate_metrics_aggr_fn=aggregate_evaluate_records, **options,
    )
