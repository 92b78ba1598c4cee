"""``model.options.gradient_checkpointing``: every family's encoder blocks keep only their input
in the forward pass and run again in backward - far fewer saved activations, the same outputs
and gradients, and DP-SGD's per-sample gradients still exact (float64)."""

from __future__ import annotations

import copy
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.checkpointing import counting_saved_activations, is_checkpointed
from models.foundation.config import FoundationConfig

from .test_foundation import (FAMILIES, _batch, _build, _randomise_trainable, _save,
                              assert_exact_per_sample)


TIMM = Path(__file__).parents[1] / "fixtures" / "timm" / "vit_tiny"   # written by real timm
CASES = [*FAMILIES, "timm"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpointing")
    for family in FAMILIES:
        _save(family, root / family)
    shutil.copytree(TIMM, root / "timm")
    return {family: root / family for family in CASES}


def _pair(directory, dtype=torch.float32):
    """The same LoRA model without and with checkpointing, trainable tensors equal."""
    out = []
    for on in (False, True):
        model = _build(directory, method="lora", lora_rank=2, gradient_checkpointing=on)
        model = model.to(dtype).train()
        _randomise_trainable(model)
        out.append(model)
    return out


def _saved_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes of activations autograd keeps from the forward pass for the backward pass (what a
    checkpointed block no longer keeps); runs the backward pass too."""
    with counting_saved_activations(model) as saved:
        logits = model(batch["image"], batch["present"])
    logits.square().sum().backward()
    return saved["bytes"]


@pytest.mark.parametrize("family", CASES)
def test_checkpointed_blocks_keep_far_fewer_activations_for_the_same_gradients(weights, family):
    plain, checkpointed = _pair(weights[family], torch.float64)
    blocks = checkpointed.seams.blocks(checkpointed.encoder)
    assert blocks and all(is_checkpointed(b) for b in blocks)
    assert not any(is_checkpointed(b) for b in plain.seams.blocks(plain.encoder))
    batch = _batch(dtype=torch.float64)
    kept = [_saved_bytes(m, batch) for m in (plain, checkpointed)]
    assert kept[1] < 0.5 * kept[0], kept
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad}
             for m in (plain, checkpointed)]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("family", CASES)
def test_per_sample_gradients_stay_exact_with_checkpointed_blocks(weights, family):
    """The clipper records a layer's input in the forward pass only: a block's second run
    (in backward) records nothing, else it would count the layer twice and refuse."""
    _, model = _pair(weights[family], torch.float64)
    assert model.dp_unsupported is None
    assert_exact_per_sample(model, _batch(dtype=torch.float64))


@pytest.mark.parametrize("method", ["dora", "ia3"])
@pytest.mark.parametrize("family", ["dinov2", "sam"])
def test_dora_and_ia3_per_sample_gradients_stay_exact_with_checkpointed_blocks(weights, family,
                                                                              method):
    """A checkpointed block runs DoRA's identity pass (forming B A) again in backward: the
    clipper must record neither run of it, nor the block's second forward."""
    model = _build(weights[family], method=method, lora_rank=2,
                   gradient_checkpointing=True).double().train()
    _randomise_trainable(model)
    assert_exact_per_sample(model, _batch(dtype=torch.float64))


@pytest.mark.parametrize("family", ["dinov2", "dinov3", "sam", "monai_vit", "timm"])
def test_per_sample_gradients_stay_exact_when_the_graph_starts_inside_a_block(weights, family):
    """Fused tokens from a frozen patch embedding: nothing before the encoder trains, so the
    clipper starts the graph at the first adapter inside block 0 (a root it makes in the
    first run and must make again in the second, or checkpointing's recomputation saves a
    different number of tensors and fails)."""
    model = _build(weights[family], method="lora", lora_rank=2, channel_tokens="fused",
                   freeze_patch_embed=True, gradient_checkpointing=True).double().train()
    _randomise_trainable(model)
    assert not any(p.requires_grad for p in model.patch_embed.parameters())
    assert_exact_per_sample(model, _batch(dtype=torch.float64))


def test_only_training_with_gradients_checkpoints(weights, monkeypatch):
    import models.checkpointing as checkpointing

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)
    monkeypatch.setattr(checkpointing, "checkpoint", counted)
    _, model = _pair(weights["dinov2"])
    batch = _batch()
    blocks = len(model.seams.blocks(model.encoder))
    model.eval()
    model(batch["image"], batch["present"])            # evaluation, with gradients
    with torch.no_grad():
        model.train()(batch["image"], batch["present"])        # training mode, no gradients
    assert calls == []
    model(batch["image"], batch["present"])
    assert len(calls) == blocks


def test_a_copy_or_a_pickle_keeps_the_setting_on_its_own_blocks(weights):
    _, model = _pair(weights["dinov2"])
    batch = _batch()
    with torch.no_grad():
        before = model.eval()(batch["image"], batch["present"])
    for twin in (copy.deepcopy(model),            # e.g. a DINO teacher
                 pickle.loads(pickle.dumps(model))):
        for ours, theirs in zip(twin.seams.blocks(twin.encoder),
                                model.seams.blocks(model.encoder)):
            assert is_checkpointed(ours) and is_checkpointed(theirs)
            assert ours.forward.args[0] is ours is not theirs
        with torch.no_grad():
            torch.testing.assert_close(twin.eval()(batch["image"], batch["present"]), before,
                                       rtol=0, atol=0)
        assert _saved_bytes(twin.train(), batch) < 0.5 * _saved_bytes(_pair(
            weights["dinov2"])[0], batch)


def test_a_non_boolean_setting_is_refused():
    with pytest.raises(ValueError, match="gradient_checkpointing must be true or false"):
        FoundationConfig(weights="w", gradient_checkpointing="false")
