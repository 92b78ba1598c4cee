"""``channel_tokens=fused``: one patch embedding over all channels (the pretrained RGB kernel
inflated by timm's ``in_chans`` rule), one token per location, no channel embedding - its
initialisation, absent channels, DP-SGD's per-sample gradients (float64), export, and the
objectives that can or cannot use it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from client.engine import Engine
from models import MODELS
from models.foundation.config import FoundationConfig
from models.foundation.export import ADAPTATION_CONFIG, FORMAT, export_foundation, load_export
from models.foundation.loading import load_encoder
from models.tasks import build
from models.vit import patchify
from protocol.job import TrainConfig

from .test_foundation import (FAMILIES, _batch, _build, _randomise_trainable, _save,
                              assert_absent_channel_ignored, assert_exact_per_sample)

S, B, P = 4, 2, 8                       # channels, batch, the tiny families' patch size


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    for family in FAMILIES:
        _save(family, root / family)
    return {family: root / family for family in FAMILIES}


def _fused(directory, **options):
    return _build(directory, channel_tokens="fused", **options)


def test_unknown_channel_tokens_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="per_channel, fused"):
        FoundationConfig(weights="w", channel_tokens="stacked")


def test_the_fused_kernel_is_the_pretrained_one_inflated_to_every_channel(weights):
    """A study whose channels all hold the same image x is embedded exactly as the pretrained
    RGB projection embeds the grey picture (x, x, x): each channel's slice is the RGB-mean
    kernel times 3/S."""
    model = _fused(weights["dinov2"]).eval()
    conv = load_encoder(weights["dinov2"]).encoder.embeddings.patch_embeddings.projection
    assert model.channel_embed is None
    assert tuple(model.patch_embed.weight.shape) == (conv.out_channels, S * P * P)
    x = torch.randn(1, 1, 32, 32)
    ours = model.patch_embed(patchify(x.expand(-1, S, -1, -1), P, 2).transpose(1, 2).flatten(2))
    theirs = conv(x.expand(-1, 3, -1, -1)).flatten(2).transpose(1, 2)       # [1, N, D]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def _linear_part(model, images):
    """``embed()`` minus what it adds to every input (bias, positions, CLS): the patch
    tokens' linear response ``[B, N, D]``."""
    n = (images.shape[-1] // P) ** 2
    with torch.no_grad():
        return (model.embed(images) - model.embed(torch.zeros_like(images)))[:, -n:]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fused_embedding_is_a_conv_whose_kernel_is_laid_out_channel_by_channel(weights,
                                                                                    family):
    """``embed()`` itself against ``F.conv2d``: the flatten order of the patches (channel by
    channel, each row-major) must be the kernel layout adaptation.json states
    (``weight.reshape(D, S, p, p)``), channel for channel."""
    model = _fused(weights[family]).eval()
    rgb, _ = model.seams.patch_kernel(model.encoder)         # [D, 3, p, p], exported unused
    d = rgb.shape[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1, 32, 32, generator=g)
    for c in range(S):
        only_c = torch.zeros(B, S, 32, 32)
        only_c[:, c] = x[:, 0]
        # as initialised from the known RGB kernel: channel c alone is the grey picture
        # (x, x, x) through the RGB projection, divided among the S channels
        expected = F.conv2d(x.expand(-1, 3, -1, -1), rgb, stride=P).flatten(2).transpose(1, 2)
        torch.testing.assert_close(_linear_part(model, only_c), expected / S,
                                   rtol=0, atol=1e-5, msg=f"initial kernel, channel {c}")
    # a different kernel per channel: channel c alone is a conv with slice c of the kernel
    kernel = torch.randn(d, S, P, P, generator=g) * 0.1
    with torch.no_grad():
        model.patch_embed.weight.copy_(kernel.reshape(d, -1))
    for c in range(S):
        only_c = torch.zeros(B, S, 32, 32)
        only_c[:, c] = x[:, 0]
        expected = F.conv2d(x, kernel[:, c:c + 1], stride=P).flatten(2).transpose(1, 2)
        torch.testing.assert_close(_linear_part(model, only_c), expected, rtol=0, atol=1e-5,
                                   msg=f"channel {c}")
    images = torch.randn(B, S, 32, 32, generator=g)
    torch.testing.assert_close(_linear_part(model, images),
                               F.conv2d(images, kernel, stride=P).flatten(2).transpose(1, 2),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_token_per_location_and_an_absent_channel_changes_nothing(weights, family):
    model = _fused(weights[family]).eval()
    batch = _batch()                                    # sample 0: channel 2 absent
    logits = model(batch["image"], batch["present"])
    feats = model.forward_features(batch["image"], batch["present"])
    assert feats.shape[:2] == (B, int(model.seams.has_cls) + 16)
    # no attention mask can hide part of a fused token: the absent channel is zeroed before
    # the embedding, whatever the caller left in it
    assert_absent_channel_ignored(model, batch, logits)
    unread = batch["image"].clone()
    unread[0, 2] = float("nan")                         # never read, so never spreads
    torch.testing.assert_close(model(unread, batch["present"]), logits, rtol=0, atol=1e-5)


def test_full_modality_masking_zeroes_the_dropped_channel(weights):
    """Training with modality_dropout=1: one present channel of every sample with >= 2 is
    dropped; a fused model must then not see that channel's content at all."""
    model = _fused(weights["dinov2"], modality_dropout=1.0).train()
    batch = _batch()
    seen = []
    model.patch_embed.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    torch.manual_seed(0)
    model(batch["image"], batch["present"])
    rows = seen[0].reshape(B, 16, S, P * P)             # [B, N, S, p*p]
    zero = (rows == 0).all(dim=(1, 3))                  # [B, S] channel all zero
    absent = ~batch["present"]
    assert (zero & ~absent).sum(1).tolist() == [1, 1]  # exactly one dropped per sample
    assert zero[absent].all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "linear_probe"])
def test_per_sample_gradients_are_exact_for_the_fused_embedding(weights, family, method):
    model = _fused(weights[family], method=method, lora_rank=2).double().train()
    assert model.dp_unsupported is None
    _randomise_trainable(model)
    assert_exact_per_sample(model, _batch(dtype=torch.float64))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert ({"patch_embed.weight", "patch_embed.bias"} <= trainable) == (method == "lora")


def test_the_export_describes_the_fused_kernel_and_reloads_it(weights, tmp_path):
    model = _fused(weights["dinov2"], lora_rank=2)
    _randomise_trainable(model, seed=3)
    model.eval()
    out = export_foundation(model, tmp_path / "export")
    meta = json.loads((out / ADAPTATION_CONFIG).read_text())
    assert meta["config"]["channel_tokens"] == "fused"
    assert set(meta["parts"]) == {"patch_embed", "head"}
    batch = _batch()
    again = load_export(out)
    torch.testing.assert_close(again(batch["image"], batch["present"]),
                               model(batch["image"], batch["present"]), rtol=0, atol=1e-5)
    # what adaptation.json says: the Linear is a Conv over [S, p, p] with stride p
    d = model.patch_embed.out_features
    assert f"[{d}, {S}, {P}, {P}]" in meta["parts"]["patch_embed"]
    conv = F.conv2d(batch["image"], model.patch_embed.weight.reshape(d, S, P, P),
                    model.patch_embed.bias, stride=P).flatten(2).transpose(1, 2)
    linear = model.patch_embed(patchify(batch["image"], P, 2).transpose(1, 2).flatten(2))
    torch.testing.assert_close(conv, linear, rtol=0, atol=1e-5)
    # session 20 wrote fused exports under the version-1 format name: read as written
    (out / ADAPTATION_CONFIG).write_text(json.dumps(meta | {"format": FORMAT}))
    assert load_export(out).fused


def test_mm_dino_runs_on_fused_tokens_and_mae_is_refused(weights):
    root = weights["dinov2"].parent
    options = {"weights": "dinov2", "num_channels": S, "image_size": 32, "lora_rank": 2,
               "channel_tokens": "fused"}
    model, task = build("foundation", options, "mm_dino", {"local_crops": 1},
                        foundation_dir=root)
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.randn(S, 32, 32, generator=g), "present": torch.ones(S).bool(),
             "label": torch.tensor(i % 3)} for i in range(4)]
    data[0]["present"][2] = False
    metrics = Engine(task, torch.device("cpu")).fit(
        model, data, TrainConfig(local_epochs=1, batch_size=2, lr=1e-2))
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    with pytest.raises(ValueError, match="channel_tokens=per_channel") as err:
        build("foundation", options, "mae", {}, foundation_dir=root)
    assert "\n" not in str(err.value)
    assert MODELS.config("foundation", options).channel_tokens == "fused"


def test_fused_tokens_on_a_3d_monai_vit_with_an_absent_channel(tmp_path):
    """Volumes: 3 channels on a 32^3 cube, patch 8 (the pretrained 4^3 kernel resized), one
    token per 8^3 location; an absent channel changes nothing; per-sample gradients exact."""
    from models.foundation.monai_nets import save_monai

    from .test_foundation_monai import VIT3D, _build as _build3d, _vit, _volumes

    save_monai(_vit(VIT3D), VIT3D, tmp_path / "vit3d")
    model = _build3d(tmp_path / "vit3d", num_channels=3, image_size=32, patch_size=8,
                     channel_tokens="fused", lora_rank=2).eval()
    present = torch.ones(B, 3, dtype=torch.bool)
    present[0, 1] = False
    x = _volumes(3, 32)
    with torch.no_grad():
        assert model.forward_features(x, present).shape == (B, 64, 32)
        logits = model(x, present)
        garbage = x.clone()
        garbage[0, 1] = torch.randn(32, 32, 32) * 10
        torch.testing.assert_close(model(garbage, present), logits, rtol=0, atol=1e-5)
    model = model.double().train()
    _randomise_trainable(model)
    batch = {"image": _volumes(3, 32, dtype=torch.float64) * present[..., None, None, None],
             "present": present, "label": torch.tensor([0, 2])}
    assert_exact_per_sample(model, batch)


# ---------------------------------------------------------------- presence embedding (option)

def test_presence_embedding_is_off_by_default_and_only_for_fused_tokens(weights):
    assert FoundationConfig(weights="w").presence_embedding is False
    with pytest.raises(ValueError, match="presence_embedding needs channel_tokens=fused"):
        FoundationConfig(weights="w", presence_embedding=True)
    model = _fused(weights["dinov2"])
    assert model.presence_embed is None           # default: the state is what it was
    assert not any(k.startswith("presence_embed") for k in model.state_dict())
    for wrong in ("false", "no", 1):              # a string would be truthy: switched on
        with pytest.raises(ValueError, match="presence_embedding must be true or false"):
            FoundationConfig(weights="w", channel_tokens="fused", presence_embedding=wrong)
    with pytest.raises(ValueError, match="linear_probe trains the head only"):
        FoundationConfig(weights="w", channel_tokens="fused", presence_embedding=True,
                         method="linear_probe")


def test_the_presence_embedding_leaves_the_other_layers_init_alone(weights):
    """Same seed, option on or off: every other weight (the head, built after it) starts
    the same - the option's own layer draws nothing from the RNG."""
    torch.manual_seed(0)
    off = _fused(weights["dinov2"]).state_dict()
    torch.manual_seed(0)
    on = _fused(weights["dinov2"], presence_embedding=True).state_dict()
    assert set(on) - set(off) == {"presence_embed.embed.weight"}
    for key, value in off.items():
        torch.testing.assert_close(on[key], value, rtol=0, atol=0, msg=key)


def _absent_or_black(model, batch):
    """Logits of sample 0 with channel 2 absent, and with channel 2 present but all zero."""
    black = batch["present"].clone()
    black[0, 2] = True
    with torch.no_grad():
        return (model(batch["image"], batch["present"])[0],
                model(batch["image"], black)[0])


@pytest.mark.parametrize("family", ["dinov2", "siglip", "monai_vit"])
def test_presence_embedding_tells_an_absent_channel_from_a_black_one(weights, family):
    batch = _batch()                                      # sample 0: channel 2 absent, zeroed
    plain = _fused(weights[family]).eval()
    absent, black = _absent_or_black(plain, batch)
    torch.testing.assert_close(absent, black, rtol=0, atol=1e-6)   # the gap it closes
    model = _fused(weights[family], presence_embedding=True).eval()
    assert model.load_state_dict(plain.state_dict(), strict=False).missing_keys == \
        ["presence_embed.embed.weight"]
    # zero at the start: exactly the model without it
    with torch.no_grad():
        torch.testing.assert_close(model(batch["image"], batch["present"]),
                                   plain(batch["image"], batch["present"]), rtol=0, atol=1e-6)
    with torch.no_grad():
        model.presence_embed.embed.weight.normal_(std=0.5, generator=torch.Generator()
                                                  .manual_seed(1))
    absent, black = _absent_or_black(model, batch)
    assert (absent - black).abs().max() > 1e-3
    # what an absent channel holds still changes nothing
    with torch.no_grad():
        assert_absent_channel_ignored(model, batch, model(batch["image"], batch["present"]))


@pytest.mark.parametrize("family", ["dinov2", "siglip", "sam", "monai_vit"])
def test_per_sample_gradients_are_exact_with_the_presence_embedding(weights, family):
    model = _fused(weights[family], presence_embedding=True, lora_rank=2).double().train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "presence_embed.embed.weight" in trainable
    _randomise_trainable(model)
    assert_exact_per_sample(model, _batch(dtype=torch.float64))


def test_the_presence_embedding_is_exported_and_reloaded(weights, tmp_path):
    model = _fused(weights["dinov2"], presence_embedding=True, lora_rank=2)
    _randomise_trainable(model, seed=3)
    model.eval()
    out = export_foundation(model, tmp_path / "export")
    meta = json.loads((out / ADAPTATION_CONFIG).read_text())
    assert meta["config"]["presence_embedding"] is True
    assert set(meta["parts"]) == {"patch_embed", "presence_embed.embed", "head"}
    again = load_export(out)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(batch["image"], batch["present"]),
                                   model(batch["image"], batch["present"]), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- patch_init=channels
def _save_four_channel_dinov2(directory):
    """A Dinov2 pretrained on the layout's own S channels (``num_channels=S``)."""
    import transformers

    from .test_foundation import TINY

    torch.manual_seed(5)
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY, mlp_ratio=2, num_channels=S)
                             ).save_pretrained(directory)
    return directory


def test_patch_init_channels_keeps_the_encoders_own_kernel_slice_by_channel(tmp_path):
    """An encoder pretrained on these S channels: fused tokens embed a study exactly as its
    own [D, S, p, p] projection does (each channel its own slice, not the colours' mean)."""
    directory = _save_four_channel_dinov2(tmp_path / "dinov2-4ch")
    conv = load_encoder(directory).encoder.embeddings.patch_embeddings.projection
    assert conv.in_channels == S
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, S, 32, 32, generator=g)
    theirs = conv(x).flatten(2).transpose(1, 2) - conv.bias                  # [B, N, D]
    torch.testing.assert_close(_linear_part(_fused(directory, patch_init="channels").eval(), x),
                               theirs, rtol=0, atol=1e-5)
    # the default rule (the colours' mean for every channel) is another embedding
    mean = _linear_part(_fused(directory).eval(), x)
    assert (mean - theirs).abs().max() > 1e-2


def test_patch_init_channels_gives_each_per_channel_token_its_own_slice(tmp_path):
    directory = _save_four_channel_dinov2(tmp_path / "dinov2-4ch")
    kernel = load_encoder(directory).encoder.embeddings.patch_embeddings.projection.weight
    model = _build(directory, patch_init="channels")
    for c in range(S):
        torch.testing.assert_close(model.patch_embed[c].weight.detach(),
                                   kernel[:, c].reshape(kernel.shape[0], -1), rtol=0, atol=0)
    assert not torch.equal(model.patch_embed[0].weight, model.patch_embed[1].weight)


def test_patch_init_channels_refuses_an_encoder_of_another_channel_count(weights):
    with pytest.raises(ValueError, match="pretrained on 3 input channels and the layout has 4"):
        _fused(weights["dinov2"], patch_init="channels")


def test_unknown_patch_init_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="mean, channels"):
        FoundationConfig(weights="w", patch_init="rgb")


def test_a_model_started_from_its_own_channels_exports_and_loads_back_the_same(tmp_path):
    directory = _save_four_channel_dinov2(tmp_path / "dinov2-4ch")
    model = _fused(directory, patch_init="channels", method="lora")
    _randomise_trainable(model)
    out = export_foundation(model.eval(), tmp_path / "export")
    assert json.loads((out / ADAPTATION_CONFIG).read_text())["config"]["patch_init"] == "channels"
    again = load_export(out)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(batch["image"], batch["present"]),
                                   model(batch["image"], batch["present"]), rtol=0, atol=1e-5)
