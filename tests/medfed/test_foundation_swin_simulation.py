"""End to end: a pretrained MONAI SwinUNETR (saved in our MONAI layout) is the lesion
segmentation network of a 2-site, 1-round Flower simulation under DP-SGD. Its Swin encoder
stays at each site (digest-checked); only the LoRA adapters on its attention, the widened input
convolutions and the convolutional decoder travel, in both directions; the round's model is
registered as an MLflow version that serves per-voxel probabilities and carries the fine-tuned
SwinUNETR in MONAI's own format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import SwinUNETR
from safetensors.torch import load_file

from client.mods import egress_log
from medfed.simulation import simulate
from models.foundation.monai_nets import SWIN_UNETR_TYPE, save_monai
from server.config import load_experiment
from server.config.schema import ConfigError

from .test_foundation_simulation import ingress_log, travelling_keys

pytestmark = pytest.mark.slow

SWIN = dict(in_channels=1, out_channels=2, feature_size=12, depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2], window_size=4, spatial_dims=2)


def test_lora_on_a_swin_unetr_segments_lesions_and_sends_no_frozen_encoder(tiny_sites, tmp_path):
    sites = tmp_path / "sites"          # a copy: DP-SGD writes each site's privacy ledger
    shutil.copytree(tiny_sites, sites)
    encoders = tmp_path / "encoders"
    torch.manual_seed(0)
    base = SwinUNETR(**SWIN)
    save_monai(base, SWIN, encoders / "swin-tiny", model_type=SWIN_UNETR_TYPE)
    common = ["model=foundation_swin", "model.options.weights=swin-tiny",
              f"model.foundation_dir={encoders}", "model.options.lora_rank=2",
              "task=lesion_seg", "task.image_size=64", "federation=sim2",
              "federation.num_rounds=1", "train.local_epochs=1", "train.batch_size=8",
              f"data.root={sites}", f"runs_dir={tmp_path / 'runs'}"]
    with pytest.raises(ConfigError, match="use model=foundation_swin"):
        load_experiment(common[:1] + ["model=foundation"] + common[1:])
    cfg = load_experiment(common + ["privacy=dpsgd", "tracking.log_models=true",
                                    "+federation.site_node_config={dp-epsilon:10.0,"
                                    "dp-delta:1e-5}"])
    run_dir = simulate(cfg, client_mods=[egress_log(tmp_path / "egress"),
                                         ingress_log(tmp_path / "ingress")])
    assert (run_dir / "mlflow.db").is_file()
    # the sites trained under DP-SGD: each reports the epsilon it spent, the version says so
    import mlflow

    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version(cfg.tracking.registered_model, "1")
    assert version.tags["privacy.mechanism"] == "dp-sgd"
    metrics = client.get_run(version.run_id).data.metrics
    for site in ("site-0", "site-1"):
        assert 0 < metrics[f"site/{site}/train/dp-epsilon"] <= 8.0 + 0.05
    # the registered version: per-voxel probabilities, and MONAI's own SwinUNETR weights
    mlflow.set_tracking_uri(uri)
    model_uri = f"models:/{cfg.tracking.registered_model}/1"
    probs = mlflow.pyfunc.load_model(model_uri).predict(torch.rand(2, 4, 64, 64).numpy())
    assert probs.shape == (2, 2, 64, 64)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=0, atol=1e-5)
    weights = Path(client.download_artifacts(version.run_id, version.tags["weights"],
                                             str(tmp_path / "out")))
    constructor = json.loads((weights / "config.json").read_text())["constructor"]
    assert constructor == SWIN | {"in_channels": 4}
    SwinUNETR(**constructor).load_state_dict(load_file(str(weights / "model.safetensors")))

    for keys in travelling_keys(tmp_path, sites=2):
        swin = {k for k in keys if k.startswith("net.swinViT.")}
        assert all("lora_" in k or k.startswith("net.swinViT.patch_embed.proj.")
                   for k in swin), swin
        assert any(".attn.qkv.lora_A" in k for k in swin)
        assert any(k.startswith("net.decoder1.") for k in keys)
        assert not any(k.startswith("net.swinViT.layers1.0.blocks.0.mlp") for k in keys)
