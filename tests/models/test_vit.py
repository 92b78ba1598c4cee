"""Contract tests for the multi-modal ViT: builds, trains, masks, and is Opacus-correct."""

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from models import MODELS
from models.serving import ExportedClassifier
from models.vit import MultiModalViT, ViTConfig

TINY = {"dim": 32, "depth": 2, "heads": 2, "img_size": 32, "patch_size": 8}
FUSED = TINY | {"sequence_fusion": True}
BOTH = pytest.mark.parametrize("opts", [TINY, FUSED], ids=["plain", "fused"])


def _batch(b=4, s=4, size=32, dims=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, *([size] * dims), generator=g)
    present = torch.ones(b, s, dtype=torch.bool)
    present[0, 1] = False
    present[1, 2:] = False
    x[~present] = 0
    return x, present, torch.arange(b) % 3


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("fusion", [False, True])
def test_builds_from_registry_and_backpropagates(dims, fusion):
    opts = TINY | {"spatial_dims": dims, "img_size": 16 if dims == 3 else 32,
                   "sequence_fusion": fusion}
    model = MODELS.build("mmvit", opts)
    x, present, y = _batch(size=opts["img_size"], dims=dims)
    loss = F.cross_entropy(model(x, present), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@BOTH
def test_state_dict_round_trips(opts):
    a, b = MODELS.build("mmvit", opts), MODELS.build("mmvit", opts)
    b.load_state_dict(a.state_dict())
    x, present, _ = _batch()
    assert torch.equal(a.eval()(x, present), b.eval()(x, present))


@BOTH
def test_absent_sequences_do_not_influence_the_output(opts):
    model = MODELS.build("mmvit", opts).eval()
    x, present, _ = _batch()
    noisy = x.clone()
    noisy[~present] = torch.randn_like(noisy[~present]) * 10    # garbage in absent channels
    torch.testing.assert_close(model(x, present), model(noisy, present))
    present_all = torch.ones_like(present)
    assert not torch.allclose(model(x, present), model(noisy, present_all))


def test_hidden_patches_reach_no_visible_token():
    """MAE hides patches by the attention mask; the fusion MLP mixes tokens of all sequences
    at one location, so it must not see hidden ones either."""
    model = MODELS.build("mmvit", FUSED).eval()
    x, present, _ = _batch()
    n = (32 // 8) ** 2
    hidden = torch.zeros(len(x), 4 * n, dtype=torch.bool)
    hidden[:, 0:n:2] = True                                  # every other patch of sequence 0
    hidden[:, 3 * n + 5] = True                              # and one patch of sequence 3
    changed = x.clone()
    changed[:, 0, :8, :8] += 50.0                            # patch 0 of sequence 0 (hidden)
    changed[:, 3, 8:16, 8:16] += 50.0                        # patch 5 of sequence 3 (hidden)
    visible = model.attention_mask(present, n, hidden)
    a, b = model.forward_features(x, present, hidden), model.forward_features(changed, present, hidden)
    torch.testing.assert_close(a[visible], b[visible])
    # without the mask the change does reach the other sequences at that location
    a, b = model.forward_features(x, present), model.forward_features(changed, present)
    assert not torch.allclose(a[:, 1 + n], b[:, 1 + n])     # sequence 1, patch 0


def test_fusion_mixes_sequences_at_a_location_only():
    """One fused vector per location, added to every sequence's token there: before
    attention, a token depends on its own location's patches and nothing else."""
    model = MODELS.build("mmvit", FUSED).eval()
    embedded = model.patch_embed(torch.randn(2, 4, 16, 64))
    visible = torch.ones(2, 4 * 16, dtype=torch.bool)
    fused = model.fuse(embedded, visible)
    assert fused.shape == (2, 1, 16, 32)
    moved = embedded.clone()
    moved[:, 2, 7] += 1.0                                    # sequence 2, location 7
    delta = (model.fuse(moved, visible) - fused).abs().sum(-1)[:, 0]     # [B, N]
    assert (delta[:, 7] > 0).all() and delta[:, [i for i in range(16) if i != 7]].max() == 0


def test_bad_configs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="divisible"):
        ViTConfig(img_size=30, patch_size=8)
    with pytest.raises(ValueError, match="spatial_dims"):
        ViTConfig(spatial_dims=4)
    with pytest.raises(ValueError, match="unknown option"):
        MODELS.build("mmvit", {"depht": 2})
    with pytest.raises(KeyError, match="registered: foundation, foundation_swin, mmvit"):
        MODELS.build("resnet", {})
    with pytest.raises(ValueError, match="already registered"):
        MODELS.register("mmvit", ViTConfig)(MultiModalViT)


@BOTH
def test_opacus_accepts_the_model(opts):
    assert ModuleValidator.validate(MODELS.build("mmvit", opts), strict=False) == []


@BOTH
def test_opacus_per_sample_gradients_match_individual_backward_passes(opts):
    """The check DP needs: each per-sample gradient equals that sample's own gradient,
    with per-sample presence masks (the case where extra arguments silently break Opacus)."""
    torch.manual_seed(0)
    model = MODELS.build("mmvit", opts)
    gsm = GradSampleModule(MODELS.build("mmvit", opts), loss_reduction="sum")
    gsm._module.load_state_dict(model.state_dict())
    x, present, y = _batch(b=4)
    F.cross_entropy(gsm(x, present), y, reduction="sum").backward()
    params = dict(gsm._module.named_parameters())
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1], present[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(params[name].grad_sample[i], p.grad, atol=1e-5, rtol=1e-4,
                                       msg=f"per-sample grad of {name}, sample {i}")
    for name, p in params.items():
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, atol=1e-5, rtol=1e-4)


def test_exported_classifier_reads_presence_from_zero_channels():
    model = MODELS.build("mmvit", TINY).eval()
    x, present, _ = _batch()
    probs = ExportedClassifier(model)(x)
    torch.testing.assert_close(probs, model(x, present).softmax(-1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(len(x)))
    findings = ExportedClassifier(model, multi_label=True)(x)    # independent per finding
    torch.testing.assert_close(findings, model(x, present).sigmoid())


def test_input_center_shifts_every_input_value_before_the_patches():
    """``input_center`` (experiment=ct3: CT windows in [0, 1] centred at 0.5) is the same
    model as an uncentred one fed ``x - center``; a non-finite centre is refused."""
    opts = TINY | {"spatial_dims": 3, "img_size": 16, "sequence_fusion": True}
    centred = MODELS.build("mmvit", opts | {"input_center": 0.5}).eval()
    plain = MODELS.build("mmvit", opts).eval()
    plain.load_state_dict(centred.state_dict())
    x, present, _ = _batch(size=16, dims=3)
    x = x.abs().clamp(max=1)                                   # window values in [0, 1]
    torch.testing.assert_close(centred(x, present), plain(x - 0.5, present))
    assert not torch.allclose(centred(x, present), plain(x, present))
    with pytest.raises(ValueError, match="input_center"):
        ViTConfig(input_center=float("nan"))
