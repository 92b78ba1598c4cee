"""End to end: a 2-site, 1-round Flower simulation of a LoRA fine-tuning of a pretrained
encoder saved as a transformers directory (DINOv2 with and without registers, DINOv3) or in
timm's hub layout - the coordinator and every site resolve its NAME in their own foundation
directory, and only adapters, new patch/channel embeddings and the head travel, in both
directions. The other families (ViT, ViT-MAE, SigLIP, CLIP's vision tower, MONAI's 2D ViT)
and a SecAgg+ run go through the same ServerApp and ClientApp in process, without Ray
(``tests.medfed.inprocess``: seconds instead of ~35 s a run)."""

from __future__ import annotations

import json
import math
import os
import shutil
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

from ..models.test_foundation import _hf_model, _save  # noqa: E402
from .inprocess import simulate_in_process  # noqa: E402

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
    from safetensors.torch import load_file

    if family == "siglip_pair":    # the full image-text SiglipModel with its tokenizer: a
        # classification run loads its vision tower (the text tower stays in the directory)
        from ..models.test_foundation_objectives import _save_pair

        directory = encoders / "siglip-pair"
        _save_pair("siglip", directory)
        return directory.name, len(load_file(str(directory / "model.safetensors")))
    if family in ("vit", "vit_mae", "siglip", "monai_vit", "clip_vision"):
        # the models tests' tiny builds (tests/models/test_foundation.py); CLIP's vision
        # tower alone is the CLIPVisionModel of that CLIPModel's vision config
        directory = encoders / f"{family}-tiny"
        if family == "clip_vision":
            torch.manual_seed(0)
            transformers.CLIPVisionModel(_hf_model("clip").config.vision_config) \
                .save_pretrained(directory)
        else:
            _save(family, directory)
        return directory.name, len(load_file(str(directory / "model.safetensors")))
    if family == "timm":       # timm's hub layout, written by real timm (tests/fixtures)
        import shutil

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


def _lora_overrides(weights: str, encoders: Path, sites: Path, runs: Path) -> list[str]:
    """One round, one epoch of rank-2 LoRA on encoder ``weights`` of ``encoders``, 32 px."""
    return ["model=foundation", f"model.options.weights={weights}",
            f"model.foundation_dir={encoders}", "model.options.lora_rank=2",
            "task.image_size=32", "federation.num_rounds=1", "train.local_epochs=1",
            "train.batch_size=8", f"data.root={sites}", f"runs_dir={runs}",
            "name=foundation-smoke"]


@pytest.mark.parametrize("family,channel_tokens,extra", [
    ("dinov2", "per_channel", []), ("timm", "per_channel", []), ("dinov2", "fused", []),
    ("dinov2_with_registers", "fused", []),
    # DINOv3 with checkpointed blocks: trained, evaluated and exported (torch.export) as is
    ("dinov3", "per_channel", ["+model.options.gradient_checkpointing=true"])])
def test_lora_on_a_saved_encoder_sends_only_trainable_tensors(tiny_sites, tmp_path, family,
                                                              channel_tokens, extra):
    encoders = tmp_path / "encoders"
    weights, n_base = _save_base(family, encoders)
    cfg = load_experiment(["federation=sim2",
                           *_lora_overrides(weights, encoders, tiny_sites, tmp_path / "runs"),
                           f"model.options.channel_tokens={channel_tokens}", *extra])
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

    assert_only_trainable_travel(tmp_path, cfg, n_base=n_base, fused=channel_tokens == "fused")


def adapter_or_new_part(key: str) -> bool:
    """A LoRA adapter, or a part the adaptation adds (patch/channel embeddings, class head)."""
    return "lora_" in key or key.split(".")[0] in ("patch_embed", "channel_embed", "head")


def trainable_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each trainable parameter of the model ``cfg``'s task trains, built as
    the server builds it."""
    from models.tasks import build

    model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options(),
                     foundation_dir=cfg.model.foundation_dir)
    return {k: tuple(p.shape) for k, p in model.named_parameters() if p.requires_grad}


def assert_only_trainable_travel(folder: Path, cfg, *, n_base: int, fused: bool) -> None:
    """Both ways, every site (``travelling_keys``): exactly the model's trainable parameters -
    adapters, the new patch embedding (fused: one over all channels; per channel: one each,
    and the channel embedding) and the head."""
    trainable = set(trainable_shapes(cfg))
    for keys in travelling_keys(folder, sites=2):
        assert keys == trainable
        assert all(map(adapter_or_new_part, keys)), sorted(keys)
        assert any("lora_A" in k for k in keys) and any(k.startswith("head.") for k in keys)
        assert len(keys) < n_base              # fewer than the base's tensors
        assert ({"patch_embed.weight", "patch_embed.bias"} <= keys) == fused
        assert any(k.startswith("channel_embed.") for k in keys) == (not fused)


@pytest.mark.parametrize("family,model_type", [
    ("vit", "vit"), ("vit_mae", "vit_mae"), ("siglip", "siglip_vision_model"),
    ("clip_vision", "clip_vision_model"), ("monai_vit", "monai_vit"),
    ("siglip_pair", "siglip")])
def test_lora_on_each_other_family_sends_only_trainable_tensors(tiny_sites, tmp_path, family,
                                                                model_type):
    """ViT, ViT-MAE (fine-tuned as an encoder), SigLIP's and CLIP's vision towers, a whole
    SiglipModel directory (its vision tower fine-tuned) and MONAI's 2D ViT: the same federation, in process (the Ray simulation is the cases above); the
    family-format export of each is tests/models/test_foundation_export.py's."""
    encoders = tmp_path / "encoders"
    weights, n_base = _save_base(family, encoders)
    assert json.loads((encoders / weights / "config.json").read_text())["model_type"] \
        == model_type
    cfg = load_experiment(["federation=sim2",
                           *_lora_overrides(weights, encoders, tiny_sites, tmp_path / "runs"),
                           "tracking.log_models=false"])
    run_dir = simulate_in_process(cfg, client_mods=[egress_log(tmp_path / "egress"),
                                                    ingress_log(tmp_path / "ingress")])
    assert (run_dir / "mlflow.db").is_file()
    assert_only_trainable_travel(tmp_path, cfg, n_base=n_base, fused=False)


def test_lora_under_secagg_masks_only_adapters_and_head(three_sites, tmp_path):
    """SecAgg+ with its fewest sites (three) around a LoRA fine-tuning of a saved DINOv2: the
    frozen base travels neither way, each site's masked vector holds exactly its trainable
    parameters, and the secure aggregate is a model of the trainable set's shapes."""
    from protocol.secagg_encoding import HEADER
    from tests.conftest import final_weights

    encoders = tmp_path / "encoders"
    weights, _ = _save_base("dinov2", encoders)
    cfg = load_experiment(["federation=sim3",
                           *_lora_overrides(weights, encoders, three_sites, tmp_path / "runs"),
                           "strategy.min_train_sites=3", "secagg.enabled=true",
                           "tracking.log_models=false"])
    run_dir = simulate_in_process(cfg, client_mods=[egress_log(tmp_path / "egress"),
                                                    ingress_log(tmp_path / "ingress")])
    trainable = trainable_shapes(cfg)
    assert all(map(adapter_or_new_part, trainable)) and any("lora_A" in k for k in trainable)
    sent = [json.loads(p.read_text()) for p in (tmp_path / "ingress").glob("*.json")]
    assert [(set(s["arrays"]), s["frozen"]) for s in sent] == [(set(trainable), False)] * 3
    replies = [json.loads(p.read_text()) for p in (tmp_path / "egress").glob("*.json")]
    masked = [r["records"]["arrays"] for r in replies
              if r.get("message_type") == "train" and "arrays" in r.get("records", {})]
    n_trainable = sum(math.prod(shape) for shape in trainable.values())
    assert masked == [{"secagg-masked": [n_trainable + HEADER]}] * 3
    final = final_weights(run_dir)
    assert {k: final[k].shape for k in trainable} == trainable
    assert any(abs(final[k]).max() > 0 for k in trainable if "lora_B" in k)  # B starts at 0


@pytest.mark.parametrize("method,vector", [("dora", "lora_magnitude_vector"), ("ia3", "ia3_l")])
def test_dora_and_ia3_train_under_dp_sgd_and_send_only_trainable_tensors(tiny_sites, tmp_path,
                                                                          method, vector):
    """DP-SGD on DoRA's magnitude and IA3's scaling vectors (per-sample rules in
    client/privacy/adapter_grads.py): accepted at config load and by each site's clipper,
    both sites spend their budget, only the trainable set travels, and the vectors' update
    (noise included: this checks the wiring, not learning) comes back into the global model."""
    import mlflow
    from tests.conftest import final_weights

    sites = tmp_path / "sites"          # a copy: DP-SGD writes each site's privacy ledger
    shutil.copytree(tiny_sites, sites)
    encoders = tmp_path / "encoders"
    weights, n_base = _save_base("dinov2", encoders)
    cfg = load_experiment(["federation=sim2",
                           *_lora_overrides(weights, encoders, sites, tmp_path / "runs"),
                           f"model.options.method={method}", "privacy=dpsgd",
                           "+federation.site_node_config={dp-epsilon:10.0,dp-delta:1e-5}",
                           "tracking.log_models=false"])
    run_dir = simulate_in_process(cfg, client_mods=[egress_log(tmp_path / "egress"),
                                                    ingress_log(tmp_path / "ingress")])
    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = {k: v for r in runs for k, v in r.data.metrics.items()}
    for site in ("site-0", "site-1"):
        assert 0 < metrics[f"site/{site}/train/dp-epsilon"] <= 10.0
    trainable = trainable_shapes(cfg)
    for keys in travelling_keys(tmp_path, sites=2):
        assert keys == set(trainable) and len(keys) < n_base
        assert any(vector in k for k in keys)
        assert all(vector in k or "lora_" in k or k.split(".")[0] in (
            "patch_embed", "channel_embed", "head") for k in keys), sorted(keys)
    from models.tasks import build

    start, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options(),
                     foundation_dir=cfg.model.foundation_dir)
    initial = start.state_dict()
    final = final_weights(run_dir)
    moved = [k for k in trainable
             if vector in k and not torch.equal(torch.as_tensor(final[k]), initial[k])]
    assert moved, "no DoRA/IA3 vector changed in the round"
