"""Strategy capabilities live on the registry entries, and the server's validation reads them."""

from __future__ import annotations

import dataclasses

import pytest

from server.config import ConfigError, load_experiment
from strategies import registry
from strategies.registry import STRATEGIES, StrategyConfigError, StrategyEntry, validate_strategy

SITEDP = ["privacy=sitedp", "strategy.min_train_sites=3"]


def _with(name: str) -> set[str]:
    return set(registry.strategies_with(name))


def test_capabilities():
    assert _with("sum_aggregating") == {"fedavg", "fedprox"}
    assert _with("secagg_ready") == {"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi",
                                     "fedadagrad"}
    assert _with("needs_individual_updates") == {"fedmedian", "fedtrimmedavg", "krum",
                                                 "multikrum", "fednova"}


def test_contradictory_capabilities_are_refused():
    with pytest.raises(ValueError, match="needs individual updates"):
        StrategyEntry(STRATEGIES["krum"].cls, needs_individual_updates=True, secagg_ready=True)
    with pytest.raises(ValueError, match="sum-aggregating strategy is secagg-ready"):
        StrategyEntry(STRATEGIES["fedavg"].cls, sum_aggregating=True)


def test_option_checks_are_part_of_the_entry():
    with pytest.raises(StrategyConfigError, match=r"strategy 'fedtrimmedavg': beta must be"):
        validate_strategy("fedtrimmedavg", {"beta": 0.7})
    validate_strategy("fedtrimmedavg", {"beta": 0.1})


def test_validation_reads_the_entries(monkeypatch):
    """Declare fedadam a plain sum: site-level DP then accepts it, and names it as such."""
    with pytest.raises(ConfigError, match=r"plain weighted sum \(fedavg, fedprox\)"):
        load_experiment(SITEDP + ["strategy=fedadam"])
    entries = dict(STRATEGIES)
    entries["fedadam"] = dataclasses.replace(entries["fedadam"], sum_aggregating=True)
    entries["fedavgm"] = dataclasses.replace(entries["fedavgm"], secagg_ready=False)
    monkeypatch.setattr(registry, "STRATEGIES", entries)
    assert load_experiment(SITEDP + ["strategy=fedadam"]).strategy.name == "fedadam"
    with pytest.raises(ConfigError, match=r"plain weighted sum \(fedavg, fedprox, fedadam\)"):
        load_experiment(SITEDP + ["strategy=fedavgm"])
    with pytest.raises(ConfigError, match=r"secagg.enabled with strategy=fedavgm"):
        load_experiment(["strategy=fedavgm", "secagg.enabled=true"])
