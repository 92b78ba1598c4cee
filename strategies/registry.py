"""Strategies by name: Flower's own classes, configured (never re-implemented) here, and
FedNova (``fednova.py``: Flower's FedAvg on step-normalised updates).

Each name maps to a Flower ``flwr.serverapp.strategy`` class and the options it accepts beyond
the sampling/keys arguments every strategy shares. Options are validated against the class's
signature, so a typo fails at config time with the list of valid options.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from flwr.serverapp.strategy import (FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx,
                                     FedTrimmedAvg, FedYogi, Krum, MultiKrum, Strategy)

from protocol import wire
from .fednova import FedNova
from .pooling import aggregate_evaluate_records

STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedavgm": FedAvgM,
    "fedprox": FedProx,
    "fednova": FedNova,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
    "multikrum": MultiKrum,
}

# Aggregates that look at individual updates rather than a weighted sum: they cannot run
# behind secure aggregation (the server only sees the sum there).
NEEDS_INDIVIDUAL_UPDATES = frozenset({"fedmedian", "fedtrimmedavg", "krum", "multikrum"})

_SHARED = {"fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes",
           "min_available_nodes", "weighted_by_key", "arrayrecord_key", "configrecord_key",
           "train_metrics_aggr_fn", "evaluate_metrics_aggr_fn", "self"}

_CHECKS: dict[str, Callable[[dict[str, Any]], str | None]] = {
    "fedprox": lambda o: "proximal_mu must be >= 0" if o.get("proximal_mu", 0.0) < 0 else None,
    "fedtrimmedavg": lambda o: "beta must be in [0, 0.5)" if not 0 <= o.get("beta", 0.2) < 0.5
    else None,
    "fedavgm": lambda o: "server_momentum must be in [0, 1)"
    if not 0 <= o.get("server_momentum", 0.0) < 1 else None,
}


class StrategyConfigError(ValueError):
    """Unknown strategy, unknown option or an invalid option value."""


def strategy_options(name: str) -> list[str]:
    """The options ``name`` accepts besides the shared sampling arguments."""
    return sorted(p for p in inspect.signature(STRATEGIES[name].__init__).parameters
                  if p not in _SHARED)


def validate_strategy(name: str, options: dict[str, Any]) -> None:
    if name not in STRATEGIES:
        raise StrategyConfigError(f"unknown strategy {name!r}; available: "
                                  f"{', '.join(sorted(STRATEGIES))}")
    valid = strategy_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise StrategyConfigError(f"unknown option(s) {unknown} for strategy {name!r}; "
                                  f"valid: {valid}")
    problem = _CHECKS.get(name, lambda o: None)(options)
    if problem:
        raise StrategyConfigError(f"strategy {name!r}: {problem}")


def build_strategy(name: str, options: dict[str, Any], *, fraction_train: float,
                   fraction_evaluate: float, min_train_nodes: int, min_evaluate_nodes: int,
                   min_available_nodes: int, weighted_by_key: str = wire.NUM_EXAMPLES
                   ) -> Strategy:
    """A configured Flower strategy using MedFed's wire keys and pooled evaluation metrics."""
    validate_strategy(name, options)
    return STRATEGIES[name](
        fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
        min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
        min_available_nodes=min_available_nodes, weighted_by_key=weighted_by_key,
        arrayrecord_key=wire.ARRAYS, configrecord_key=wire.CONFIG,
        evaluate_metrics_aggr_fn=aggregate_evaluate_records, **options,
    )
