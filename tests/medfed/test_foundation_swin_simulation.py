"""End to end: a pretrained MONAI SwinUNETR (saved in our MONAI layout) is the lesion
segmentation network of a 2-site, 1-round Flower simulation. Its Swin encoder stays at each
site (digest-checked); only the LoRA adapters on its attention, the widened input
convolutions and the convolutional decoder travel, in both directions."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

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
    encoders = tmp_path / "encoders"
    torch.manual_seed(0)
    base = SwinUNETR(**SWIN)
    save_monai(base, SWIN, encoders / "swin-tiny", model_type=SWIN_UNETR_TYPE)
    common = ["model=foundation_swin", "model.options.weights=swin-tiny",
              f"model.foundation_dir={encoders}", "model.options.lora_rank=2",
              "task=lesion_seg", "task.image_size=64", "federation=sim2",
              "federation.num_rounds=1", "train.local_epochs=1", "train.batch_size=8",
              f"data.root={tiny_sites}", f"runs_dir={tmp_path / 'runs'}"]
    with pytest.raises(ConfigError, match="tracking.log_models=false"):
        load_experiment(common)
    with pytest.raises(ConfigError, match="use model=foundation_swin"):
        load_experiment(common[:1] + ["model=foundation"] + common[1:]
                        + ["tracking.log_models=false"])
    cfg = load_experiment(common + ["tracking.log_models=false"])
    run_dir = simulate(cfg, client_mods=[egress_log(tmp_path / "egress"),
                                         ingress_log(tmp_path / "ingress")])
    assert (run_dir / "mlflow.db").is_file()

    for keys in travelling_keys(tmp_path, sites=2):
        swin = {k for k in keys if k.startswith("net.swinViT.")}
        assert all("lora_" in k or k.startswith("net.swinViT.patch_embed.proj.")
                   for k in swin), swin
        assert any(".attn.qkv.lora_A" in k for k in swin)
        assert any(k.startswith("net.decoder1.") for k in keys)
        assert not any(k.startswith("net.swinViT.layers1.0.blocks.0.mlp") for k in keys)
