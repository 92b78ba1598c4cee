"""timm ViTs without timm: the committed fixtures (tests/fixtures/make_timm_vit.py, made once
with REAL timm 1.0.31) are read by our loader, whose features must equal the ones timm
recorded; then adapted to 4 channels, fine-tuned with LoRA under exact per-sample gradients,
refused when config and weights disagree, converted from pickle, and exported back in timm's
own layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import MODELS
from models.foundation.export import (ADAPTATION_CONFIG, ADAPTER_DIR, ENCODER_DIR,
                                      export_foundation, load_export)
from models.foundation.loading import (CONVERT_COMMAND, FoundationLoadError, family_of,
                                       load_encoder)
from models.foundation.lora import trainable_keys
from models.foundation.timm_vit import TIMM_FAMILY, TimmViT, parse_config

from .test_foundation import (_randomise_trainable, assert_absent_channel_ignored,
                              assert_exact_per_sample, clipper_admits)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "timm"
NAMES = ["vit_tiny", "vit_small_reg4_dinov2", "vit_base_gap"]
S, B = 4, 2


def _expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / f"{name}.expected.safetensors"))


def _size(name: str) -> int:
    return load_encoder(FIXTURES / name).encoder.config.img_size


def _build(name: str, directory: Path = FIXTURES, **options):
    options = {"weights": name, "num_channels": S, "image_size": _size(name)} | options
    return MODELS.build("foundation", options, foundation_dir=directory)


def _batch(size: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    present = torch.ones(B, S, dtype=torch.bool)
    present[0, 2] = False                                   # one channel absent
    images = torch.randn(B, S, size, size, generator=g, dtype=dtype) * present[..., None, None]
    return {"image": images, "present": present, "label": torch.tensor([0, 2])}


def _copy(name: str, tmp_path: Path, **model_args) -> Path:
    """The fixture with ``model_args`` changed in its config.json."""
    directory = tmp_path / name
    shutil.copytree(FIXTURES / name, directory)
    config = json.loads((directory / "config.json").read_text())
    config["model_args"] = config["model_args"] | model_args
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("name", NAMES)
def test_a_meta_device_build_has_the_real_builds_parameters(name):
    """The site's size check (client.queries ``check_model_size``) builds on the meta device."""
    with torch.device("meta"):
        sized = _build(name)
    assert ({k: tuple(v.shape) for k, v in sized.named_parameters()}
            == {k: tuple(v.shape) for k, v in _build(name).named_parameters()})


# ---------------------------------------------------------------- equal to real timm

@pytest.mark.parametrize("name", NAMES)
def test_features_equal_the_ones_timm_recorded(name):
    loaded = load_encoder(FIXTURES / name)
    assert loaded.family == family_of(FIXTURES / name) == TIMM_FAMILY
    assert isinstance(loaded.encoder, TimmViT) and not loaded.encoder.training
    expected = _expected(name)
    with torch.no_grad():
        features = loaded.encoder.forward_features(expected["images"])
        torch.testing.assert_close(features, expected["forward_features"], rtol=0, atol=1e-5)
        torch.testing.assert_close(loaded.encoder.pre_logits(features), expected["pre_logits"],
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_the_seams_reproduce_timm_on_rgb(name):
    """The path the adapted model takes (patch kernel, class token, positions, ``encode`` with
    its attention mask and registers) gives timm's tokens, registers dropped; with fc_norm
    (average pooling) every token is normalised."""
    loaded = load_encoder(FIXTURES / name)
    encoder, seams, cfg = loaded.encoder, loaded.seams, loaded.encoder.config
    expected = _expected(name)
    weight, bias = seams.patch_kernel(encoder)
    with torch.no_grad():
        tokens = torch.nn.functional.conv2d(expected["images"], weight, bias, stride=cfg.patch_size)
        tokens = tokens.flatten(2).transpose(1, 2)
        cls_pos, pos = seams.position_embedding(encoder, cfg.grid)
        tokens = tokens + pos
        if seams.has_cls:
            tokens = torch.cat([(seams.cls_token(encoder) + cls_pos).expand(B, -1, -1), tokens], 1)
        attend = torch.ones(tokens.shape[:2], dtype=torch.bool)
        out = seams.encode(encoder, tokens, attend, 1, cfg.grid)
    timm = expected["forward_features"]
    timm = torch.cat([timm[:, :int(cfg.class_token)], timm[:, cfg.num_prefix_tokens:]], 1)
    with torch.no_grad():
        timm = encoder.fc_norm(timm)
    assert out.shape == timm.shape
    torch.testing.assert_close(out, timm, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_the_adapted_model_runs_and_masks_an_absent_channel(name):
    model = _build(name).eval()
    size = _size(name)
    batch = _batch(size)
    with torch.no_grad():
        logits = model(batch["image"], batch["present"])
        assert logits.shape == (B, 3) and torch.isfinite(logits).all()
        garbage = batch["image"].clone()
        garbage[0, 2] = torch.randn(size, size) * 10
        torch.testing.assert_close(model(garbage, batch["present"]), logits, rtol=0, atol=1e-5)
        changed = batch["image"].clone()
        changed[0, 1] = torch.randn(size, size)
        assert not torch.allclose(model(changed, batch["present"])[0], logits[0], atol=1e-4)
        # another grid: positions resampled as timm resamples them
        big = _build(name, image_size=2 * size).eval()
        feats = big.forward_features(torch.randn(1, S, 2 * size, 2 * size),
                                     torch.ones(1, S, dtype=torch.bool))
    grid = 2 * size // model.patch_size
    assert feats.shape[1] == int(model.seams.has_cls) + S * grid * grid


# ---------------------------------------------------------------- architecture from config

def test_architecture_names_resolve_as_timm_registers_them():
    large = parse_config({"architecture": "vit_large_patch16_224"})
    assert (large.embed_dim, large.depth, large.num_heads, large.img_size,
            large.patch_size) == (1024, 24, 16, 224, 16)
    assert large.class_token and large.init_values is None and large.num_classes == 1000
    reg = parse_config({"architecture": "vit_base_patch14_reg4_dinov2", "num_classes": 0})
    assert (reg.embed_dim, reg.num_heads, reg.img_size, reg.reg_tokens, reg.no_embed_class,
            reg.init_values, reg.num_classes) == (768, 12, 518, 4, True, 1e-5, 0)
    retfound = parse_config({"architecture": "vit_large_patch16_224",
                             "model_args": {"global_pool": "avg", "num_classes": 0}})
    assert retfound.use_fc_norm
    sized = parse_config({"architecture": "vit_small_patch16_224",
                          "pretrained_cfg": {"input_size": [1, 384, 384],
                                             "fixed_input_size": True}})
    assert (sized.img_size, sized.in_chans) == (384, 1)
    legacy = parse_config({"architecture": "vit_base_patch16_224.augreg_in21k_ft_in1k",
                           "num_classes": 0, "input_size": [3, 384, 384],   # timm's old form
                           "fixed_input_size": True})
    assert (legacy.img_size, legacy.num_heads, legacy.num_classes) == (384, 12, 0)


@pytest.mark.parametrize("config,reason", [
    ({"architecture": "vit_base_patch16_clip_224"}, "not supported"),
    ({"architecture": "vit_giant_patch14_dinov2"}, "not supported"),       # SwiGLU
    ({"architecture": "resnet50"}, "not supported"),
    ({"architecture": "vit_base_patch16_224", "model_args": {"act_layer": "quick_gelu"}},
     "act_layer"),
    ({"architecture": "vit_base_patch16_224", "model_args": {"qk_norm": True}}, "qk_norm"),
    ({"architecture": "vit_base_patch16_224", "model_args": {"global_pool": "map"}},
     "attention-pool"),
    ({"architecture": "vit_base_patch16_224", "model_args": {"img_size": [224, 160]}},
     "non-square"),
    ({"architecture": "vit_base_patch16_224", "model_args": {"depth": "12"}}, "depth='12'"),
    ({"architecture": "vit_base_patch16_224", "model_args": {"class_token": 1}}, "class_token"),
    ({"architecture": "vit_base_patch16_224", "model_args": {"num_heads": 0}}, ">= 1"),
    ({"architecture": "vit_base_patch16_224", "model_args": [12]}, "JSON objects"),
    ({"architecture": "vit_base_patch16_224", "pretrained_cfg": {"input_size": 3}}, "int"),
])
def test_what_cannot_be_represented_exactly_is_refused_in_one_line(tmp_path, config, reason):
    with pytest.raises(ValueError, match=reason) as err:
        parse_config(config)
    assert "\n" not in str(err.value)
    directory = tmp_path / "model"
    shutil.copytree(FIXTURES / "vit_tiny", directory)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(FoundationLoadError, match=reason):
        load_encoder(directory)


@pytest.mark.parametrize("name,change,expected", [
    ("vit_tiny", {"depth": 3}, "missing"),
    ("vit_tiny", {"depth": 1}, "unexpected"),
    ("vit_tiny", {"embed_dim": 48, "num_heads": 3}, "wrong shape"),
    ("vit_tiny", {"class_token": False}, "unexpected cls_token"),
    ("vit_tiny", {"img_size": 64}, "wrong shape pos_embed"),
    ("vit_small_reg4_dinov2", {"init_values": None}, "unexpected blocks.0.ls1.gamma"),
    ("vit_small_reg4_dinov2", {"reg_tokens": 0}, "unexpected reg_token"),
    ("vit_base_gap", {"qkv_bias": True}, "missing blocks.0.attn.qkv.bias"),
    ("vit_base_gap", {"global_pool": "token", "class_token": True}, "missing"),
])
def test_a_config_that_does_not_match_the_weights_is_refused(tmp_path, name, change, expected):
    with pytest.raises(FoundationLoadError, match=expected) as err:
        load_encoder(_copy(name, tmp_path, **change))
    assert "\n" not in str(err.value) and "do not match its config.json" in str(err.value)


def test_pickle_is_refused_and_convert_weights_makes_it_loadable(tmp_path, capsys):
    """timm's own save_for_hf(safe_serialization=False) writes pytorch_model.bin."""
    from medfed.cli import main

    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(FIXTURES / "vit_tiny" / "config.json", src / "config.json")
    torch.save(load_file(str(FIXTURES / "vit_tiny" / "model.safetensors")),
               src / "pytorch_model.bin")
    with pytest.raises(FoundationLoadError) as err:
        load_encoder(src)
    assert CONVERT_COMMAND in str(err.value) and "\n" not in str(err.value)
    assert main(["convert-weights", str(src), str(tmp_path / "converted")]) == 0
    converted = load_encoder(tmp_path / "converted").encoder.state_dict()
    original = load_encoder(FIXTURES / "vit_tiny").encoder.state_dict()
    assert converted.keys() == original.keys()
    for key, value in original.items():
        torch.testing.assert_close(converted[key], value, rtol=0, atol=0)


def test_the_coordinator_checks_a_timm_directory_from_its_config_alone():
    from models.foundation.objectives import directory_refusal

    assert directory_refusal(FIXTURES / "vit_tiny", "mm_dino", "lora") is None
    assert "CLS token" in directory_refusal(FIXTURES / "vit_base_gap", "mm_dino", "lora")
    assert directory_refusal(FIXTURES / "vit_base_gap", "classification", "lora") is None


# ---------------------------------------------------------------- LoRA and DP-SGD

def test_lora_adapts_the_fused_qkv_and_trains_only_adapters_and_new_parts():
    model = _build("vit_small_reg4_dinov2", method="lora", lora_rank=2)
    keys = trainable_keys(model)
    lora = [k for k in keys if "lora_" in k]
    assert lora and all(".attn.qkv." in k for k in lora)
    assert all("lora_" in k or k.split(".")[0] in ("patch_embed", "channel_embed", "head")
               for k in keys), keys
    assert not any(k.startswith("encoder.") and "lora_" not in k for k in keys)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
@pytest.mark.parametrize("name", NAMES)
def test_per_sample_gradients_are_exact_for_every_adapter_method(name, method):
    model = _build(name, method=method, lora_rank=2).double().train()
    assert model.dp_unsupported is None
    _randomise_trainable(model)
    assert_exact_per_sample(model, _batch(_size(name), dtype=torch.float64))


# ---------------------------------------------------------------- weights out

@pytest.mark.parametrize("name", ["vit_tiny", "vit_small_reg4_dinov2"])
def test_export_writes_timm_layout_with_lora_merged(tmp_path, name):
    from peft import PeftModel

    model = _build(name, method="lora", lora_rank=2)
    _randomise_trainable(model, seed=3)
    model.eval()
    out = export_foundation(model, tmp_path / "export")
    encoder_dir = out / ENCODER_DIR
    # timm's layout: the same config.json, the same keys and shapes as the original
    assert json.loads((encoder_dir / "config.json").read_text()) == \
        json.loads((FIXTURES / name / "config.json").read_text())
    exported = load_file(str(encoder_dir / "model.safetensors"))
    original = load_file(str(FIXTURES / name / "model.safetensors"))
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in original.items()}
    changed = {k for k in original if not torch.equal(exported[k], original[k])}
    assert changed and all(".attn.qkv.weight" in k for k in changed), changed   # LoRA merged
    images = _expected(name)["images"]
    merged = load_encoder(encoder_dir, expected_family=TIMM_FAMILY).encoder
    base = load_encoder(FIXTURES / name).encoder
    with torch.no_grad():
        adapted = model.encoder.forward_features(images)      # adapters active, unmerged
        torch.testing.assert_close(merged.forward_features(images), adapted, rtol=0, atol=1e-5)
        assert (base.forward_features(images) - adapted).abs().max() > 1e-3
        peft_model = PeftModel.from_pretrained(base, str(out / ADAPTER_DIR)).eval()
        torch.testing.assert_close(peft_model.forward_features(images), adapted,
                                   rtol=0, atol=1e-5)
        batch = _batch(_size(name))
        torch.testing.assert_close(load_export(out)(batch["image"], batch["present"]),
                                   model(batch["image"], batch["present"]), rtol=0, atol=1e-5)


def test_an_unsupported_timm_directory_fails_at_config_load(tmp_path):
    from server.config import ConfigError, load_experiment

    directory = _copy("vit_tiny", tmp_path / "encoders", qk_norm=True)
    base = ["model=foundation", f"model.options.weights={directory.name}",
            f"model.foundation_dir={directory.parent}", "task.image_size=32"]
    with pytest.raises(ConfigError, match="qk_norm=True is not supported"):
        load_experiment(base)
    shutil.copytree(FIXTURES / "vit_base_gap", directory.parent / "gap")
    with pytest.raises(ConfigError, match="CLS token"):
        load_experiment(base[:1] + ["model.options.weights=gap"] + base[2:] + ["pretrain=mm_dino"])


# ---------------------------------------------------------------- pretraining objectives

@pytest.mark.parametrize("objective,options", [("mm_dino", {"local_crops": 1}), ("mae", {})])
def test_pretraining_objectives_start_from_a_timm_vit_with_registers(objective, options):
    """MM-DINOv2 and MAE through the site's engine from the DINOv2-reg fixture (class token,
    4 registers, LayerScale): only adapters, new parts and the objective's heads move."""
    from client.engine import Engine
    from models.tasks import build
    from protocol.job import TrainConfig

    model, task = build("foundation", {"weights": "vit_small_reg4_dinov2", "num_channels": S,
                                       "image_size": 56, "lora_rank": 2},
                        objective, options, foundation_dir=FIXTURES)
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(S, 56, 56, generator=g), "present": torch.ones(S, dtype=bool),
             "label": torch.tensor(i % 3 if i < 3 else -1)} for i in range(6)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = Engine(task, torch.device("cpu")).fit(
        model, data, TrainConfig(local_epochs=1, batch_size=3, lr=1e-2))
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert trainable and changed == trainable
    assert any("lora_" in n and ".attn.qkv." in n for n in changed)
    assert not any(n.startswith("backbone.encoder.") and "lora_" not in n for n in changed)


@pytest.mark.parametrize("name", NAMES)
def test_dp_sgd_coverage_declared_for_timm_is_what_the_clipper_admits(name):
    for method in ("lora", "linear_probe", "full"):
        model = _build(name, method=method)
        assert (model.dp_unsupported is None) == clipper_admits(model), (name, method)


# ---------------------------------------------------------------- fused channel tokens

def _timm_tokens(encoder: TimmViT, images: torch.Tensor) -> torch.Tensor:
    """timm's own forward on RGB ``images`` as ``encode`` returns tokens: registers dropped,
    fc_norm applied (an identity unless the model pools by average)."""
    cfg = encoder.config
    out = encoder.forward_features(images)
    return encoder.fc_norm(torch.cat([out[:, :int(cfg.class_token)],
                                      out[:, cfg.num_prefix_tokens:]], 1))


@pytest.mark.parametrize("name", NAMES)
def test_fused_tokens_on_a_grey_study_are_timm_on_the_grey_picture(name):
    """One token per location; a study whose S channels all hold x is, token for token, what
    timm's own forward gives for the grey picture (x, x, x) (class token, registers, average
    pooling's fc_norm): the inflated kernel keeps the pretrained response."""
    model = _build(name, channel_tokens="fused").eval()
    size = _size(name)
    x = torch.randn(B, 1, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.forward_features(x.expand(-1, S, -1, -1), torch.ones(B, S, dtype=torch.bool))
        theirs = _timm_tokens(model.encoder, x.expand(-1, 3, -1, -1))
    assert ours.shape[1] == int(model.seams.has_cls) + (size // model.patch_size) ** 2
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_fused_tokens_ignore_an_absent_channel_with_exact_per_sample_gradients(name):
    model = _build(name, channel_tokens="fused").eval()
    batch = _batch(_size(name))
    with torch.no_grad():
        assert_absent_channel_ignored(model, batch, model(batch["image"], batch["present"]))
    model = _build(name, channel_tokens="fused", method="lora", lora_rank=2).double().train()
    assert model.dp_unsupported is None
    _randomise_trainable(model)
    assert_exact_per_sample(model, _batch(_size(name), dtype=torch.float64))


def test_a_fused_timm_model_exports_in_timms_layout_and_reloads(tmp_path):
    name = "vit_small_reg4_dinov2"
    model = _build(name, channel_tokens="fused", lora_rank=2)
    _randomise_trainable(model, seed=3)
    model.eval()
    out = export_foundation(model, tmp_path / "export")
    assert json.loads((out / ENCODER_DIR / "config.json").read_text()) == \
        json.loads((FIXTURES / name / "config.json").read_text())
    meta = json.loads((out / ADAPTATION_CONFIG).read_text())
    assert meta["config"]["channel_tokens"] == "fused" and set(meta["parts"]) == {"patch_embed",
                                                                                   "head"}
    again = load_export(out)
    assert again.fused and again.family == TIMM_FAMILY
    batch = _batch(_size(name))
    with torch.no_grad():
        torch.testing.assert_close(again(batch["image"], batch["present"]),
                                   model(batch["image"], batch["present"]), rtol=0, atol=1e-5)
