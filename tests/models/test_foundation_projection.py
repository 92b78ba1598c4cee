"""``project_features=k``: the (centred) pooled features projected on the first k PUBLIC
principal directions read from ``<weights>/feature_projection.safetensors``, before a k-input
head - off by default (outputs as before), refused in one line when missing, made for another
adaptation or too short, frozen (never trains, never travels), in the base digest, exported,
and exact under DP-SGD's per-sample rule."""

from __future__ import annotations

import shutil

import pytest
import torch

from client.engine import Engine
from client.foundation import expected_arrays
from models.foundation import base_digest
from models.foundation.loading import FEATURE_PROJECTION_FILE, FoundationLoadError
from models.foundation.lora import trainable_keys
from models.foundation.projection import (load_feature_projection, principal_directions,
                                          save_feature_projection)
from models.tasks import build
from protocol.job import TrainConfig

from .test_foundation import _batch, _build, _randomise_trainable, _save, assert_exact_per_sample
from .test_foundation_centring import _public_mean, assert_export_carries

FAMILIES = ("dinov2", "siglip", "monai_vit")     # with and without a CLS token, HF and MONAI
K = 3


def _public_directions(directory, seed: int = 5, count: int = 4, **options) -> torch.Tensor:
    """Write the mean and ``count`` principal directions of this adaptation's centred pooled
    features (a stand-in public batch) beside the weights; returns the directions."""
    _public_mean(directory, seed=seed, **options)
    torch.manual_seed(0)
    model = _build(directory, centre_features=True, **options).eval()
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(8, 4, 32, 32, generator=g)
    present = torch.ones(8, 4, dtype=torch.bool)
    with torch.no_grad():
        features = model.pool(model.forward_features(images, present), present)
    directions, _ = principal_directions(features, count)
    save_feature_projection(directory, directions, model.feature_signature)
    return directions


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("projection")
    for family in FAMILIES:
        _save(family, root / family)
        _public_directions(root / family)
    return {family: root / family for family in FAMILIES}


def test_principal_directions_are_orthonormal_and_ordered_by_variance():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 1.0, 0.1])
    basis, _ = torch.linalg.qr(torch.randn(6, 4, generator=g, dtype=torch.float64))
    features = (torch.randn(4000, 4, generator=g, dtype=torch.float64) * scales) @ basis.T
    directions, share = principal_directions(features - features.mean(0), 3)
    assert directions.shape == (3, 6)
    torch.testing.assert_close(directions @ directions.T, torch.eye(3), rtol=0, atol=1e-5)
    for i in range(3):          # each is the i-th generating axis, up to its sign
        assert abs(float(directions[i].double() @ basis[:, i])) > 0.99
    assert share[0] > share[1] > share[2] and 0.99 < float(share.sum()) <= 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_off_by_default_gives_todays_outputs_even_with_the_file_there(weights, family):
    torch.manual_seed(0)
    off = _build(weights[family]).eval()
    torch.manual_seed(0)
    explicit_off = _build(weights[family], project_features=0).eval()
    assert off.feature_projection is None and "feature_projection" not in off.state_dict()
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(off(batch["image"], batch["present"]),
                                   explicit_off(batch["image"], batch["present"]), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_on_the_head_sees_the_centred_features_on_the_public_directions(weights, family):
    torch.manual_seed(0)
    centred = _build(weights[family], centre_features=True).eval()
    torch.manual_seed(0)
    on = _build(weights[family], centre_features=True, project_features=K).eval()
    directions = load_feature_projection(weights[family], on.feature_signature, K)
    assert on.head.in_features == K and directions.shape[0] == K
    batch = _batch()
    with torch.no_grad():
        tokens = centred.forward_features(batch["image"], batch["present"])
        expected = centred.pool(tokens, batch["present"]) @ directions.T            # [B, K]
        torch.testing.assert_close(on.pool(tokens, batch["present"]), expected,
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(on(batch["image"], batch["present"]), on.head(expected),
                                   rtol=0, atol=1e-6)


def test_a_missing_file_is_refused_in_one_line(weights, tmp_path):
    directory = tmp_path / "dinov2"
    shutil.copytree(weights["dinov2"], directory)
    (directory / FEATURE_PROJECTION_FILE).unlink()
    _build(directory, centre_features=True)                   # off: no file needed
    with pytest.raises(FoundationLoadError, match="project_features is on but .* does not "
                                                  "exist") as err:
        _build(directory, centre_features=True, project_features=K)
    assert "\n" not in str(err.value)


def test_directions_for_another_adaptation_or_too_few_are_refused_in_one_line(weights):
    # the file holds 4 directions for per-channel tokens at 32x32
    for options, expected in (({"channel_tokens": "fused"}, "computed for another adaptation"),
                              ({"image_size": 16}, "computed for another adaptation"),
                              ({"project_features": 5}, r"need at least 5 finite rows")):
        with pytest.raises(FoundationLoadError, match=expected) as err:
            _build(weights["dinov2"], **({"project_features": K} | options))
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [-1, True, 2.0, "8"])
def test_a_bad_k_is_refused(weights, bad):
    with pytest.raises(ValueError, match="project_features must be a whole number"):
        _build(weights["dinov2"], project_features=bad)


@pytest.mark.parametrize("method", ["lora", "linear_probe", "full"])
def test_the_directions_never_train_and_never_travel(weights, method):
    model, task = build("foundation", {"weights": "dinov2", "num_channels": 4, "image_size": 32,
                                       "method": method, "centre_features": True,
                                       "project_features": K},
                        "classification", {}, foundation_dir=weights["dinov2"].parent)
    names = [n for n, _ in model.named_parameters() if n.endswith("feature_projection")]
    assert len(names) == 1 and names[0] not in trainable_keys(model)
    assert not any(k.endswith("feature_projection") for k in expected_arrays(model, []))
    assert any(k.endswith("head.weight") for k in expected_arrays(model, []))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _batch()
    data = [{"image": batch["image"][i], "present": batch["present"][i],
             "label": batch["label"][i]} for i in range(2)]
    Engine(task, torch.device("cpu")).fit(model, data, TrainConfig(local_epochs=1, lr=0.1,
                                                                   batch_size=2))
    after = dict(model.named_parameters())
    assert torch.equal(after[names[0]], before[names[0]])
    head = next(n for n in after if n.endswith("head.weight"))
    assert not torch.equal(after[head], before[head])              # the step happened


def test_the_directions_are_part_of_the_base_digest(weights, tmp_path):
    directory = tmp_path / "dinov2"
    shutil.copytree(weights["dinov2"], directory)
    first = base_digest(_build(directory, centre_features=True, project_features=K))
    assert base_digest(_build(directory, centre_features=True, project_features=K)) == first
    assert base_digest(_build(directory, centre_features=True)) != first     # off
    assert base_digest(_build(directory, centre_features=True, project_features=2)) != first
    directions = load_feature_projection(directory, _build(directory).feature_signature, 4)
    save_feature_projection(directory, directions.flip(0), _build(directory).feature_signature)
    assert base_digest(_build(directory, centre_features=True, project_features=K)) != first


@pytest.mark.parametrize("family", FAMILIES)
def test_the_export_carries_the_directions_and_reloads_them(weights, family, tmp_path):
    torch.manual_seed(0)
    model = _build(weights[family], method="lora", lora_rank=2, centre_features=True,
                   project_features=K)
    _randomise_trainable(model, seed=3)
    assert_export_carries(model.eval(), tmp_path / "export", "feature_projection",
                          FEATURE_PROJECTION_FILE)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tokens", ["per_channel", "fused"])
@pytest.mark.parametrize("method", ["lora", "linear_probe"])
def test_per_sample_gradients_stay_exact_with_the_projection(weights, family, tokens, method,
                                                             tmp_path):
    directory = weights[family]
    if tokens == "fused":
        directory = tmp_path / family
        shutil.copytree(weights[family], directory)
        _public_directions(directory, channel_tokens="fused")
    torch.manual_seed(0)
    model = _build(directory, method=method, lora_rank=2, centre_features=True,
                   project_features=K, channel_tokens=tokens).double().train()
    assert model.feature_projection.abs().sum() > 0 and model.dp_unsupported is None
    _randomise_trainable(model)
    assert_exact_per_sample(model, _batch(dtype=torch.float64))


@pytest.mark.parametrize("pretrained_with", [False, True])
def test_a_backbone_pretrained_without_the_public_files_fine_tunes_with_them(weights, tmp_path,
                                                                          pretrained_with):
    """``model.pretrained`` / a pretraining phase without centring or projection, fine-tuned
    with both: the body loads, the mean and directions are this side's own files' (never the
    state's, which another pretraining may carry with other values), the head starts fresh."""
    from models.tasks import load_backbone

    directory = weights["dinov2"]
    options = {"centre_features": True, "project_features": K}
    torch.manual_seed(1)
    pretrained = _build(directory, **(options if pretrained_with else {}))
    state = {k: v.clone() for k, v in pretrained.state_dict().items()}
    if pretrained_with:                  # made elsewhere with other public files
        state["feature_mean"] += 1.0
        state["feature_projection"] = state["feature_projection"].flip(0)
    state = {k: (v + 0.5 if k.startswith("patch_embed") else v) for k, v in state.items()}
    torch.manual_seed(0)
    model = _build(directory, **options)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    load_backbone(model, state)
    after = model.state_dict()
    assert torch.equal(after["feature_mean"], own["feature_mean"])
    assert torch.equal(after["feature_projection"], own["feature_projection"])
    assert all(torch.equal(after[k], state[k]) for k in after if k.startswith("patch_embed"))
    assert torch.equal(after["head.weight"], (state if pretrained_with else own)["head.weight"])
    assert base_digest(model) == base_digest(_build(directory, **options))
