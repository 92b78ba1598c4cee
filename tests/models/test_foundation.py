"""Bring-your-own foundation model: every supported family, built tiny from a config, saved to
a local directory, loaded back strictly, adapted to 4 channels and fine-tuned with LoRA - with
DP-SGD's per-sample gradients checked against the definition in float64."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from client.privacy.persample import PerSampleClipper, UnsupportedLayerError
from models import MODELS, TASKS
from models.foundation.adapt import FoundationBackbone
from models.foundation.config import FoundationConfig
from models.foundation.convert import convert_weights
from models.foundation.loading import (CONVERT_COMMAND, FoundationLoadError,
                                       load_encoder, save_monai_vit)
from models.foundation.lora import frozen_digest, frozen_keys, trainable_keys

os.environ.setdefault("HF_HUB_OFFLINE", "1")     # never a hub, even by accident
import transformers  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8)
MONAI_TINY = dict(in_channels=3, img_size=32, patch_size=8, hidden_size=32, mlp_dim=64,
                  num_layers=2, num_heads=2, spatial_dims=2, classification=True, qkv_bias=True)
FAMILIES = ["dinov2", "dinov2_with_registers", "dinov3", "vit", "vit_mae", "clip", "siglip",
            "sam", "monai_vit"]
S, B = 4, 2
ATOL = 1e-10


def _hf_model(family: str):
    t = transformers
    if family == "dinov2":
        return t.Dinov2Model(t.Dinov2Config(**TINY, mlp_ratio=2))
    if family == "dinov2_with_registers":
        return t.Dinov2WithRegistersModel(t.Dinov2WithRegistersConfig(
            **TINY, mlp_ratio=2, num_register_tokens=2))
    if family == "dinov3":   # RoPE, registers, layer scale; its training-time RoPE jitter
        # (pos_embed_rescale) off here: the looped per-sample reference draws it anew per
        # pass (test_dinov3_keeps_its_rope_augmentation_in_training covers it)
        return t.DINOv3ViTModel(t.DINOv3ViTConfig(**TINY, intermediate_size=64,
                                                  num_register_tokens=2,
                                                  pos_embed_rescale=None))
    if family == "vit":
        return t.ViTModel(t.ViTConfig(**TINY, intermediate_size=64))
    if family == "vit_mae":
        return t.ViTMAEModel(t.ViTMAEConfig(**TINY, intermediate_size=64))
    if family == "clip":     # the full image-text model: the loader takes its vision tower
        text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, vocab_size=64, bos_token_id=0, eos_token_id=1)
        return t.CLIPModel(t.CLIPConfig(text_config=text, projection_dim=16,
                                        vision_config=dict(TINY, intermediate_size=64)))
    if family == "siglip":
        return t.SiglipVisionModel(t.SiglipVisionConfig(**TINY, intermediate_size=64))
    if family == "sam":      # window 2 divides the 4x4 grid; layer 1 attends globally
        vision = dict(TINY, mlp_dim=64, window_size=2, global_attn_indexes=[1],
                      output_channels=16)
        return t.SamModel(t.SamConfig(vision_config=vision))
    raise AssertionError(family)


def _save(family: str, directory) -> None:
    torch.manual_seed(FAMILIES.index(family))
    if family == "monai_vit":
        from monai.networks.nets import ViT

        save_monai_vit(ViT(**MONAI_TINY), MONAI_TINY, directory)
    else:
        model = _hf_model(family)
        with torch.no_grad():    # some families init positions (SAM: its patch kernel) to
            for name, p in model.named_parameters():     # ~zero: make them matter
                if "pos" in name or (p.dim() > 1 and p.abs().max() < 1e-6):
                    p.normal_(std=0.1)
        model.save_pretrained(directory)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """One saved directory per family (module-scoped: saving is the slow part)."""
    root = tmp_path_factory.mktemp("foundation")
    out = {}
    for family in FAMILIES:
        _save(family, root / family)
        out[family] = root / family
    return out


def _build(directory, **options) -> FoundationBackbone:
    options = {"weights": directory.name, "num_channels": S, "image_size": 32} | options
    return MODELS.build("foundation", options, foundation_dir=directory.parent)


def _batch(seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    present = torch.ones(B, S, dtype=torch.bool)
    present[0, 2] = False                                   # one channel absent
    images = torch.randn(B, S, 32, 32, generator=g, dtype=dtype) * present[..., None, None]
    return {"image": images, "present": present, "label": torch.tensor([0, 2])}


def _randomise_trainable(model: nn.Module, seed: int = 0) -> None:
    """LoRA's B and the channel embedding start at zero; random values make every gradient
    (and any mix-up between parameters) visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def assert_absent_channel_ignored(model, batch, logits) -> None:
    """Masked out means masked out: whatever sample 0's absent channel 2 holds changes
    nothing, while its present channel 1 does matter."""
    garbage = batch["image"].clone()
    garbage[0, 2] = torch.randn(garbage.shape[2:]) * 10
    torch.testing.assert_close(model(garbage, batch["present"]), logits, rtol=0, atol=1e-5)
    changed = batch["image"].clone()
    changed[0, 1] = torch.randn(changed.shape[2:])
    assert not torch.allclose(model(changed, batch["present"])[0], logits[0], atol=1e-4)


# ---------------------------------------------------------------- loading and forward

@pytest.mark.parametrize("family", FAMILIES)
def test_a_meta_device_build_has_the_real_builds_parameters(weights, family):
    """A site sizes a job's model on the meta device before building it (client.queries
    ``check_model_size``); transformers refuses from_pretrained there, so the loader builds
    the same model from its config: every parameter shape must be the real one's."""
    options = {"lora_rank": 4}
    with torch.device("meta"):
        sized = _build(weights[family], family=family, **options)
    real = _build(weights[family], family=family, **options)
    assert {t.device.type for t in (*sized.parameters(), *sized.buffers())} == {"meta"}
    assert ({k: tuple(v.shape) for k, v in sized.named_parameters()}
            == {k: tuple(v.shape) for k, v in real.named_parameters()})


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_loads_back_and_runs_with_an_absent_channel(weights, family):
    loaded = load_encoder(weights[family])
    assert loaded.family == family
    model = _build(weights[family], family=family).eval()
    batch = _batch()
    logits = model(batch["image"], batch["present"])
    assert logits.shape == (B, 3) and torch.isfinite(logits).all()
    assert_absent_channel_ignored(model, batch, logits)
    feats = model.forward_features(batch["image"], batch["present"])
    assert feats.shape[:2] == (B, int(model.seams.has_cls) + S * 16)


def test_loaded_weights_are_the_saved_ones(tmp_path):
    torch.manual_seed(0)
    original = _hf_model("dinov2")
    original.save_pretrained(tmp_path)
    state = load_encoder(tmp_path).encoder.state_dict()
    assert state.keys() == original.state_dict().keys()
    for k, v in original.state_dict().items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0)


def test_patch_embeddings_start_from_the_pretrained_kernel_averaged_over_rgb(weights):
    model = _build(weights["dinov2"])
    conv = model.encoder.embeddings.patch_embeddings.projection
    image = torch.randn(1, 1, 32, 32)
    rgb = conv(image.expand(-1, 3, -1, -1)).flatten(2).transpose(1, 2)       # [1, N, D]
    from models.vit import patchify

    ours = model.patch_embed[1](patchify(image, 8, 2)[:, 0])          # [1, N, D]
    bias = conv.bias
    torch.testing.assert_close(ours - bias, (rgb - bias) / 3, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["dinov2", "dinov2_with_registers", "dinov3", "vit"])
def test_a_grey_study_gets_the_familys_own_forward_on_the_grey_picture(weights, family):
    """Fused tokens from the RGB-mean kernel, every channel the same image x: the adapted
    encoder's tokens are the family's own forward on (x, x, x) - its positions (a table, or
    DINOv3's rotations), registers, layers and final norm as the family runs them - with the
    registers left out."""
    model = _build(weights[family], channel_tokens="fused").eval()
    x = torch.randn(B, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model.forward_features(x.expand(-1, S, -1, -1), torch.ones(B, S, dtype=bool))
        theirs = model.encoder(pixel_values=x.expand(-1, 3, -1, -1)).last_hidden_state
    r = getattr(model.encoder.config, "num_register_tokens", 0)
    assert theirs.shape[1] == 1 + r + 16
    torch.testing.assert_close(ours, torch.cat([theirs[:, :1], theirs[:, 1 + r:]], 1),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["dinov2_with_registers", "dinov3"])
def test_register_tokens_are_read_and_never_come_out(weights, family):
    model = _build(weights[family]).eval()
    batch = _batch()
    with torch.no_grad():
        feats = model.forward_features(batch["image"], batch["present"])
        assert feats.shape[1] == 1 + S * 16                   # CLS + patch tokens only
        registers = model.encoder.embeddings.register_tokens   # (a constant shift would
        registers.add_(torch.randn(registers.shape))          # vanish in LayerNorm)
        moved = model.forward_features(batch["image"], batch["present"])
    assert (moved - feats).abs().max() > 1e-3


def test_dinov3_rotates_every_channels_token_by_its_location(weights):
    """One token per channel and location: with every channel the same image (and the
    channel embedding at its initial zero) the S tokens of a location are the same token, so
    after the layers they must still be equal - unless a channel's tokens were rotated for
    other locations."""
    model = _build(weights["dinov3"]).eval()
    x = torch.randn(B, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        feats = model.forward_features(x.expand(-1, S, -1, -1), torch.ones(B, S, dtype=bool))
    per_channel = feats[:, 1:].reshape(B, S, 16, -1)
    torch.testing.assert_close(per_channel, per_channel[:, :1].expand_as(per_channel),
                               rtol=0, atol=1e-5)
    # the rotation does depend on the location: two equal patches at different places differ
    flat = torch.zeros(1, S, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(flat, torch.ones(1, S, dtype=bool))[0, 1:17]
    assert (tokens[0] - tokens[5]).abs().max() > 1e-4


def test_dinov3_rotations_stay_float32_when_the_tokens_are_bf16(weights):
    """Under bf16 autocast (a GPU site) the tokens are bf16; the family's own forward computes
    its rotations from float32 pixels, and so must we (bf16 angles are off by ~0.4%)."""
    model = _build(weights["dinov3"])
    tokens = torch.zeros(1, 1 + S * 16, 32, dtype=torch.bfloat16)
    (cos, sin), = model.seams._layer_arguments(model.encoder, tokens, S, 4)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (S * 16, 16)


def test_dinov3_keeps_its_rope_augmentation_in_training(tmp_path):
    """DINOv3's own RoPE module rescales the coordinates at random while training
    (``pos_embed_rescale``, on in the released configs): the adapted model keeps it (two
    training passes differ, evaluation is deterministic), and DP-SGD's summed per-sample
    gradients still equal the batch gradient for the same draw."""
    torch.manual_seed(0)
    transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        **TINY, intermediate_size=64, num_register_tokens=2,
        pos_embed_rescale=2.0)).save_pretrained(tmp_path / "dinov3")
    model = _build(tmp_path / "dinov3", method="lora", lora_rank=2).double()
    _randomise_trainable(model)
    batch = _batch(dtype=torch.float64)
    with torch.no_grad():
        model.eval()
        torch.testing.assert_close(model(batch["image"], batch["present"]),
                                   model(batch["image"], batch["present"]), rtol=0, atol=0)
        model.train()
        assert not torch.allclose(model(batch["image"], batch["present"]),
                                  model(batch["image"], batch["present"]))
    task = TASKS.build("classification", {})
    clipper = PerSampleClipper(model, max_grad_norm=1e12)
    torch.manual_seed(7)
    with clipper.capture():
        _summed_loss(model, task, batch).backward()
    grads, _ = clipper.clipped_sum()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    _summed_loss(model, task, batch).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[p], p.grad, rtol=0, atol=ATOL, msg=name)


def test_dinov3_rope_augmentation_can_be_switched_off_for_fine_tuning(tmp_path, weights):
    """``rope_augmentation=false``: training reads the positions of evaluation (two training
    passes equal each other and the evaluation pass), while the encoder's own config - what
    export saves - keeps the family's ``pos_embed_rescale``. A family without rotary
    positions refuses the option rather than ignore it."""
    torch.manual_seed(0)
    transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
        **TINY, intermediate_size=64, num_register_tokens=2,
        pos_embed_rescale=2.0)).save_pretrained(tmp_path / "dinov3")
    model = _build(tmp_path / "dinov3", rope_augmentation=False)
    batch = _batch()
    with torch.no_grad():
        model.eval()
        plain = model(batch["image"], batch["present"])
        model.train()
        for _ in range(2):
            torch.testing.assert_close(model(batch["image"], batch["present"]), plain,
                                       rtol=0, atol=0)
    assert model.encoder.config.pos_embed_rescale == 2.0
    copied = copy.deepcopy(model).train()
    with torch.no_grad():
        torch.testing.assert_close(copied(batch["image"], batch["present"]), plain,
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="the dinov2 encoder has no rotary positions"):
        _build(weights["dinov2"], rope_augmentation=False)
    with pytest.raises(ValueError, match="rope_augmentation must be true or false"):
        _build(tmp_path / "dinov3", rope_augmentation="false")


@pytest.mark.parametrize("family", ["dinov2", "dinov3", "clip", "sam", "monai_vit"])
def test_positions_are_interpolated_to_another_grid(weights, family):
    """64x64 input with patch 8 (an 8x8 grid from 4x4 pretrained positions), and a kernel
    resized to patch 4."""
    for options, tokens in (({"image_size": 64}, 64), ({"patch_size": 4}, 64)):
        model = _build(weights[family], **options).eval()
        size = options.get("image_size", 32)
        present = torch.ones(1, S, dtype=torch.bool)
        feats = model.forward_features(torch.randn(1, S, size, size), present)
        assert feats.shape[1] == int(model.seams.has_cls) + S * tokens


# ---------------------------------------------------------------- refusals

def test_pickle_weights_are_refused_and_convert_weights_makes_them_loadable(weights, tmp_path):
    from safetensors.torch import load_file

    src = tmp_path / "pickled"
    src.mkdir()
    (src / "config.json").write_text((weights["vit"] / "config.json").read_text())
    state = load_file(str(weights["vit"] / "model.safetensors"))
    torch.save({"state_dict": state}, src / "pytorch_model.bin")
    with pytest.raises(FoundationLoadError) as err:
        load_encoder(src)
    assert CONVERT_COMMAND in str(err.value) and "\n" not in str(err.value)
    dst = convert_weights(src, tmp_path / "converted")
    loaded = load_encoder(dst).encoder.state_dict()
    reference = load_encoder(weights["vit"]).encoder.state_dict()
    assert loaded.keys() == reference.keys()
    for k in reference:
        torch.testing.assert_close(loaded[k], reference[k], rtol=0, atol=0)


@pytest.mark.parametrize("change,expected", [
    ({"num_hidden_layers": 3}, "missing"),
    ({"num_hidden_layers": 1}, "unexpected"),
    ({"intermediate_size": 48}, "wrong shape"),
])
def test_a_config_that_does_not_match_the_weights_is_refused(weights, tmp_path, change, expected,
                                                            capfd, caplog):
    """One line: the refusal, and nothing of transformers' own load report (a table that
    reads as "re-initialised") or progress bars."""
    directory = tmp_path / "vit"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes((weights["vit"] / "model.safetensors").read_bytes())
    config = json.loads((weights["vit"] / "config.json").read_text()) | change
    (directory / "config.json").write_text(json.dumps(config))
    capfd.readouterr()
    with pytest.raises(FoundationLoadError, match=expected) as err:
        load_encoder(directory)
    assert "\n" not in str(err.value)
    out, errors = capfd.readouterr()
    assert "LOAD REPORT" not in out + errors + caplog.text and "Loading weights" not in errors


def test_monai_weights_that_do_not_match_their_constructor_are_refused(weights, tmp_path):
    directory = tmp_path / "monai"
    directory.mkdir()
    (directory / "model.safetensors").write_bytes(
        (weights["monai_vit"] / "model.safetensors").read_bytes())
    (directory / "config.json").write_text(json.dumps(
        {"model_type": "monai_vit", "constructor": MONAI_TINY | {"mlp_dim": 48}}))
    with pytest.raises(FoundationLoadError, match="wrong shape"):
        load_encoder(directory)


def test_missing_directory_unsupported_class_and_wrong_family_are_refused(weights, tmp_path):
    with pytest.raises(FoundationLoadError, match="does not exist"):
        load_encoder(tmp_path / "nowhere")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FoundationLoadError, match="supported: .*dinov2.*monai_vit"):
        load_encoder(tmp_path / "bert")
    with pytest.raises(FoundationLoadError, match="holds a vit encoder"):
        load_encoder(weights["vit"], expected_family="dinov2")
    with pytest.raises(ValueError, match="weights is required"):
        MODELS.build("foundation", {})
    with pytest.raises(ValueError, match="unknown method"):
        FoundationConfig(weights="dinov2", method="qlora")


# ---------------------------------------------------------------- what trains

NEW = ("patch_embed.", "channel_embed.", "head.")


@pytest.mark.parametrize("family", ["dinov2", "clip", "sam", "monai_vit"])
def test_lora_trains_only_adapters_head_and_channel_embeddings(weights, family):
    model = _build(weights[family], method="lora", lora_rank=2)
    keys = trainable_keys(model)
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    assert all("lora_" in k or k.startswith(NEW) for k in keys), keys
    targets = model.seams.lora_targets
    assert all(any(f".{t}." in k for t in targets) for k in keys if "lora_" in k)
    assert all(any(k.startswith(p) for k in keys) for p in NEW)


def test_other_methods(weights):
    probe = _build(weights["dinov2"], method="linear_probe")
    assert set(trainable_keys(probe)) == {"head.weight", "head.bias"}
    dora = trainable_keys(_build(weights["dinov2"], method="dora"))
    assert any("lora_magnitude_vector" in k for k in dora)
    ia3 = trainable_keys(_build(weights["dinov2"], method="ia3"))
    assert any("ia3_l" in k for k in ia3) and not any("lora" in k for k in ia3)
    full = _build(weights["dinov2"], method="full")
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    assert frozen == {"encoder.embeddings.mask_token",
                      "encoder.embeddings.patch_embeddings.projection.weight",
                      "encoder.embeddings.patch_embeddings.projection.bias"}


def test_frozen_digest_is_stable_and_sees_every_frozen_weight(weights):
    a, b = _build(weights["dinov2"]), _build(weights["dinov2"])
    assert frozen_digest(a) == frozen_digest(b)
    digest = frozen_digest(a)
    # a training step moves trainable weights only: the digest stays
    _randomise_trainable(a)
    batch = _batch()
    optimizer = torch.optim.SGD([p for p in a.parameters() if p.requires_grad], lr=0.1)
    nn.functional.cross_entropy(a(batch["image"], batch["present"]), batch["label"]).backward()
    optimizer.step()
    assert frozen_digest(a) == digest
    params = dict(a.named_parameters())
    base = "encoder.encoder.layer.1.attention.q_proj.base_layer.weight"   # under a LoRA adapter
    assert base in frozen_keys(a)
    with torch.no_grad():                      # one frozen base weight, one value
        params[base][0, 0] += 1e-3
    assert frozen_digest(a) != digest


# ---------------------------------------------------------------- DP-SGD

def _summed_loss(model, task, batch):
    out = task.step(model, batch)
    return out.loss * out.n


def looped_per_sample(model: nn.Module, loss, batch: dict, n: int, views: int = 1
                      ) -> tuple[list, torch.Tensor]:
    """The reference: one backward pass of ``loss(batch_i)`` per sample (``views``: sample i
    is rows ``i*views .. (i+1)*views-1``); each sample's gradients (name -> tensor, trainable
    parameters) and their norms ``[n]``."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    individual = []
    for i in range(n):
        model.zero_grad(set_to_none=True)
        loss({k: v[i * views:(i + 1) * views] for k, v in batch.items()}).backward()
        individual.append({name: p.grad.clone() for name, p in params.items()})
    model.zero_grad(set_to_none=True)
    return individual, torch.stack([torch.sqrt(sum(g.square().sum() for g in grads.values()))
                                    for grads in individual])


def assert_clipped_sum(model: nn.Module, loss, batch: dict, individual: list,
                       norms: torch.Tensor, bound: float, atol: float, views: int = 1) -> None:
    """The clipper at bound C on ``loss(batch)``: its norms are the reference ``norms`` and its
    clipped sum is ``sum_i min(1, C / ||g_i||) g_i`` of the reference per-sample gradients
    (``looped_per_sample``), for every trainable parameter and no other."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    clipper = PerSampleClipper(model, max_grad_norm=bound)
    with clipper.capture(views):
        loss(batch).backward()
    grads, got = clipper.clipped_sum()
    torch.testing.assert_close(got, norms, rtol=0, atol=atol)
    assert {id(p) for p in grads} == {id(p) for p in params.values()}
    factors = (bound / (norms + 1e-6)).clamp(max=1.0)
    for name, p in params.items():
        expected = sum(f * g[name] for f, g in zip(factors, individual))
        torch.testing.assert_close(grads[p], expected, rtol=0, atol=atol, msg=name)


def assert_exact_per_sample(model: nn.Module, batch: dict) -> None:
    """Per-sample norms equal one backward pass per sample, and the summed per-sample
    gradients equal the batch gradient, in float64, for every trainable parameter."""
    task = TASKS.build("classification", {})
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    individual, expected_norms = looped_per_sample(
        model, lambda b: _summed_loss(model, task, b), batch, B)
    clipper = PerSampleClipper(model, max_grad_norm=1e12)
    with clipper.capture():
        _summed_loss(model, task, batch).backward()
    grads, norms = clipper.clipped_sum()
    torch.testing.assert_close(norms, expected_norms, rtol=0, atol=ATOL)
    model.zero_grad(set_to_none=True)
    _summed_loss(model, task, batch).backward()
    assert {id(p) for p in grads} == {id(p) for p in params.values()}
    for name, p in params.items():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(grads[p], p.grad, rtol=0, atol=ATOL, msg=name)
        torch.testing.assert_close(grads[p], individual[0][name] + individual[1][name],
                                   rtol=0, atol=ATOL, msg=name)


ADAPTERS = ["lora", "dora", "ia3"]


@pytest.mark.parametrize("method", ADAPTERS)
@pytest.mark.parametrize("family", FAMILIES)     # SAM: also test_foundation_sam.py (padding)
def test_per_sample_gradients_are_exact_for_every_adapter_method(weights, family, method):
    """LoRA's A/B (Linear), DoRA's magnitude vector and IA3's scaling vector (peft's own
    layers, rules in client/privacy/adapter_grads.py): exact per sample on every family."""
    model = _build(weights[family], method=method, lora_rank=2).double().train()
    assert model.dp_unsupported is None
    _randomise_trainable(model)
    vectors = {"lora": "lora_B", "dora": "lora_magnitude_vector", "ia3": "ia3_l"}[method]
    assert any(vectors in n for n, p in model.named_parameters() if p.requires_grad)
    assert_exact_per_sample(model, _batch(dtype=torch.float64))


def views_of(batch: dict, k: int = 2) -> dict:
    """Each sample as ``k`` consecutive rows (augmentation multiplicity): itself, then
    flipped (and, for k = 3, rotated); its other fields repeated."""
    image = batch["image"]
    views = [image, image.flip(-1), image.rot90(1, (-2, -1))][:k]
    return {"image": torch.stack(views, 1).flatten(0, 1)} | {
        n: v.repeat_interleave(k, 0) for n, v in batch.items() if n != "image"}


@pytest.mark.parametrize("family, method", [(f, "lora") for f in FAMILIES]
                         + [(f, m) for f in ("dinov2", "sam") for m in ("dora", "ia3")])
def test_per_sample_gradients_are_exact_over_augmented_views(weights, family, method):
    """Augmentation multiplicity on every family: a sample's gradient is the mean over its
    views' rows (one backward pass of their mean loss), clipped as one (SAM: views, then
    its declared window folds, also for DoRA/IA3's row-wise rules)."""
    model = _build(weights[family], method=method, lora_rank=2).double().train()
    _randomise_trainable(model)
    task = TASKS.build("classification", {})
    rows = views_of(_batch(dtype=torch.float64))

    def loss(b):
        return _summed_loss(model, task, b) / 2
    individual, norms = looped_per_sample(model, loss, rows, B, views=2)
    assert_clipped_sum(model, loss, rows, individual, norms, float(norms.mean()), ATOL, views=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_what_a_family_declares_dp_sgd_covers_is_what_the_clipper_admits(weights, family):
    """The declarations config validation reads (``dp_unsupported``, by method) agree with the
    site's clipper, per method: a declared refusal the clipper would admit, or an admitted
    method the clipper refuses (a run failing at every site in round 1), both fail here."""
    for method in ("lora", "dora", "ia3", "linear_probe", "full"):
        model = _build(weights[family], method=method, lora_rank=2)
        assert (model.dp_unsupported is None) == clipper_admits(model), (family, method)
    assert "method=full" in _build(weights[family], method="full").dp_unsupported


def clipper_admits(model: nn.Module) -> bool:
    """Whether the site's exact per-sample clipper takes every trainable parameter."""
    try:
        PerSampleClipper(model, max_grad_norm=1.0)
    except UnsupportedLayerError:
        return False
    return True


def test_adapter_layouts_without_a_per_sample_rule_are_refused_by_name(weights):
    """peft layouts the rules do not cover (we never build them, a changed recipe might):
    IA3 scaling a feed-forward input (``base(x * l)``), two IA3 adapters on one layer, DoRA
    on a transposed weight - each refused naming the layer, never clipped wrongly."""
    from peft import IA3Config, inject_adapter_in_model

    from models.foundation.lora import target_pattern

    def refused(model, reason):
        with pytest.raises(UnsupportedLayerError, match=reason) as err:
            PerSampleClipper(model, max_grad_norm=1.0)
        assert "_proj.ia3_l (" in str(err.value) or "_proj.lora_magnitude_vector.default (" in str(
            err.value)

    base = _build(weights["dinov2"], method="linear_probe")
    pattern = target_pattern(base.seams.lora_targets)
    refused(inject_adapter_in_model(IA3Config(target_modules=pattern,
                                              feedforward_modules=pattern),
                                    copy.deepcopy(base)), "IA3 scaling a feed-forward input")
    twice = _build(weights["dinov2"], method="ia3")
    twice = inject_adapter_in_model(IA3Config(target_modules=pattern, feedforward_modules=[]),
                                    twice, adapter_name="second")
    twice.requires_grad_(True)      # peft leaves only the newest adapter trainable
    twice.encoder.requires_grad_(False)
    for n, p in twice.named_parameters():
        p.requires_grad_(p.requires_grad or "ia3_l" in n)
    refused(twice, "several adapters")
    dora = _build(weights["dinov2"], method="dora")
    next(m for m in dora.modules() if type(m).__name__ == "DoraLinearLayer").fan_in_fan_out = True
    refused(dora, "fan_in_fan_out")
    quantised = _build(weights["dinov2"], method="dora")      # e.g. a bitsandbytes Linear
    layer = next(m for m in quantised.modules() if hasattr(m, "lora_magnitude_vector"))
    layer.base_layer.__class__ = type("Linear8bit", (nn.Linear,), {})
    refused(quantised, "DoRA over a Linear8bit base")
    off = _build(weights["dinov2"], method="ia3")    # the layer runs, its vector gets nothing
    layer = next(m for m in off.modules() if hasattr(m, "ia3_l"))
    layer.enable_adapters(False)
    layer.ia3_l.requires_grad_(True)                # peft froze it; an optimizer might not
    refused(off, "IA3 disabled")


def test_dora_per_sample_gradients_are_exact_with_biases_and_lora_dropout(tmp_path):
    """The two inputs peft's DoRA forward may get: the base output less its bias (no
    dropout) and, with ``lora_dropout`` while training, none (the rule recomputes the base
    from the dropped-out input). The saved base's projections get non-zero biases (the tiny
    configs' are zero). Dropout draws its mask per pass, so with it the clipper's summed
    per-sample gradients are checked against the batch gradient under the same seed."""
    torch.manual_seed(3)
    base = _hf_model("dinov2")
    with torch.no_grad():
        for name, p in base.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    base.save_pretrained(tmp_path / "dinov2")
    model = _build(tmp_path / "dinov2", method="dora", lora_rank=2).double().train()
    _randomise_trainable(model)
    assert model.encoder.encoder.layer[0].attention.q_proj.base_layer.bias.abs().min() > 0
    assert_exact_per_sample(model, _batch(dtype=torch.float64))

    model = _build(tmp_path / "dinov2", method="dora", lora_rank=2,
                   lora_dropout=0.3).double().train()
    _randomise_trainable(model)
    task, batch = TASKS.build("classification", {}), _batch(dtype=torch.float64)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    clipper = PerSampleClipper(model, max_grad_norm=1e12)
    torch.manual_seed(7)
    with clipper.capture():
        _summed_loss(model, task, batch).backward()
    grads, _ = clipper.clipped_sum()
    torch.manual_seed(7)
    _summed_loss(model, task, batch).backward()
    for name, p in params.items():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(grads[p], p.grad, rtol=0, atol=ATOL, msg=name)


def test_a_family_wide_dp_refusal_wins_over_every_method(weights, monkeypatch):
    """``family_dp_refusal`` (also read by config validation) gives the family's own reason
    before any method's; no shipped family declares one, so this patches one in."""
    from models.foundation.coverage import family_dp_refusal
    from models.foundation.families import FAMILIES as SEAMS

    seams = SEAMS["dinov2"]
    assert family_dp_refusal(seams, "lora") is None
    assert family_dp_refusal(seams, "full") == seams.dp_refused_methods["full"]
    monkeypatch.setattr(seams, "dp_unsupported", "the whole family has no per-sample rule")
    for method in ("lora", "linear_probe", "full"):
        assert family_dp_refusal(seams, method) == "the whole family has no per-sample rule"
        model = _build(weights["dinov2"], method=method, lora_rank=2)
        assert model.dp_unsupported == "the whole family has no per-sample rule", method


def test_per_group_clipping_finds_the_class_head_of_every_familys_lora_model(weights):
    """``privacy.head_clip_share`` splits C between ``model.head`` and the rest: on each
    family's LoRA model the head group is the head's Linear and nothing else (adapters and
    patch embeddings are the other group)."""
    for family, directory in weights.items():
        clipper = PerSampleClipper(_build(directory, method="lora", lora_rank=2),
                                   max_grad_norm=1.0, head_share=0.5)
        grouped = {layer.name: inside for layer, inside in zip(clipper.layers, clipper.in_head)}
        assert [name for name, inside in grouped.items() if inside] == ["head"], family
        assert any("lora_" in name for name in grouped), family


TIMM_REG4 = os.path.join(os.path.dirname(__file__), "..", "fixtures", "timm",
                         "vit_small_reg4_dinov2")        # written by real timm: 4 registers


@pytest.mark.parametrize("family,registers", [("dinov2", 0), ("dinov2_with_registers", 2),
                                              ("dinov3", 2), ("sam", 0), ("monai_vit", 0),
                                              ("timm", 4)])
def test_the_sites_token_cap_counts_the_registers_the_layers_read(weights, family, registers,
                                                                  tmp_path):
    """``client.queries`` bounds the tokens a study the backbone's layers read: CLS + S*N
    patch tokens + the registers a family adds inside ``encode`` (never in its output)."""
    import shutil

    from client.queries import QueryLimits, QueryRefused

    directory, size = weights.get(family), 32
    if family == "timm":
        directory, size = Path(shutil.copytree(TIMM_REG4, tmp_path / "timm")), 28

    def build():
        return _build(directory, image_size=size), None
    model, _ = build()
    assert model.register_tokens == registers
    read = int(model.seams.has_cls) + S * (size // model.patch_size) ** 2 + registers
    QueryLimits(max_study_tokens=read).check_model_size(build)
    with pytest.raises(QueryRefused, match=f"reads {read:,} tokens in one pass over a study"):
        QueryLimits(max_study_tokens=read - 1).check_model_size(build)
