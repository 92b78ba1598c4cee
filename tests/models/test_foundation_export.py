"""Weights out: a fine-tuned foundation backbone exported in its family's own format - the
encoder with adapters merged (loadable by ``load_encoder`` like any pretrained encoder), the
peft adapter directory (loadable by peft onto the ORIGINAL encoder), and the multi-channel
adaptation parts - each giving the same outputs as the model in memory."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")     # never a hub, even by accident

from models.foundation.export import (ADAPTATION_CONFIG, ADAPTATION_WEIGHTS, ADAPTER_DIR,  # noqa: E402
                                      ENCODER_DIR, ExportFormatError, export_foundation,
                                      load_export, merge_adapters)
from models.foundation.loading import load_encoder  # noqa: E402
from models.serving import servable  # noqa: E402

from .test_foundation import _batch, _build, _randomise_trainable, _save  # noqa: E402

ATOL = 1e-5        # float32: a merged W + BA against W x + B(A x)
# (family, method): every family once with LoRA, the other adapter methods on two families
CASES = [("dinov2", "lora"), ("vit", "lora"), ("vit_mae", "lora"), ("clip", "lora"),
         ("siglip", "lora"), ("sam", "lora"), ("monai_vit", "lora"), ("dinov2", "dora"),
         ("clip", "ia3"), ("vit", "full"), ("monai_vit", "linear_probe")]


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
