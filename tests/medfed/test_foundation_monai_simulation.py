"""End to end in 3D: a pretrained MONAI ViT (spatial_dims=3) shipped as a MONAI bundle, LoRA
fine-tuned on CT volumes (``experiment=ct3``: ``data/layout=ct_volume``, three windows as
channels) by two sites for one round of a real Flower simulation. Each side resolves the
bundle's NAME in its own foundation directory; only adapters, the per-channel patch
embeddings, the channel embedding and the head travel, in both directions; the registered
version scores volumes and its encoder loads into MONAI's own ViT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import ViT
from safetensors.torch import load_file, save_file

from client.mods import egress_log
from medfed.simulation import simulate
from medfed.synth.ct import synthesize_ct
from server.config import load_experiment

from ..conftest import _fixed_pseudonym_keys
from .test_foundation_simulation import ingress_log, travelling_keys

pytestmark = pytest.mark.slow


def test_lora_on_a_3d_monai_vit_bundle_over_ct_volumes_sends_only_trainable_tensors(tmp_path):
    root = tmp_path / "data"
    synthesize_ct(root, n_sites=2, seed=2, patients=10)
    _fixed_pseudonym_keys(root)
    bundle = tmp_path / "encoders" / "ct-vit-bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    args = dict(in_channels=1, img_size=32, patch_size=8, hidden_size=32, mlp_dim=64,
                num_layers=2, num_heads=2, spatial_dims=3, classification=True, qkv_bias=True)
    (bundle / "configs" / "inference.json").write_text(json.dumps({
        "network_def": {"_target_": "monai.networks.nets.ViT", **args},
        "network": "$@network_def.to(@device)", "device": "$torch.device('cpu')"}))
    torch.manual_seed(0)
    base = ViT(**args)
    save_file({k: v.contiguous() for k, v in base.state_dict().items()},
              str(bundle / "models" / "model.safetensors"))
    cfg = load_experiment([
        "experiment=ct3", "model=foundation", "~model.options.input_center",
        "model.options.weights=ct-vit-bundle",
        f"model.foundation_dir={bundle.parent}", "model.options.lora_rank=2",
        "federation=sim2", "federation.num_rounds=1", "train.local_epochs=1",
        f"data.root={root}", f"runs_dir={tmp_path / 'runs'}"])
    job = cfg.job_spec()
    assert job.layout.name == "ct_volume" and job.model_options["spatial_dims"] == 3
    assert job.model_options["num_channels"] == 3          # the layout's three windows
    run_dir = simulate(cfg, client_mods=[egress_log(tmp_path / "egress"),
                                         ingress_log(tmp_path / "ingress")])
    assert (run_dir / "mlflow.db").is_file()
    # the registered version: a graph over volumes, and the encoder in MONAI's own format
    import mlflow

    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    client = mlflow.MlflowClient(uri)
    (version,) = client.search_model_versions(f"name='{cfg.tracking.registered_model}'")
    mlflow.set_tracking_uri(uri)
    model_uri = f"models:/{cfg.tracking.registered_model}/{version.version}"
    assert mlflow.models.get_model_info(model_uri).metadata["foundation_family"] == "monai_vit"
    probs = mlflow.pyfunc.load_model(model_uri).predict(
        torch.rand(2, 3, 32, 32, 32).numpy())
    assert probs.shape == (2, 3)
    encoder = Path(client.download_artifacts(version.run_id, f"{version.tags['weights']}/encoder",
                                             str(tmp_path / "out")))
    constructor = json.loads((encoder / "config.json").read_text())["constructor"]
    assert constructor == args
    ViT(**constructor).load_state_dict(load_file(str(encoder / "model.safetensors")))

    for keys in travelling_keys(tmp_path, sites=2):
        for key in keys:
            assert "lora_" in key or key.split(".")[0] in ("patch_embed", "channel_embed",
                                                           "head"), key
        assert any(".attn.qkv.lora_A" in k for k in keys)
        assert {k for k in keys if k.startswith("patch_embed.")} == {
            f"patch_embed.{c}.{w}" for c in range(3) for w in ("weight", "bias")}
        assert len(keys) < len(base.state_dict())
