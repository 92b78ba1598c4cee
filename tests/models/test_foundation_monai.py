"""MONAI networks as foundation encoders: ViT in 2D and 3D from our directory layout and from a
MONAI bundle (configs/inference.json's network_def, nothing evaluated), SwinUNETR checked but
not yet a backbone, every bad directory refused with one line; LoRA + exact per-sample
gradients on a 3D ViT; the export loadable by MONAI's own class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR, ViT
from safetensors.torch import load_file, save_file
from torch import nn

from models import MODELS
from models.foundation.bundle import is_bundle
from models.foundation.convert import convert_weights
from models.foundation.export import ENCODER_DIR, export_foundation, load_export
from models.foundation.loading import (CONVERT_COMMAND, FoundationLoadError,
                                       load_encoder, read_config)
from models.foundation.lora import trainable_keys
from models.foundation.monai_nets import (SWIN_UNETR_TYPE, MonaiViTSeams, load_network,
                                          save_monai)
from models.serving import servable

from .test_foundation import assert_exact_per_sample

VIT3D = dict(in_channels=1, img_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_layers=2,
             num_heads=2, spatial_dims=3, qkv_bias=True)
VIT2D = dict(in_channels=3, img_size=32, patch_size=8, hidden_size=32, mlp_dim=64, num_layers=2,
             num_heads=2, spatial_dims=2, classification=True, qkv_bias=True)
SWIN = dict(in_channels=1, out_channels=2, feature_size=12, depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2], window_size=4, spatial_dims=2)     # 2D: a cheap forward
B = 2
ATOL = 1e-10


def _vit(args: dict, seed: int = 0) -> ViT:
    torch.manual_seed(seed)
    vit = ViT(**args)
    with torch.no_grad():                # MONAI inits positions tiny: make them matter
        vit.patch_embedding.position_embeddings.normal_(std=0.1)
    return vit.eval()


def _bundle(directory: Path, network_def: dict, state: dict | None, **top) -> Path:
    """A MONAI bundle as MONAI lays it out, with the expressions real bundles carry next to
    network_def. Evaluating ``device`` (as MONAI's ``ConfigParser`` does for a network_def
    that references ``@device``) leaves a marker file ``RAN``."""
    (directory / "configs").mkdir(parents=True)
    (directory / "scripts").mkdir()
    (directory / "scripts" / "__init__.py").write_text("raise SystemExit('bundle code ran')\n")
    (directory / "configs" / "metadata.json").write_text(json.dumps(
        {"version": "0.1.0", "monai_version": "1.6.1", "network_data_format": {}}))
    marker = str(directory / "RAN")
    inference = {"imports": ["$import scripts"],
                 "device": f"$open({marker!r}, 'w').write('x') and torch.device('cpu')",
                 "network": "$@network_def.to(@device)", "network_def": network_def} | top
    (directory / "configs" / "inference.json").write_text(json.dumps(inference))
    if state is not None:
        (directory / "models").mkdir()
        save_file({k: v.contiguous() for k, v in state.items()},
                  str(directory / "models" / "model.safetensors"))
    return directory


def _vit_bundle(directory: Path, vit: ViT, **changes) -> Path:
    network_def = {"_target_": "monai.networks.nets.ViT", "in_channels": "@in_channels"} | {
        k: v for k, v in VIT3D.items() if k != "in_channels"} | changes
    return _bundle(directory, network_def, vit.state_dict(), in_channels=1)


def _build(directory: Path, **options):
    options = {"weights": directory.name, "num_channels": 1, "image_size": 16,
               "spatial_dims": 3} | options
    return MODELS.build("foundation", options, foundation_dir=directory.parent)


def _volumes(s: int = 1, size: int = 16, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, s, size, size, size, generator=g, dtype=dtype)


# ---------------------------------------------------------------- loading, unadapted forward

def test_a_3d_vit_directory_unadapted_gives_monai_own_features(tmp_path):
    vit = _vit(VIT3D)
    save_monai(vit, VIT3D, tmp_path / "vit3d")
    model = _build(tmp_path / "vit3d").eval()
    x = _volumes()
    with torch.no_grad():
        ours = model.forward_features(x, torch.ones(B, 1, dtype=torch.bool))
        torch.testing.assert_close(ours, vit(x)[0], rtol=0, atol=1e-5)
    assert model.layout.spatial_dims == 3 and model.input_shape == (1, 16, 16, 16)


def test_a_2d_vit_with_cls_unadapted_gives_monai_own_hidden_states(tmp_path):
    """3 identical channels of a grey image: the per-channel kernels (mean over RGB) sum to
    the RGB kernel applied to that image; with a CLS (classification=True) MONAI's normed
    last hidden states are ours."""
    args = VIT2D | {"in_channels": 1}
    vit = _vit(args, seed=1)
    save_monai(vit, args, tmp_path / "vit2d")
    model = _build(tmp_path / "vit2d", image_size=32, spatial_dims=2).eval()
    x = torch.randn(B, 1, 32, 32)
    with torch.no_grad():
        ours = model.forward_features(x, torch.ones(B, 1, dtype=torch.bool))
        theirs = vit.norm(vit(x)[1][-1])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_bundle_loads_from_network_def_without_running_anything(tmp_path):
    vit = _vit(VIT3D, seed=2)
    directory = _vit_bundle(tmp_path / "spleen_vit", vit)
    assert is_bundle(directory)
    config = read_config(directory)
    assert config["model_type"] == "monai_vit" and config["constructor"]["in_channels"] == 1
    model = _build(directory).eval()
    x = _volumes(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x, torch.ones(B, 1, dtype=torch.bool)),
                                   vit(x)[0], rtol=0, atol=1e-5)


def test_multi_channel_3d_with_another_grid_and_an_absent_channel(tmp_path):
    """3 channels (ct_volume's windows) on a 32^3 cube with patch 8: positions resampled from
    the pretrained 4^3 grid, kernel resized 4^3 -> 8^3, an absent channel masked out."""
    save_monai(_vit(VIT3D), VIT3D, tmp_path / "vit3d")
    model = _build(tmp_path / "vit3d", num_channels=3, image_size=32, patch_size=8).eval()
    present = torch.ones(B, 3, dtype=torch.bool)
    present[0, 1] = False
    x = _volumes(3, 32) * present[..., None, None, None]
    with torch.no_grad():
        logits = model(x, present)
        assert model.forward_features(x, present).shape == (B, 3 * 64, 32)
        garbage = x.clone()
        garbage[0, 1] = torch.randn(32, 32, 32) * 10
        torch.testing.assert_close(model(garbage, present), logits, rtol=0, atol=1e-5)
        changed = x.clone()
        changed[0, 2] += 1
        assert not torch.allclose(model(changed, present)[0], logits[0], atol=1e-4)


def test_perceptron_patch_embedding_is_read_as_the_equivalent_kernel():
    vit = _vit(VIT3D | {"proj_type": "perceptron", "in_channels": 2})
    seams = MonaiViTSeams(VIT3D | {"proj_type": "perceptron", "in_channels": 2})
    weight, bias = seams.patch_kernel(vit)
    x = _volumes(2)
    conv = nn.functional.conv3d(x, weight, bias, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(conv, vit.patch_embedding.patch_embeddings(x),
                               rtol=0, atol=1e-5)


# ---------------------------------------------------------------- refusals, one line each

@pytest.mark.parametrize("change,expected", [
    ({"hidden_size": "$16 * 2"}, "MONAI expression"),
    ({"num_heads": "%configs/common.json#heads"}, "expression or macro"),
    ({"in_channels": "@nowhere"}, "not a top-level key"),
    ({"in_channels": "@device"}, "does not name a plain value"),
    ({"in_channels": "@net::in_channels"}, "only plain '@name'"),
    ({"_target_": "monai.networks.nets.UNet"}, "not an allow-listed"),
    ({"_target_": "os.system"}, "not an allow-listed"),
    ({"_target_": "evil.nets.ViT"}, "not an allow-listed"),
    ({"_requires_": "$print(1)"}, "directive"),
    ({"post_activation": {"_target_": "torch.nn.Tanh"}}, "nested objects"),
    ({"norm_layer": "LayerNorm"}, "unknown MONAI ViT argument"),
    ({"hidden_size": 48}, "wrong shape"),
    ({"num_layers": 3}, "missing"),
    ({"num_layers": 1}, "unexpected"),
    ({"num_heads": 5}, "MONAI refuses ViT"),
])
def test_a_bad_bundle_is_refused_with_one_line(tmp_path, change, expected):
    directory = _vit_bundle(tmp_path / "bad", _vit(VIT3D), **change)
    with pytest.raises(FoundationLoadError, match=expected) as err:
        load_encoder(directory)
    assert "\n" not in str(err.value)
    assert not (directory / "RAN").exists()


def test_a_pickled_bundle_is_refused_and_convert_weights_makes_it_loadable(tmp_path):
    vit = _vit(VIT3D, seed=3)
    src = _vit_bundle(tmp_path / "pickled", vit)
    (src / "models" / "model.safetensors").unlink()
    torch.save(vit.state_dict(), src / "models" / "model.pt")
    with pytest.raises(FoundationLoadError) as err:
        load_encoder(src)
    assert CONVERT_COMMAND in str(err.value) and "model.pt" in str(err.value)
    assert "\n" not in str(err.value)
    dst = convert_weights(src, tmp_path / "converted")
    assert is_bundle(dst) and not (dst / "scripts").exists()      # configs only, no code
    loaded = load_encoder(dst).encoder.state_dict()
    for k, v in vit.state_dict().items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    # a bundle the loader could not read is refused before anything is written
    bad = _vit_bundle(tmp_path / "bad", vit, _target_="UNet")
    torch.save(vit.state_dict(), bad / "models" / "model.pt")
    with pytest.raises(FoundationLoadError, match="allow-listed"):
        convert_weights(bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_a_2d_layout_on_a_3d_encoder_and_the_reverse_are_refused(tmp_path):
    save_monai(_vit(VIT3D), VIT3D, tmp_path / "vit3d")
    with pytest.raises(ValueError, match="3D but the layout gives 2D"):
        _build(tmp_path / "vit3d", spatial_dims=2)
    save_monai(_vit(VIT2D), VIT2D, tmp_path / "vit2d")
    with pytest.raises(ValueError, match="needs a MONAI ViT built with spatial_dims=3"):
        _build(tmp_path / "vit2d", image_size=32)


# ---------------------------------------------------------------- SwinUNETR

def test_swin_unetr_loads_strictly_and_is_refused_as_a_token_encoder(tmp_path):
    torch.manual_seed(0)
    swin = SwinUNETR(**SWIN).eval()
    save_monai(swin, SWIN, tmp_path / "swin", model_type=SWIN_UNETR_TYPE)
    bundle = _bundle(tmp_path / "swin_bundle", {"_target_": "SwinUNETR", "img_size": 32} | SWIN,
                     swin.state_dict())
    for directory in (tmp_path / "swin", bundle):
        assert read_config(directory)["model_type"] == SWIN_UNETR_TYPE
        with pytest.raises(FoundationLoadError, match="model=foundation_swin") as err:
            load_encoder(directory)
        assert "\n" not in str(err.value)
    loaded = load_network(tmp_path / "swin", SWIN_UNETR_TYPE, SWIN,
                          [tmp_path / "swin" / "model.safetensors"])
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), swin(x), rtol=0, atol=0)
    with pytest.raises(FoundationLoadError, match="wrong shape"):
        load_network(tmp_path / "swin", SWIN_UNETR_TYPE, SWIN | {"feature_size": 24},
                     [tmp_path / "swin" / "model.safetensors"])


def _swin_segmenter(tmp_path, swin_args=SWIN, **options):
    from models.tasks import build

    torch.manual_seed(0)
    swin = SwinUNETR(**swin_args).eval()
    save_monai(swin, swin_args, tmp_path / "swin", model_type=SWIN_UNETR_TYPE)
    options = {"weights": "swin", "num_channels": 4, "image_size": 64} | options
    model, task = build("foundation_swin", options, "segmentation", {}, foundation_dir=tmp_path)
    return swin, model, task


def test_swin_unetr_is_the_segmentation_network_with_lora_on_its_attention(tmp_path):
    from models.foundation import dp_refusal, site_owned_base
    from models.foundation.swin import SwinSegmenter

    swin, model, task = _swin_segmenter(tmp_path, lora_rank=2)
    assert isinstance(model, SwinSegmenter) and site_owned_base(model)
    assert dp_refusal(model) is None               # DP-SGD covers the LoRA fine-tune
    keys = trainable_keys(model)
    lora = {k for k in keys if "lora_" in k}
    assert lora and all(".attn.qkv." in k or ".attn.proj." in k for k in lora)
    swin_trainable = {k for k in keys if k.startswith("net.swinViT.")} - lora
    assert swin_trainable == {"net.swinViT.patch_embed.proj.weight",
                              "net.swinViT.patch_embed.proj.bias"}   # widened to 4 channels
    assert any(k.startswith("net.decoder1.") for k in keys) and "net.out.conv.conv.weight" in keys
    # what travels is the trainable state: no frozen weight, no integer buffer
    travels = set(model.state_dict()) - {n for n, p in model.named_parameters()
                                         if not p.requires_grad}
    assert travels == set(keys)
    # the pretrained encoder is frozen (kept at the site), the decoder is not
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "net.swinViT.layers1.0.blocks.0.attn.qkv.base_layer.weight" in frozen
    # equal channels reproduce the pretrained network's (1-channel) features at the start:
    # compare the first decoder output, before the (kept, 2-class) output block
    grey = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ours = model.net.encoder1(grey.expand(-1, 4, -1, -1))
        torch.testing.assert_close(ours, swin.encoder1(grey), rtol=0, atol=1e-5)
        ours = model.net.swinViT(grey.expand(-1, 4, -1, -1))[-1]
        torch.testing.assert_close(ours, swin.swinViT(grey)[-1], rtol=0, atol=1e-5)
    present = torch.ones(2, 4, dtype=torch.bool)
    batch = {"image": torch.randn(2, 4, 64, 64), "present": present,
             "mask": (torch.rand(2, 64, 64) > 0.9).long(), "has_mask": torch.tensor([1, 1])}
    assert model(batch["image"], present).shape == (2, 2, 64, 64)
    out = task.step(model, batch)
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_the_swin_export_is_a_state_dict_monai_swin_unetr_loads(tmp_path):
    from models.foundation.swin import export_swin, load_swin

    _, model, _ = _swin_segmenter(tmp_path, lora_rank=2)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    out = export_swin(model, tmp_path / "export")
    constructor = json.loads((out / "config.json").read_text())["constructor"]
    assert constructor["in_channels"] == 4 and constructor["out_channels"] == 2
    plain = SwinUNETR(**constructor)
    plain.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
    x = torch.randn(2, 4, 64, 64)
    with torch.no_grad():
        expected = model(x, torch.ones(2, 4, dtype=torch.bool))
        torch.testing.assert_close(plain.eval()(x), expected, rtol=0, atol=1e-5)
        reloaded, _ = load_swin(out)
        torch.testing.assert_close(reloaded(x), expected, rtol=0, atol=1e-5)


def test_a_swin_unetr_with_other_classes_gets_a_fresh_two_class_output(tmp_path):
    swin, model, _ = _swin_segmenter(tmp_path, SWIN | {"out_channels": 5})
    assert model.net.out.conv.conv.out_channels == 2 and swin.out.conv.conv.out_channels == 5
    assert model(torch.randn(1, 4, 64, 64), torch.ones(1, 4, dtype=torch.bool)).shape == \
        (1, 2, 64, 64)


def test_swin_unetr_refusals(tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        _swin_segmenter(tmp_path, image_size=48)
    with pytest.raises(ValueError, match="at least 64"):
        _swin_segmenter(tmp_path / "a", image_size=32)
    with pytest.raises(ValueError, match="2D but the layout gives 3D"):
        _swin_segmenter(tmp_path / "b", spatial_dims=3, image_size=64)
    save_monai(_vit(VIT2D), VIT2D, tmp_path / "vit2d")
    with pytest.raises(FoundationLoadError, match="needs a MONAI SwinUNETR"):
        MODELS.build("foundation_swin", {"weights": "vit2d"}, foundation_dir=tmp_path)


# ---------------------------------------------------------------- LoRA and DP-SGD

def test_lora_on_the_3d_vit_targets_qkv_and_out_proj(tmp_path):
    save_monai(_vit(VIT3D), VIT3D, tmp_path / "vit3d")
    model = _build(tmp_path / "vit3d", lora_rank=2, lora_targets=("qkv", "out_proj"))
    keys = trainable_keys(model)
    lora = [k for k in keys if "lora_" in k]
    assert {k.split(".")[4] for k in lora} == {"qkv", "out_proj"}    # encoder.blocks.i.attn.X
    assert all("lora_" in k or k.split(".")[0] in ("patch_embed", "channel_embed", "head")
               for k in keys), keys


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_per_sample_gradients_are_exact_for_adapters_on_a_3d_vit(tmp_path, method):
    """DP-SGD's per-sample rule on MONAI's own SABlock attention (not nn.MultiheadAttention):
    summed per-sample gradients equal the batch gradient, norms equal one backward per
    sample, float64, with only adapters + new parts + head trainable."""
    save_monai(_vit(VIT3D | {"classification": True}), VIT3D | {"classification": True},
               tmp_path / "vit3d")
    model = _build(tmp_path / "vit3d", num_channels=2, lora_rank=2, method=method,
                   lora_targets=("qkv", "out_proj")).double().train()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    present = torch.tensor([[True, False], [True, True]])
    batch = {"image": _volumes(2, dtype=torch.float64) * present[..., None, None, None],
             "present": present, "label": torch.tensor([0, 2])}
    assert_exact_per_sample(model, batch)


# ---------------------------------------------------------------- weights out

def test_the_export_is_a_monai_state_dict_monai_vit_loads(tmp_path):
    directory = _vit_bundle(tmp_path / "bundle_vit", _vit(VIT3D, seed=4))
    model = _build(directory, num_channels=2, lora_rank=2).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    out = export_foundation(model, tmp_path / "export")
    config = json.loads((out / ENCODER_DIR / "config.json").read_text())
    assert config["model_type"] == "monai_vit" and config["constructor"]["spatial_dims"] == 3
    plain = ViT(**config["constructor"])
    plain.load_state_dict(load_file(str(out / ENCODER_DIR / "model.safetensors")), strict=True)
    plain.eval()
    x = _volumes(1, seed=6)
    with torch.no_grad():       # merged LoRA in MONAI's own class = the adapted encoder
        expected = model.encoder(x)[0]
        torch.testing.assert_close(plain(x)[0], expected, rtol=0, atol=1e-5)
        base = load_encoder(directory).encoder
        assert (base(x)[0] - expected).abs().max() > 1e-3       # the adapters did change it
        present = torch.tensor([[True, False], [True, True]])
        volumes = _volumes(2, seed=7) * present[..., None, None, None]
        torch.testing.assert_close(load_export(out)(volumes, present), model(volumes, present),
                                   rtol=0, atol=1e-5)
        served = servable(load_export(out))        # what a registered version holds
        assert served.input_shape == (2, 16, 16, 16)
        torch.testing.assert_close(served(volumes), model(volumes, present).softmax(-1),
                                   rtol=0, atol=1e-5)


def test_a_yaml_bundle_loads_and_a_bundle_without_network_def_is_refused(tmp_path):
    import yaml

    vit = _vit(VIT3D, seed=8)
    directory = _vit_bundle(tmp_path / "yaml_vit", vit)
    inference = json.loads((directory / "configs" / "inference.json").read_text())
    (directory / "configs" / "inference.json").unlink()
    (directory / "configs" / "inference.yaml").write_text(yaml.safe_dump(inference))
    loaded = load_encoder(directory).encoder.state_dict()
    for k, v in vit.state_dict().items():
        torch.testing.assert_close(loaded[k], v, rtol=0, atol=0)
    (directory / "configs" / "inference.yaml").write_text("!!python/object/apply:os.system ['x']")
    with pytest.raises(FoundationLoadError, match="not valid YAML") as err:
        load_encoder(directory)
    assert "\n" not in str(err.value)
    (directory / "configs" / "inference.yaml").unlink()
    with pytest.raises(FoundationLoadError, match="has no network_def"):
        load_encoder(directory)          # metadata.json alone marks a bundle, holds no network


def test_ct_volume_layout_takes_a_3d_bundle_and_refuses_a_2d_encoder_at_config_load(tmp_path):
    from server.config import load_experiment
    from server.config.schema import ConfigError

    encoders = tmp_path / "encoders"
    _vit_bundle(encoders / "ct-vit", _vit(VIT3D))
    save_monai(_vit(VIT2D), VIT2D, encoders / "vit2d")
    common = ["experiment=ct3", "model=foundation", "~model.options.input_center",
              f"model.foundation_dir={encoders}", f"runs_dir={tmp_path / 'runs'}"]
    cfg = load_experiment(common + ["model.options.weights=ct-vit"])
    options = cfg.job_spec().model_options
    assert options["spatial_dims"] == 3 and options["num_channels"] == 3
    with pytest.raises(ConfigError, match="is a 2D encoder but the inputs are 3D") as err:
        load_experiment(common + ["model.options.weights=vit2d"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,expected", [
    (["privacy=dpsgd", "model.options.method=full"], "dp-sgd refused .*use method=lora"),
    (["privacy=dpsgd", "model.options.weights=swin_bn"], "dp-sgd refused .*'batch'"),
    (["task=glioma3"], "task=lesion_seg"),
    (["model=foundation"], "use model=foundation_swin"),
    (["model.options.weights=vit2d"], "needs a MONAI SwinUNETR"),
])
def test_foundation_swin_config_refusals_are_one_line(tmp_path, overrides, expected):
    from server.config import load_experiment
    from server.config.schema import ConfigError

    torch.manual_seed(0)
    save_monai(SwinUNETR(**SWIN), SWIN, tmp_path / "swin", model_type=SWIN_UNETR_TYPE)
    bn = SWIN | {"norm_name": "batch"}
    save_monai(SwinUNETR(**bn), bn, tmp_path / "swin_bn", model_type=SWIN_UNETR_TYPE)
    save_monai(_vit(VIT2D), VIT2D, tmp_path / "vit2d")
    common = ["model=foundation_swin", "task=lesion_seg", "model.options.weights=swin",
              f"model.foundation_dir={tmp_path}", f"runs_dir={tmp_path / 'runs'}"]
    with pytest.raises(ConfigError, match=expected) as err:
        load_experiment(common + overrides)
    assert "\n" not in str(err.value)
    # the valid ones load: registered versions, and DP-SGD on the LoRA fine-tune
    assert load_experiment(common).tracking.log_models
    assert load_experiment(common + ["privacy=dpsgd"]).privacy.mechanism == "dp-sgd"
