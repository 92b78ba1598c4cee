"""Weights out: a fine-tuned foundation backbone exported in its family's own format - the
encoder with adapters merged (loadable by ``load_encoder`` like any pretrained encoder), the
peft adapter directory (loadable by peft onto the ORIGINAL encoder), and the multi-channel
adaptation parts - each giving the same outputs as the model in memory."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")     # never a hub, even by accident

from models.foundation.config import FoundationConfig  # noqa: E402
from models.foundation.export import (ADAPTATION_CONFIG, ADAPTATION_WEIGHTS, ADAPTER_DIR,  # noqa: E402
                                      ENCODER_DIR, FORMAT, FORMAT_VERSION, ExportFormatError,
                                      export_config, export_foundation, format_version,
                                      load_export, merge_adapters)
from models.foundation.loading import load_encoder  # noqa: E402
from models.serving import servable  # noqa: E402

from .test_foundation import _batch, _build, _randomise_trainable, _save  # noqa: E402

ATOL = 1e-5        # float32: a merged W + BA against W x + B(A x)
# (family, method): every family once with LoRA, the other adapter methods on two families
CASES = [("dinov2", "lora"), ("dinov2_with_registers", "lora"), ("dinov3", "lora"),
         ("vit", "lora"), ("vit_mae", "lora"), ("clip", "lora"), ("siglip", "lora"),
         ("sam", "lora"), ("monai_vit", "lora"), ("dinov2", "dora"), ("clip", "ia3"),
         ("vit", "full"), ("monai_vit", "linear_probe")]


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    for family in sorted({f for f, _ in CASES}):
        _save(family, root / family)
    return root


def _trained(originals, family: str, method: str):
    """A model as if fine-tuned: every trainable tensor (adapters included) moved away from
    its initial value, so an adapter that were lost or applied twice would show."""
    model = _build(originals / family, method=method, lora_rank=2)
    _randomise_trainable(model, seed=3)
    return model.eval()


def _encode(family: str, encoder, pixels):
    """The family's own forward on RGB pixels -> last hidden states."""
    if family == "monai_vit":
        return encoder(pixels)[0]
    kwargs = {"noise": torch.linspace(0, 1, 16)[None].expand(len(pixels), -1)} \
        if family == "vit_mae" else {}      # MAE masks randomly unless told the noise
    return encoder(pixel_values=pixels, **kwargs).last_hidden_state


@pytest.mark.parametrize("family,method", CASES)
def test_the_export_reloads_with_the_same_outputs(originals, tmp_path, family, method):
    model = _trained(originals, family, method)
    out = export_foundation(model, tmp_path / "export", extra={"class_names": ["a", "b", "c"]})
    meta = json.loads((out / ADAPTATION_CONFIG).read_text())
    assert meta["family"] == family and meta["config"]["method"] == method
    assert meta["extra"] == {"class_names": ["a", "b", "c"]}
    assert (out / ADAPTATION_WEIGHTS).is_file()

    # 1. the merged encoder is a plain encoder of its family: load_encoder reads it strictly,
    #    and its own forward equals the adapted encoder's (adapters active, unmerged)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    merged = load_encoder(out / ENCODER_DIR, expected_family=family).encoder
    assert not any("lora" in k or "ia3" in k or "base_layer" in k for k in merged.state_dict())
    with torch.no_grad():
        expected = _encode(family, model.encoder, pixels)
        torch.testing.assert_close(_encode(family, merged, pixels), expected,
                                   rtol=0, atol=ATOL)
        if method in ("lora", "dora", "ia3"):        # ... and the adapters did change it
            base = load_encoder(originals / family).encoder
            assert (_encode(family, base, pixels) - expected).abs().max() > 1e-3

    # 2. the whole adapted model comes back: same logits on multi-channel input with an
    #    absent channel
    batch = _batch()
    rebuilt = load_export(out)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batch["image"], batch["present"]),
                                   model(batch["image"], batch["present"]), rtol=0, atol=ATOL)


@pytest.mark.parametrize("family,method", [c for c in CASES
                                           if c[1] in ("lora", "dora", "ia3")])
def test_the_adapter_directory_loads_with_peft_onto_the_original_encoder(originals, tmp_path,
                                                                         family, method):
    from peft import PeftModel

    model = _trained(originals, family, method)
    out = export_foundation(model, tmp_path / "export")
    adapter = out / ADAPTER_DIR
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json",
                                                         "adapter_model.safetensors"]
    base = load_encoder(originals / family).encoder
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(_encode(family, peft_model, pixels),
                                   _encode(family, model.encoder, pixels), rtol=0, atol=ATOL)


def test_no_adapter_directory_without_adapters(originals, tmp_path):
    for method in ("full", "linear_probe"):
        out = export_foundation(_trained(originals, "dinov2", method), tmp_path / method)
        assert not (out / ADAPTER_DIR).exists()
        assert json.loads((out / ADAPTATION_CONFIG).read_text())["adapter"] is None


def test_merging_leaves_the_trained_model_as_it_was(originals):
    model = _trained(originals, "dinov2", "lora")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merge_adapters(model)
    assert model.state_dict().keys() == before.keys()       # still wrapped, still unmerged
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert set(merged.state_dict()) == {k.replace(".base_layer.", ".") for k in before
                                        if "lora_" not in k}


def test_servable_wraps_a_foundation_classifier(originals):
    model = _trained(originals, "dinov2", "lora")
    exported = servable(model).eval()
    assert exported.input_shape == (4, 32, 32)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(exported(batch["image"]),
                                   model(batch["image"], batch["present"]).softmax(-1),
                                   rtol=0, atol=ATOL)


def test_a_directory_that_is_not_an_export_is_refused(originals, tmp_path):
    with pytest.raises(ExportFormatError, match="not a foundation model export"):
        load_export(originals / "dinov2")
    out = export_foundation(_trained(originals, "dinov2", "lora"), tmp_path / "export")
    meta = json.loads((out / ADAPTATION_CONFIG).read_text())
    (out / ADAPTATION_CONFIG).write_text(json.dumps(meta | {"format": "something-else"}))
    with pytest.raises(ExportFormatError, match="format"):
        load_export(out)


# ---------------------------------------------------------------- format versions

V1_FORMAT = "medfed-foundation-export"     # what a version-1 reader compares "format" with


def _rewrite(out, **changes) -> dict:
    """Rewrite ``adaptation.json`` with top-level ``changes`` (``config=`` replaces the
    config); returns the original."""
    meta = json.loads((out / ADAPTATION_CONFIG).read_text())
    (out / ADAPTATION_CONFIG).write_text(json.dumps(meta | changes))
    return meta


def test_a_new_export_is_version_8_and_an_older_medfed_refuses_it_by_its_format(originals,
                                                                                  tmp_path):
    model = _trained(originals, "dinov2", "lora")
    out = export_foundation(model, tmp_path / "export")
    meta = json.loads((out / ADAPTATION_CONFIG).read_text())
    assert FORMAT_VERSION == 8 and meta["format"] == f"{FORMAT}/8"
    assert format_version(meta) == 8 and meta["config"]["channel_tokens"] == "per_channel"
    assert meta["config"]["scale_features"] is False
    assert meta["config"]["patch_init"] == "mean"
    assert meta["config"]["centre_features"] is False
    assert meta["config"]["freeze_patch_embed"] is False
    assert meta["config"]["freeze_lora_a"] is False
    assert meta["config"]["project_features"] == 0
    # a version-1 load_export stops at `meta["format"] != FORMAT` with its ExportFormatError,
    # before it builds a FoundationConfig that has no channel_tokens (the TypeError)
    assert meta["format"] != V1_FORMAT
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(load_export(out)(batch["image"], batch["present"]),
                                   model(batch["image"], batch["present"]), rtol=0, atol=ATOL)


# An older export: the config keys its version did not have yet, and what loading it must
# give (the options decide init or what trains; the exported tensors are what was trained).
OLDER = {
    1: (("channel_tokens",),                           # per-channel tokens were all there was
        lambda m: m.config.channel_tokens == "per_channel" and not m.fused),
    2: (("centre_features",), lambda m: m.feature_mean is None and not m.config.centre_features),
    3: (("freeze_patch_embed", "project_features"), lambda m: not m.config.freeze_patch_embed),
    4: (("project_features", "patch_init"),            # the full pooled head
        lambda m: m.feature_projection is None and m.config.project_features == 0),
    5: (("patch_init",), lambda m: m.config.patch_init == "mean"),
    6: (("scale_features", "freeze_lora_a"),
        lambda m: m.feature_scale is None and not m.config.scale_features),
    7: (("freeze_lora_a",), lambda m: not m.config.freeze_lora_a),
}


@pytest.mark.parametrize("version", sorted(OLDER), ids=lambda v: f"v{v}")
def test_an_older_export_still_loads_with_the_same_outputs(originals, tmp_path, version):
    lacked, loaded_as = OLDER[version]
    model = _trained(originals, "dinov2", "lora")
    out = export_foundation(model, tmp_path / "export")
    meta = json.loads((out / ADAPTATION_CONFIG).read_text())
    _rewrite(out, format=V1_FORMAT if version == 1 else f"{FORMAT}/{version}",
             config={k: v for k, v in meta["config"].items() if k not in lacked})
    again = load_export(out)
    assert loaded_as(again)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(batch["image"], batch["present"]),
                                   model(batch["image"], batch["present"]), rtol=0, atol=ATOL)


def test_version_1_means_per_channel_even_if_the_default_becomes_fused(monkeypatch):
    """Version 1 had no channel_tokens key because it had per-channel tokens only: reading
    it must not follow FoundationConfig's default, which may change."""
    from models.foundation import export

    @dataclasses.dataclass(frozen=True)
    class FusedByDefault(FoundationConfig):
        channel_tokens: str = "fused"

    monkeypatch.setattr(export, "FoundationConfig", FusedByDefault)
    config = {"weights": "dinov2", "num_channels": 4, "image_size": 32}
    assert export_config({"config": config}, 1).channel_tokens == "per_channel"
    assert export_config({"config": config}, 2).channel_tokens == "fused"


@pytest.mark.parametrize("changes,expected", [
    ({"format": f"{FORMAT}/{FORMAT_VERSION + 1}"},
     f"format version {FORMAT_VERSION + 1}, written by a newer MedFed.*upgrade MedFed"),
    ({"format": f"{FORMAT}/two"}, "expected 'medfed-foundation-export' or"),
    ({"format": f"{FORMAT}/0"}, "not a MedFed foundation model export"),
    ({"format": None}, "not a MedFed foundation model export"),
    ({"config": "lora"}, "expected a 'config' object"),
])
def test_an_unknown_format_version_is_refused_by_name(originals, tmp_path, changes, expected):
    out = export_foundation(_trained(originals, "dinov2", "lora"), tmp_path / "export")
    _rewrite(out, **changes)
    with pytest.raises(ExportFormatError, match=expected) as err:
        load_export(out)
    assert "\n" not in str(err.value)


def test_a_config_key_this_version_does_not_know_is_a_format_error_not_a_type_error(
        originals, tmp_path):
    out = export_foundation(_trained(originals, "dinov2", "lora"), tmp_path / "export")
    meta = json.loads((out / ADAPTATION_CONFIG).read_text())
    _rewrite(out, config=meta["config"] | {"some_future_option": True})
    with pytest.raises(ExportFormatError, match=r"\['some_future_option'\] are unknown"):
        load_export(out)
    _rewrite(out, config=meta["config"] | {"channel_tokens": "stacked"})
    with pytest.raises(ExportFormatError, match="config is not valid: unknown channel_tokens"):
        load_export(out)


@pytest.mark.parametrize("change", ["not-json", "not-an-object", "no-family"])
def test_an_adaptation_file_that_is_not_an_export_object_is_a_format_error(originals, tmp_path,
                                                                          change):
    out = export_foundation(_trained(originals, "dinov2", "lora"), tmp_path / "export")
    meta = json.loads((out / ADAPTATION_CONFIG).read_text())
    text = {"not-json": "{not json", "not-an-object": json.dumps([meta]),
            "no-family": json.dumps({k: v for k, v in meta.items() if k != "family"})}[change]
    (out / ADAPTATION_CONFIG).write_text(text)
    with pytest.raises(ExportFormatError):
        load_export(out)
