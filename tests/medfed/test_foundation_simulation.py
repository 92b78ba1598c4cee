"""End to end: a 2-site, 1-round Flower simulation of a LoRA fine-tuning of a pretrained
encoder saved as a transformers directory (DINOv2 with and without registers, DINOv3) or in
timm's hub layout - the coordinator and every site resolve its NAME in their own foundation
directory, and only adapters, new patch/channel embeddings and the head travel, in both
directions."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

from client.mods import egress_log  # noqa: E402
from medfed.simulation import simulate  # noqa: E402
from protocol import wire  # noqa: E402
from server.config import load_experiment  # noqa: E402

pytestmark = pytest.mark.slow


def ingress_log(directory: Path):
    """Client mod: what the coordinator sent (array keys; is a frozen record attached)."""
    def mod(msg, context, call_next):
        if msg.metadata.message_type.startswith("train") and wire.ARRAYS in msg.content:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / f"{time.time_ns()}.json").write_text(json.dumps({
                "arrays": sorted(msg.content[wire.ARRAYS].keys()),
                "frozen": wire.FROZEN_ARRAYS in msg.content.array_records}))
        return call_next(msg, context)
    return mod


def travelling_keys(folder: Path, sites: int) -> list[set[str]]:
    """The array keys of every train message each way (``ingress_log`` / ``egress_log`` under
    ``folder``), checked to be one set for all, with no frozen record and one reply per site."""
    sent = [json.loads(p.read_text()) for p in (folder / "ingress").glob("*.json")]
    assert len(sent) == sites and not any(s["frozen"] for s in sent)
    replies = [json.loads(p.read_text()) for p in (folder / "egress").glob("*.json")]
    train = [r for r in replies if r.get("message_type", "").startswith("train")]
    assert len(train) == sites, replies
    keys = [set(s["arrays"]) for s in sent] + [set(r["records"]["arrays"]) for r in train]
    assert all(k == keys[0] for k in keys)          # the same set both ways, every site
    return keys


def _save_base(family: str, encoders: Path) -> tuple[str, int]:
    """A pretrained encoder in ``encoders``: (its name, its number of tensors)."""
    if family == "timm":       # timm's hub layout, written by real timm (tests/fixtures)
        import shutil

        from safetensors.torch import load_file

        fixture = Path(__file__).parents[1] / "fixtures" / "timm" / "vit_tiny"
        shutil.copytree(fixture, encoders / "timm-tiny")
        return "timm-tiny", len(load_file(str(fixture / "model.safetensors")))
    torch.manual_seed(0)
    tiny = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=8)
    if family == "dinov3":     # RoPE, registers, layer scale, its training-time RoPE jitter
        base = transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
            **tiny, intermediate_size=64, num_register_tokens=4))
    elif family == "dinov2_with_registers":
        base = transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(
            **tiny, mlp_ratio=2, num_register_tokens=4))
    else:
        base = transformers.Dinov2Model(transformers.Dinov2Config(**tiny, mlp_ratio=2))
    base.save_pretrained(encoders / f"{family}-tiny")
    return f"{family}-tiny", len(base.state_dict())


@pytest.mark.parametrize("family,channel_tokens,extra", [
    ("dinov2", "per_channel", []), ("timm", "per_channel", []), ("dinov2", "fused", []),
    ("dinov2_with_registers", "fused", []),
    # DINOv3 with checkpointed blocks: trained, evaluated and exported (torch.export) as is
    ("dinov3", "per_channel", ["+model.options.gradient_checkpointing=true"])])
def test_lora_on_a_saved_encoder_sends_only_trainable_tensors(tiny_sites, tmp_path, family,
                                                              channel_tokens, extra):
    encoders = tmp_path / "encoders"
    weights, n_base = _save_base(family, encoders)
    cfg = load_experiment([
        "model=foundation", f"model.options.weights={weights}",
        f"model.options.channel_tokens={channel_tokens}",
        f"model.foundation_dir={encoders}", "model.options.lora_rank=2",
        "task.image_size=32", "federation=sim2", "federation.num_rounds=1",
        "train.local_epochs=1", "train.batch_size=8", f"data.root={tiny_sites}",
        f"runs_dir={tmp_path / 'runs'}", "name=foundation-smoke", *extra])
    run_dir = simulate(cfg, client_mods=[egress_log(tmp_path / "egress"),
                                         ingress_log(tmp_path / "ingress")])
    assert (run_dir / "mlflow.db").is_file()
    # tracking.log_models at its default (true): round 1 is a registered MLflow model that
    # names its pretrained base, with the family-format export beside it
    import mlflow

    assert cfg.tracking.log_models
    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    versions = mlflow.MlflowClient(uri).search_model_versions(
        f"name='{cfg.tracking.registered_model}'")
    assert len(versions) == 1 and versions[0].tags["weights"] == "weights/round-1"
    mlflow.set_tracking_uri(uri)
    info = mlflow.models.get_model_info(
        f"models:/{cfg.tracking.registered_model}/{versions[0].version}")
    assert info.metadata["foundation_weights"] == weights
    assert info.metadata["foundation_method"] == "lora"

    for keys in travelling_keys(tmp_path, sites=2):
        for key in keys:
            assert "lora_" in key or key.split(".")[0] in ("patch_embed", "channel_embed",
                                                           "head"), key
        assert any("lora_A" in k for k in keys) and any(k.startswith("head.") for k in keys)
        assert len(keys) < n_base / 2          # far fewer than the base's tensors
        # fused: one patch embedding over all channels and no channel embedding travel
        fused = {"patch_embed.weight", "patch_embed.bias"} <= keys
        assert fused == (channel_tokens == "fused")
        assert any(k.startswith("channel_embed.") for k in keys) == (not fused)
