"""End to end: SAM's image encoder (saved as a transformers ``SamVisionModel`` directory) is
fine-tuned with LoRA under DP-SGD in a 2-site, 1-round Flower simulation. Its windowed and
global layers fold channels and windows into the batch, declared to the sites' per-sample
clipper (``models/foundation/families.py`` ``SamSeams``); only the adapters, the new
patch/channel embeddings and the head travel, in both directions."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

from client.mods import egress_log  # noqa: E402
from medfed.simulation import simulate  # noqa: E402
from server.config import load_experiment  # noqa: E402

from .test_foundation_simulation import ingress_log, travelling_keys  # noqa: E402

pytestmark = pytest.mark.slow

# a 4x4 grid per channel at 32 px; window 3 pads it to 6; layer 1 attends globally
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
              patch_size=8, mlp_dim=64, window_size=3, global_attn_indexes=[1],
              output_channels=16)


def test_sam_lora_under_dp_sgd_sends_only_adapters_and_head(tiny_sites, tmp_path):
    sites = tmp_path / "sites"          # a copy: DP-SGD writes each site's privacy ledger
    shutil.copytree(tiny_sites, sites)
    encoders = tmp_path / "encoders"
    torch.manual_seed(0)
    base = transformers.SamVisionModel(transformers.SamVisionConfig(**VISION))
    base.save_pretrained(encoders / "sam-tiny")
    cfg = load_experiment([
        "model=foundation", "model.options.weights=sam-tiny",
        f"model.foundation_dir={encoders}", "model.options.lora_rank=2",
        "task.image_size=32", "federation=sim2", "federation.num_rounds=1",
        "train.local_epochs=1", "train.batch_size=8", f"data.root={sites}",
        "privacy=dpsgd", "tracking.log_models=false",
        "+federation.site_node_config={dp-epsilon:10.0,dp-delta:1e-5}",
        f"runs_dir={tmp_path / 'runs'}", "name=sam-dp"])
    run_dir = simulate(cfg, client_mods=[egress_log(tmp_path / "egress"),
                                         ingress_log(tmp_path / "ingress")])
    import mlflow

    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    runs = mlflow.MlflowClient(uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()])
    metrics = {k: v for r in runs for k, v in r.data.metrics.items()}
    for site in ("site-0", "site-1"):         # both sites trained under DP-SGD and spent
        assert 0 < metrics[f"site/{site}/train/dp-epsilon"] <= 10.0
    n_base = len(base.state_dict())
    for keys in travelling_keys(tmp_path, sites=2):
        for key in keys:
            assert "lora_" in key or key.split(".")[0] in ("patch_embed", "channel_embed",
                                                           "head"), key
        assert any(".layers.1.attn.qkv.lora_A" in k for k in keys)    # the global layer
        assert any(".layers.0.attn.qkv.lora_B" in k for k in keys)    # a windowed one
        assert len(keys) < n_base / 2
