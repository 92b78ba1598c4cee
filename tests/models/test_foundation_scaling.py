"""``scale_features``: the centred pooled features divided by a PUBLIC per-dimension spread,
read from ``<weights>/feature_scale.safetensors`` - off by default, only with
``centre_features``, refused in one line when missing, made for another adaptation or not
positive, frozen (never trains, never travels), in the base digest, exported, and exact under
DP-SGD's per-sample rule."""

from __future__ import annotations

import shutil

import pytest
import torch

from models.foundation import base_digest
from models.foundation.centring import (SCALE_FORMAT, load_feature_mean, load_feature_scale,
                                        save_feature_scale)
from models.foundation.loading import FEATURE_SCALE_FILE, FoundationLoadError

from .test_foundation import _batch, _build, _randomise_trainable, _save, assert_exact_per_sample
from .test_foundation_centring import (_public_mean, assert_export_carries,
                                       assert_never_trains_or_travels)

FAMILIES = ("dinov2", "siglip", "monai_vit")     # with and without a CLS token, HF and MONAI


def _public_scale(directory, seed: int = 5, **options) -> torch.Tensor:
    """Write this adaptation's public mean and the spread around it (a stand-in public
    batch) beside the weights in ``directory``; returns the spread."""
    mean = _public_mean(directory, seed, **options)
    torch.manual_seed(0)
    model = _build(directory, **options).eval()
    batch = _batch(seed)
    with torch.no_grad():
        pooled = model.pool(model.forward_features(batch["image"], batch["present"]),
                            batch["present"])
    scale = (pooled - mean).pow(2).mean(0).sqrt().clamp(min=1e-6)
    save_feature_scale(directory, scale, model.feature_signature)
    return scale


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("scaling")
    for family in FAMILIES:
        _save(family, root / family)
        _public_scale(root / family)
    return {family: root / family for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_off_by_default_and_centring_alone_is_unchanged_with_the_file_there(weights, family):
    torch.manual_seed(0)
    centred = _build(weights[family], centre_features=True).eval()
    assert centred.feature_scale is None and "feature_scale" not in centred.state_dict()
    assert centred.public_constants == ("feature_mean",)


@pytest.mark.parametrize("family", FAMILIES)
def test_on_the_centred_features_are_divided_by_the_public_spread(weights, family):
    torch.manual_seed(0)
    centred = _build(weights[family], centre_features=True).eval()
    torch.manual_seed(0)
    scaled = _build(weights[family], centre_features=True, scale_features=True).eval()
    mean = load_feature_mean(weights[family], scaled.feature_signature)
    scale = load_feature_scale(weights[family], scaled.feature_signature)
    assert scaled.public_constants == ("feature_mean", "feature_scale")
    # every other weight starts as without scaling (no random draw for the scale)
    assert all(torch.equal(v, scaled.state_dict()[k]) for k, v in centred.state_dict().items())
    batch = _batch(5)                                     # the batch the scale was taken on
    with torch.no_grad():
        tokens = centred.forward_features(batch["image"], batch["present"])
        raw = centred.pool(tokens, batch["present"]) + mean
        out = scaled.pool(tokens, batch["present"])
        torch.testing.assert_close(out, (raw - mean) / scale, rtol=1e-5, atol=1e-6)
        spread = out.pow(2).mean(0).sqrt()
        wide = scale > 1e-4                               # dimensions the batch spreads along
        torch.testing.assert_close(spread[wide], torch.ones_like(spread[wide]), rtol=1e-4,
                                   atol=1e-4)
        assert scale.max() / scale.min() > 2              # it is not a no-op on these features
        torch.testing.assert_close(scaled(batch["image"], batch["present"]),
                                   scaled.head(out), rtol=0, atol=0)


def test_it_needs_centring_and_excludes_the_projection_in_one_line(weights):
    with pytest.raises(ValueError, match="set centre_features=true") as err:
        _build(weights["dinov2"], scale_features=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="cannot be combined") as err:
        _build(weights["dinov2"], centre_features=True, scale_features=True, project_features=2)
    with pytest.raises(ValueError, match="true or false"):
        _build(weights["dinov2"], centre_features=True, scale_features="false")


def test_a_missing_file_is_refused_in_one_line(weights, tmp_path):
    directory = tmp_path / "dinov2"
    shutil.copytree(weights["dinov2"], directory)
    (directory / FEATURE_SCALE_FILE).unlink()
    _build(directory, centre_features=True)                 # centring alone: no file needed
    with pytest.raises(FoundationLoadError, match="scale_features is on but .* does not "
                                                  "exist") as err:
        _build(directory, centre_features=True, scale_features=True)
    assert "\n" not in str(err.value)


def test_a_scale_made_for_another_adaptation_is_refused_in_one_line(weights, tmp_path):
    directory = tmp_path / "dinov2"
    shutil.copytree(weights["dinov2"], directory)
    _public_mean(directory, channel_tokens="fused")         # the mean fits, the scale does not
    with pytest.raises(FoundationLoadError, match="feature_scale.*computed for another "
                                                  "adaptation") as err:
        _build(directory, centre_features=True, scale_features=True, channel_tokens="fused")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_a_scale_that_is_not_finite_and_positive_is_refused_when_written_and_when_read(
        weights, tmp_path, bad):
    """A zero, negative or non-finite spread would blow up or flip a feature: refused by the
    writer, and by the reader for a file written some other way."""
    from safetensors.torch import save_file

    directory = tmp_path / "dinov2"
    shutil.copytree(weights["dinov2"], directory)
    signature = _build(directory).feature_signature
    scale = load_feature_scale(directory, signature).clone()
    scale[3] = bad
    with pytest.raises(ValueError, match="finite and > 0"):
        save_feature_scale(directory, scale, signature)
    save_file({"scale": scale}, str(directory / FEATURE_SCALE_FILE),
              metadata={"format": SCALE_FORMAT, **signature})
    with pytest.raises(FoundationLoadError, match="finite values > 0") as err:
        _build(directory, centre_features=True, scale_features=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["lora", "linear_probe", "full"])
def test_the_scale_never_trains_and_never_travels(weights, method):
    assert_never_trains_or_travels(weights["dinov2"].parent, "feature_scale", method=method,
                                   centre_features=True, scale_features=True)


def test_the_scale_is_part_of_the_base_digest(weights, tmp_path):
    # a site holding another scale file than the coordinator's gets another digest
    directory = tmp_path / "dinov2"
    shutil.copytree(weights["dinov2"], directory)
    first = base_digest(_build(directory, centre_features=True, scale_features=True))
    assert base_digest(_build(directory, centre_features=True)) != first
    signature = _build(directory).feature_signature
    save_feature_scale(directory, load_feature_scale(directory, signature) * 2, signature)
    assert base_digest(_build(directory, centre_features=True, scale_features=True)) != first


@pytest.mark.parametrize("family", FAMILIES)
def test_the_export_carries_the_scale_and_reloads_it(weights, family, tmp_path):
    torch.manual_seed(0)
    model = _build(weights[family], method="lora", lora_rank=2, centre_features=True,
                   scale_features=True)
    _randomise_trainable(model, seed=3)
    # rtol: the logits of standardised features are large
    assert_export_carries(model.eval(), tmp_path / "export", "feature_scale", FEATURE_SCALE_FILE,
                          rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "linear_probe"])
def test_per_sample_gradients_stay_exact_with_scaling(weights, family, method):
    torch.manual_seed(0)
    model = _build(weights[family], method=method, lora_rank=2, centre_features=True,
                   scale_features=True).double().train()
    assert (model.feature_scale - 1).abs().max() > 0.1 and model.dp_unsupported is None
    _randomise_trainable(model)
    with torch.no_grad():       # standardised features are O(1) each: keep the softmax unsaturated
        model.head.weight.mul_(0.01)
    assert_exact_per_sample(model, _batch(dtype=torch.float64))
