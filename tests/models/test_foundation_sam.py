"""SAM's image encoder under DP-SGD: every ``SamVisionLayer`` sees sample-major folds of the
batch (channels folded by our multi-channel encoding, windows by SAM's ``window_partition``,
padded when the window does not divide the grid), declared as ``batch_major_folds``; the
clipper's per-sample gradients then equal one backward pass per sample, in float64."""

from __future__ import annotations

import os

import pytest
import torch

from client.privacy.persample import PerSampleClipper, UnsupportedLayerError
from models import MODELS, TASKS
from models.foundation.families import SamSeams

from .test_foundation import _summed_loss, assert_clipped_sum, looped_per_sample

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

S, B, SIZE, PATCH = 4, 3, 32, 8          # a 4x4 grid per channel
WINDOW = 3                               # does not divide 4: padded to 6, 2x2 windows
# layers 0 and 2 attend in windows, layer 1 globally
VISION = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=SIZE,
              patch_size=PATCH, mlp_dim=64, window_size=WINDOW, global_attn_indexes=[1],
              output_channels=16)
ATOL = 1e-10
EVERY_LINEAR = ("qkv", "proj", "lin1", "lin2")     # attention and MLP of every layer


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    """A SAM vision encoder saved as a user would have it (``SamVisionModel``)."""
    directory = tmp_path_factory.mktemp("encoders") / "sam-vision"
    torch.manual_seed(0)
    model = transformers.SamVisionModel(transformers.SamVisionConfig(**VISION))
    with torch.no_grad():        # SAM initialises its positions (absolute, relative) to zero
        for name, p in model.named_parameters():    # and its matrices to ~1e-10: make them
            if "pos" in name or (p.dim() > 1 and p.abs().max() < 1e-6):    # matter
                p.normal_(std=0.1)
    model.save_pretrained(directory)
    return directory


def _build(directory, **options):
    options = {"weights": directory.name, "num_channels": S, "image_size": SIZE,
               "lora_rank": 2} | options
    return MODELS.build("foundation", options, foundation_dir=directory.parent)


def _batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    present = torch.ones(B, S, dtype=torch.bool)
    present[1, 2] = False                                    # one channel absent
    images = torch.randn(B, S, SIZE, SIZE, generator=g, dtype=dtype) * present[..., None, None]
    return {"image": images, "present": present, "label": torch.tensor([0, 2, 1])}


def _randomise_trainable(model, seed: int = 0) -> None:
    """LoRA's B and the channel embedding start at zero: random values make every gradient
    (and any mix-up between samples' rows) visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def _qkv_rows(model, batch) -> list[int]:
    """Leading dimension of each layer's ``qkv`` input in one forward pass."""
    rows, hooks = [], []
    for layer in model.encoder.layers:
        hooks.append(layer.attn.qkv.register_forward_hook(
            lambda m, args, out: rows.append(args[0].shape[0])))
    with torch.no_grad():
        model(batch["image"], batch["present"])
    for h in hooks:
        h.remove()
    return rows


@pytest.mark.parametrize("targets, method", [((), "lora"), (EVERY_LINEAR, "lora"),
                                             (EVERY_LINEAR, "dora"), (EVERY_LINEAR, "ia3")],
                         ids=["qkv", "every-linear", "every-linear-dora", "every-linear-ia3"])
def test_per_sample_gradients_of_sam_adapters_are_exact(sam_dir, targets, method):
    model = _build(sam_dir, lora_targets=targets, method=method).double().train()
    assert model.dp_unsupported is None
    _randomise_trainable(model)
    batch = _batch()
    # the folds this test is about: 2x2 padded windows per channel, then the global grid
    assert _qkv_rows(model, batch) == [B * S * 4, B * S, B * S * 4]
    task = TASKS.build("classification", {})
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(".layers.1.attn.qkv." in n for n in params)        # the global layer
    if targets:
        assert any(".mlp.lin2." in n for n in params)
    individual, norms = looped_per_sample(
        model, lambda b: _summed_loss(model, task, b), batch, B)
    model.zero_grad(set_to_none=True)
    _summed_loss(model, task, batch).backward()
    batch_grads = {n: p.grad.clone() for n, p in params.items()}
    model.zero_grad(set_to_none=True)
    for name in params:
        # every part matters (DoRA's random magnitudes shrink its layers' adapters' share)
        assert batch_grads[name].abs().max() > (1e-3 if method != "dora" else 1e-5), name
        torch.testing.assert_close(sum(g[name] for g in individual), batch_grads[name],
                                   rtol=0, atol=ATOL, msg=name)
    # a bound no sample reaches (the plain sum), and one between the norms (clips some)
    bound = float(norms.min() + norms.max()) / 2
    assert (norms > bound).any() and (norms < bound).any()
    for c in (1e12, bound):
        assert_clipped_sum(model, lambda b: _summed_loss(model, task, b), batch, individual,
                           norms, c, ATOL)


def test_without_the_fold_declaration_the_clipper_refuses_sam(sam_dir, monkeypatch):
    """The declaration is what admits SAM's rows: without it the first folded layer is
    refused (its rows are not samples), never clipped as if they were."""
    model = _build(sam_dir).double().train()
    monkeypatch.setattr(SamSeams, "batch_major_folds", lambda self, encoder: ())
    task = TASKS.build("classification", {})
    clipper = PerSampleClipper(model, max_grad_norm=1.0)
    with pytest.raises(UnsupportedLayerError, match=r"layers\.0\.attn\.qkv.*leading dimension "
                                                    rf"of {B * S * 4}, not the batch of {B}"):
        with clipper.capture():
            _summed_loss(model, task, _batch()).backward()


def test_sam_methods_without_a_per_sample_rule_are_refused_by_name(sam_dir):
    full = _build(sam_dir, method="full")
    assert "method=full" in full.dp_unsupported and "\n" not in full.dp_unsupported
    # the site's clipper refuses it too, naming the relative-position holders
    with pytest.raises(UnsupportedLayerError,
                       match=r"encoder\.layers\.0\.attn \(SamVision\w*Attention\)") as err:
        PerSampleClipper(full, max_grad_norm=1.0)
    assert "encoder (SamVisionEncoder)" in str(err.value)        # the absolute position grid
    probe = _build(sam_dir, method="linear_probe")
    assert probe.dp_unsupported is None
    PerSampleClipper(probe, max_grad_norm=1.0)
    for method in ("dora", "ia3"):     # row-wise rules, regrouped over SAM's declared folds
        PerSampleClipper(_build(sam_dir, method=method), max_grad_norm=1.0)


def test_a_short_dp_sgd_run_through_the_engine_trains_only_the_sam_adapters(sam_dir):
    from client.engine import Engine
    from client.privacy.dpsgd import DPSGDConfig
    from protocol.job import TrainConfig

    model = _build(sam_dir)
    batch = _batch(torch.float32)
    data = [{k: v[i] for k, v in batch.items()} for i in range(B)] * 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    privacy = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                          secure_mode=False, seed=3)
    metrics = Engine(TASKS.build("classification", {}), torch.device("cpu")).fit(
        model, data, TrainConfig(lr=1e-2, local_epochs=1, seed=0), privacy)
    assert metrics["steps"] == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable               # every adapter/new part, nothing frozen
    assert all("lora_" in n or n.split(".")[0] in ("patch_embed", "channel_embed", "head")
               for n in trainable)
