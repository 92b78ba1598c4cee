"""End to end: one ``simulate`` run with two phases (federated MM-DINOv2 pretraining, then
LoRA fine-tuning from its backbone) on two real simulated sites; MLflow holds both models
with lineage, the teacher never leaves a site, and LoRA sites send adapters and head only."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from client.mods import egress_log
from medfed.simulation import simulate
from models.tasks import backbone_weights
from server.config import load_experiment
from tests.conftest import final_weights

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_phase(tiny_sites, tmp_path_factory):
    out = tmp_path_factory.mktemp("two-phase")
    cfg = load_experiment(["experiment=smoke", f"data.root={tiny_sites}",
                           f"runs_dir={out / 'runs'}", "pretrain=mm_dino",
                           "pretrain.num_rounds=2", "pretrain.options.out_dim=64",
                           "task.options.mode=lora", "task.evaluate_missing=true"])
    run_dir = simulate(cfg, client_mods=[egress_log(out / "egress")])
    return cfg, run_dir, out


def _replies(out, kind: str) -> list[dict]:
    found = [json.loads(p.read_text()) for p in sorted((out / "egress").glob("*.json"))]
    return [r for r in found if r.get("message_type") == kind]


def test_each_phase_registers_its_model_with_lineage(two_phase):
    cfg, run_dir, _ = two_phase
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    pre = client.search_model_versions(f"name='{cfg.pretrain.registered_model}'")
    fine = client.search_model_versions(f"name='{cfg.tracking.registered_model}'")
    assert len(pre) == cfg.pretrain.num_rounds and len(fine) == cfg.federation.num_rounds
    newest_pre = max(pre, key=lambda v: int(v.version))
    for version in fine:
        tags = version.tags
        assert tags["parent.model"] == cfg.pretrain.registered_model
        assert tags["parent.version"] == str(newest_pre.version)
        assert tags["parent.config_hash"] == cfg.pretrain_phase().fingerprint()
        assert tags["task"] == "classification"
    assert newest_pre.tags["task"] == "mm_dino"
    # Evaluation with each single sequence missing, per site and pooled.
    metrics = client.get_run(fine[0].tags["mlflow_run_id"]).data.metrics
    for seq in ("T1", "T1ce", "T2", "FLAIR"):
        assert f"test-without-{seq}/n" in metrics
        assert f"site/site-0/test-without-{seq}/n" in metrics
    assert "test/f1_class_0" in metrics


def test_finetuning_starts_from_the_pretrained_backbone_and_keeps_it_frozen(two_phase):
    _, run_dir, _ = two_phase
    pretrained = backbone_weights(final_weights(run_dir / "pretrain"))
    tuned = final_weights(run_dir / "finetune")
    frozen = {k.replace(".base_layer.", "."): v for k, v in tuned.items()
              if "lora_" not in k and not k.startswith("head.")}
    assert set(frozen) <= set(pretrained) and len(frozen) > 10
    for key, value in frozen.items():            # LoRA: base weights never change
        np.testing.assert_array_equal(value, pretrained[key], err_msg=key)
    moved = [k for k in tuned if "lora_B" in k and np.abs(tuned[k]).max() > 0]
    assert moved, "no LoRA adapter was trained"   # lora_B starts at zero


def test_sites_send_only_what_trains(two_phase):
    _, _, out = two_phase
    train = _replies(out, "train")
    assert len(train) == 2 * (2 + 1)             # 2 sites x (2 pretrain + 1 finetune rounds)
    sent = [r["records"]["arrays"] for r in train]
    pretrain = [a for a in sent if any(k.startswith("backbone.") for k in a)]
    finetune = [a for a in sent if a not in pretrain]
    assert len(pretrain) == 4 and len(finetune) == 2
    for arrays in pretrain:                      # student only: the teacher stays at the site
        assert not any("teacher" in k or "center" in k for k in arrays)
        assert any(k.startswith("dino_head.") for k in arrays)
    for arrays in finetune:                      # LoRA: adapters and the head, nothing else
        assert arrays and all("lora_" in k or k.startswith("head.") for k in arrays)


def test_registered_versions_export_and_load_as_a_pretrained_backbone(two_phase, tmp_path):
    """Weights out (``medfed export``) and back in (``model.pretrained=DIR``)."""
    import torch

    from medfed.export import ExportError, export_version
    from models.weights import load_pretrained
    from server.config import ConfigError

    cfg, run_dir, _ = two_phase
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    out = export_version(uri, cfg.pretrain.registered_model, "2", tmp_path / "mm-dino-v2")
    saved, state = load_pretrained(out)
    assert saved["task"] == "mm_dino" and saved["version"] == "2"
    pretrained = backbone_weights(final_weights(run_dir / "pretrain"))
    assert set(state) == set(pretrained)
    for key, value in state.items():
        np.testing.assert_array_equal(value.numpy(), pretrained[key], err_msg=key)
    with pytest.raises(FileExistsError):
        export_version(uri, cfg.pretrain.registered_model, "2", out)
    with pytest.raises(ExportError, match="no version 9"):
        export_version(uri, cfg.pretrain.registered_model, "9", tmp_path / "nine")

    # The fine-tuned LoRA model exports with its adapters merged into a plain classifier.
    tuned = export_version(uri, cfg.tracking.registered_model, "1", tmp_path / "classifier")
    _, tuned_state = load_pretrained(tuned)
    assert not any("lora" in k or "base_layer" in k for k in tuned_state)
    assert "head.weight" in tuned_state

    start = load_experiment(["experiment=smoke", f"model.pretrained={out}"])
    from models.tasks import build
    model, _ = build(start.model.name, start.model_options(), start.task.name,
                     start.task_options(), backbone_state=state)
    for key, value in model.state_dict().items():
        if not key.startswith("head."):
            torch.testing.assert_close(value, state[key])
    with pytest.raises(ConfigError, match="dim 32 .saved. != 64"):
        load_experiment([f"model.pretrained={out}"])          # mmvit_small is dim 64
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment([f"model.pretrained={tmp_path / 'nowhere'}"])
