"""Strategies, sanitization and bounded waiting in real 3-site Flower simulations."""

from __future__ import annotations

import dataclasses

import mlflow
import numpy as np
import pytest

from client.mods.faults import faulty_site
from medfed.simulation import simulate
from server.config import load_experiment
from strategies.guard import QuorumError
from strategies.registry import STRATEGIES
from tests.conftest import final_weights

pytestmark = pytest.mark.slow


def _cfg(sites, tmp_path, *overrides):
    return load_experiment(["experiment=smoke", f"data.root={sites}", f"runs_dir={tmp_path}",
                            "federation.num_sites=3", "train.local_epochs=1",
                            "tracking.log_models=false", *overrides])


def _initial(cfg):
    import torch

    from models import MODELS

    torch.manual_seed(cfg.seed)
    return {k: v.numpy() for k, v in MODELS.build(cfg.model.name, cfg.model_options()).state_dict().items()}


def _only_run(run_dir):
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("medfed").experiment_id])
    assert len(runs) == 1
    return runs[0]


def _distance(a, b):
    return float(np.sqrt(sum(((a[k].astype(np.float64) - b[k]) ** 2).sum() for k in a)))


# End to end through Ray, one chain per kind of server/site interplay: plain averaging, a
# client-side proximal term, client-reported steps rescaled by the server, a robust selection
# and a server optimiser. Every registered chain is driven in-process through two rounds in
# test_strategy_chain.py (the same build_strategy; ~1 s each instead of ~1 min here).
SIMULATED = ("fedavg", "fedprox", "fednova", "krum", "fedadam")


def test_the_simulated_strategies_are_registered():
    assert set(SIMULATED) <= set(STRATEGIES)


@pytest.mark.parametrize("name", SIMULATED)
def test_representative_strategies_train_in_a_three_site_simulation(name, three_sites, tmp_path):
    cfg = _cfg(three_sites, tmp_path, f"strategy={name}", "federation.num_rounds=2")
    run_dir = simulate(cfg)
    weights = final_weights(run_dir)
    assert all(np.isfinite(v).all() for v in weights.values())
    assert _distance(weights, _initial(cfg)) > 0
    run = _only_run(run_dir)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["train/sites_ok"] == 3


@pytest.fixture(scope="module")
def clean_weights(three_sites, tmp_path_factory):
    return final_weights(simulate(_cfg(three_sites, tmp_path_factory.mktemp("clean"))))


# One garbage mode end to end (the MLflow counters and tags); every mode is excluded by the
# same chain in test_strategy_chain.py.
@pytest.mark.parametrize("mode", ["scale"])
def test_a_garbage_site_is_excluded_and_the_model_stays_close(mode, three_sites, tmp_path,
                                                              clean_weights):
    cfg = _cfg(three_sites, tmp_path)          # default guard: no model-specific bound needed
    run_dir = simulate(cfg, client_mods=[faulty_site("site-2", mode)])
    attacked = final_weights(run_dir)
    initial = _initial(cfg)
    assert all(np.isfinite(v).all() for v in attacked.values())
    # Without site-2 the global model moves by a similar amount as the clean one, and stays
    # far closer to it than one round's step (a x1e6 update would move it by ~1e6 x that).
    step = _distance(clean_weights, initial)
    assert _distance(attacked, clean_weights) < step
    run = _only_run(run_dir)
    assert run.data.metrics["train/updates_rejected"] == 1
    assert run.data.metrics["site/site-2/train/update_rejected"] == 1
    assert any(k.startswith("rejected.round-1.site-2") for k in run.data.tags)


@pytest.mark.timeout(300)        # a hang guard, not a speed assertion (Flower's own wait has none)
def test_too_few_sites_fail_clearly_within_the_timeout(three_sites, tmp_path):
    cfg = _cfg(three_sites, tmp_path, "federation.quorum_timeout=4")
    cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, num_sites=1))
    with pytest.raises(QuorumError, match="only 1 of the 2 required sites connected within 4 s"):
        simulate(cfg)


def test_too_few_usable_updates_fail_the_round(three_sites, tmp_path):
    cfg = _cfg(three_sites, tmp_path, "strategy.min_train_sites=3")
    with pytest.raises(QuorumError, match="2 usable update"):
        simulate(cfg, client_mods=[faulty_site("site-0", "nan")])


def test_fedbn_keeps_normalisation_layers_at_the_sites(three_sites, tmp_path):
    import json

    from client.mods import egress_log

    cfg = _cfg(three_sites, tmp_path, "strategy=fedbn", "federation.num_rounds=2")
    run_dir = simulate(cfg, client_mods=[egress_log(tmp_path / "egress")])
    sent = [json.loads(p.read_text()) for p in (tmp_path / "egress").glob("*.json")]
    trained = [s["records"]["arrays"] for s in sent if "arrays" in s["records"]]
    assert len(trained) == 6
    assert all(not any("norm" in k for k in keys) for keys in trained)
    assert all(any("patch_embed" in k for k in keys) for keys in trained)
    weights, initial = final_weights(run_dir), _initial(cfg)
    for key in weights:      # the server never aggregates local parameters ...
        if "norm" in key:
            np.testing.assert_array_equal(weights[key], initial[key])
    assert _distance({k: v for k, v in weights.items() if "norm" not in k},    # ... only shared
                     {k: v for k, v in initial.items() if "norm" not in k}) > 0


def test_personalized_sites_report_their_adapted_model(three_sites, tmp_path):
    cfg = _cfg(three_sites, tmp_path, "strategy=personalized", "federation.num_rounds=2")
    run_dir = simulate(cfg)
    metrics = _only_run(run_dir).data.metrics
    assert "personal-test/loss" in metrics and "test/loss" in metrics
    assert "site/site-0/personal-test/n" in metrics
