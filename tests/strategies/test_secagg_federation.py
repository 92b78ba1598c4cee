"""SecAgg+ in a real Flower simulation: the secure aggregate equals plaintext FedAvg within the
quantization bound, and sites send nothing but masked vectors and protocol messages."""

from __future__ import annotations

import json

import numpy as np
import pytest

from client.mods import egress_log
from medfed.simulation import simulate
from protocol.secagg_encoding import HEADER
from server.config import ConfigError, load_experiment
from tests.conftest import final_weights

pytestmark = pytest.mark.slow


def run(three_sites, tmp_path, name, *extra, mods=()):
    cfg = load_experiment(["experiment=smoke", "federation=sim3", "federation.num_rounds=1",
                           "strategy.min_train_sites=3", f"data.root={three_sites}",
                           f"runs_dir={tmp_path / name}", "tracking.log_models=false", *extra])
    return cfg, simulate(cfg, client_mods=mods)


def test_secure_aggregate_matches_plaintext_fedavg(three_sites, tmp_path):
    cfg, plain_dir = run(three_sites, tmp_path, "plain")
    cfg, secure_dir = run(three_sites, tmp_path, "secure", "secagg.enabled=true",
                          mods=[egress_log(tmp_path / "egress")])
    plain, secure = final_weights(plain_dir), final_weights(secure_dir)
    assert plain.keys() == secure.keys()
    scale = ((2**31 - 1) / (3 * cfg.secagg.max_weight) - 1) / cfg.secagg.clip_range
    for key in plain:
        np.testing.assert_allclose(secure[key], plain[key], rtol=0, atol=1 / scale + 1e-6,
                                   err_msg=key)
    stages = {"setup": 0, "share-keys": 0, "masked": 0, "consistency": 0, "unmask": 0}
    for path in (tmp_path / "egress").glob("*.json"):
        summary = json.loads(path.read_text())
        records = summary.get("records", {})
        if "secagg" in records:
            keys = set(records["secagg"])
            stage = ("setup" if "secagg-pk-enc" in keys and "secagg-nodes" not in keys else
                     "share-keys" if "secagg-ciphertexts" in keys else
                     "consistency" if keys == {"secagg-signature"} else "unmask")
            stages[stage] += 1
        elif summary["message_type"] == "train":
            assert list(records["arrays"]) == ["secagg-masked"], records["arrays"]
            stages["masked"] += 1
    assert stages == {"setup": 3, "share-keys": 3, "masked": 3, "consistency": 3, "unmask": 3}


def test_secagg_refuses_strategies_that_need_individual_updates(three_sites):
    for strategy in ("krum", "fedmedian", "fedtrimmedavg"):
        with pytest.raises(ConfigError, match="weighted sum"):
            load_experiment(["federation=sim3", f"strategy={strategy}", "secagg.enabled=true"])
    with pytest.raises(ConfigError, match="at least 3 sites"):
        load_experiment(["federation=sim2", "secagg.enabled=true"])


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory):
    from medfed.synth.sites import synthesize

    root = tmp_path_factory.mktemp("four") / "sites"
    synthesize(root, n_sites=4, seed=3, patients=12)
    return root


def drop_at(stage: str, partition: int):
    """Site ``partition`` vanishes at ``stage``: "masked" (it trained but never sends its masked
    input: its pairwise masks must be removed via its key shares) or "unmask" (its masked input
    arrived; it does not answer the unmask request)."""
    from protocol import wire

    def mod(msg, context, call_next):
        if msg.has_content() and int(context.node_config.get("partition-id", -1)) == partition:
            request = msg.content.config_records.get(wire.SECAGG)
            config = msg.content.config_records.get(wire.CONFIG)
            current = (request or config or {}).get(wire.SECAGG_STAGE)
            if current == stage:
                raise RuntimeError("site went offline")
        return call_next(msg, context)
    return mod


@pytest.mark.parametrize("stage, contributors", [("masked", 3), ("unmask", 4)])
def test_a_site_vanishing_mid_round_is_recovered(four_sites, tmp_path, stage, contributors):
    base = ["experiment=smoke", "federation.num_rounds=1", f"data.root={four_sites}",
            "tracking.log_models=false", "strategy.min_train_sites=3"]
    secure = load_experiment([*base, "federation.num_sites=4", "secagg.enabled=true",
                              f"runs_dir={tmp_path / 'secure'}"])
    secure_dir = simulate(secure, client_mods=[drop_at(stage, 3)])
    # the plaintext reference: FedAvg over the sites whose input is in the secure sum
    plain = load_experiment([*base, f"federation.num_sites={contributors}",
                             f"strategy.min_available_sites={contributors}",
                             f"runs_dir={tmp_path / 'plain'}"])
    expected = final_weights(simulate(plain))
    recovered = final_weights(secure_dir)
    scale = ((2**31 - 1) / (4 * secure.secagg.max_weight) - 1) / secure.secagg.clip_range
    for key in expected:
        np.testing.assert_allclose(recovered[key], expected[key], rtol=0,
                                   atol=1 / scale + 1e-6, err_msg=key)


def test_secagg_with_dp_sgd_and_a_site_requiring_secagg(three_sites, tmp_path):
    sites = tmp_path / "sites"
    import shutil

    shutil.copytree(three_sites, sites)
    node = ("+federation.site_node_config={dp-epsilon:10.0,dp-delta:1e-5,"
            "require-secagg:true}")
    cfg, run_dir = run(sites, tmp_path, "dp", "secagg.enabled=true", "privacy=dpsgd", node,
                       "secagg.max_weight=5")
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = client.search_runs([client.get_experiment_by_name("medfed").experiment_id])[0]
    metrics = run_id.data.metrics
    assert "secagg/clipped_values" in metrics and "privacy/epsilon.site-0" in metrics
    # a site with more than 5 training studies has its weight capped: reported, not silent,
    # as a count over the sites from the secure sum (no site's own flag leaves it)
    from client.data.site import load_site

    trained = [len(load_site(sites / f"site-{i}", tuple(cfg.task.class_names)).split(
        "train", labelled_only=True)) for i in range(3)]
    assert metrics["secagg/capped_sites"] == sum(n > 5 for n in trained) >= 1
    assert not any(k.endswith("secagg-weight-capped") for k in metrics)
    # nor its example count: it rides inside the masked vector only
    assert not any(k.endswith("/train/num-examples") for k in metrics if k.startswith("site/"))
    # the same sites refuse a plaintext round: the preflight reads it from their declared
    # policy before round 1 (each site's own refusal: tests/security/test_site_controls.py)
    with pytest.raises(Exception, match="requires secure aggregation"):
        run(sites, tmp_path, "plain", "privacy=dpsgd", node)


def test_secagg_with_site_level_dp_noise_on_the_sum(three_sites, tmp_path):
    sites = tmp_path / "sites"
    import shutil

    import mlflow

    shutil.copytree(three_sites, sites)
    cfg = load_experiment(["experiment=smoke", "federation=sim3", "federation.num_rounds=2",
                           "strategy.min_train_sites=3", f"data.root={sites}",
                           f"runs_dir={tmp_path / 'runs'}", "tracking.log_models=false",
                           "secagg.enabled=true", "secagg.clip_range=1.0", "privacy=sitedp",
                           "privacy.noise_multiplier=1.0", "privacy.clipping_norm=1.0",
                           "privacy.delta=1e-3",
                           # privacy=sitedp adds the noise on the server: sites must trust it
                           "+federation.site_node_config={dp-epsilon:100.0,dp-delta:1e-5,"
                           "dp-trust-server:true}"])
    run_dir = simulate(cfg)
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = client.search_runs([client.get_experiment_by_name("medfed").experiment_id])[0] \
        .info.run_id
    history = sorted(client.get_metric_history(run_id, "privacy/site_level_epsilon"),
                     key=lambda m: m.step)
    assert len(history) == 2 and 0 < history[0].value < history[1].value
    assert "site/site-0/train/dp-epsilon" in client.get_run(run_id).data.metrics


def test_lora_under_secagg_masks_only_adapters_and_head(three_sites, tmp_path):
    """``FrozenSharing`` around SecAgg+: the frozen base weights travel to the sites beside the
    trainable ones, but only adapters and head are masked, summed and averaged."""
    import torch

    from models.tasks import build, frozen_keys

    cfg, run_dir = run(three_sites, tmp_path, "lora", "secagg.enabled=true",
                       "task.options.mode=lora", mods=[egress_log(tmp_path / "egress")])
    torch.manual_seed(cfg.seed)                    # the server's initial model
    model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options())
    initial = {k: v.numpy() for k, v in model.state_dict().items()}
    frozen = set(frozen_keys(model))
    trainable = sum(v.size for k, v in initial.items() if k not in frozen and v.dtype.kind == "f")
    assert frozen and trainable < sum(v.size for v in initial.values()) / 2
    final = final_weights(run_dir)
    assert final.keys() == initial.keys()
    assert all(np.array_equal(final[k], initial[k]) for k in frozen)
    assert any(not np.array_equal(final[k], initial[k]) for k in initial if "lora_B" in k)
    masked = []
    for path in (tmp_path / "egress").glob("*.json"):
        summary = json.loads(path.read_text())
        if summary.get("message_type") == "train" and "arrays" in summary.get("records", {}):
            masked.append(summary["records"]["arrays"])
    assert masked == [{"secagg-masked": [trainable + HEADER]}] * 3
