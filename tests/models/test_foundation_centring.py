"""``centre_features``: a public mean of the pooled features, read from
``<weights>/feature_mean.safetensors``, subtracted before the head - off by default (outputs as
before), refused in one line when missing or made for another adaptation, frozen (never trains,
never travels), in the base digest, exported, and exact under DP-SGD's per-sample rule."""

from __future__ import annotations

import shutil

import pytest
import torch

from client.engine import Engine
from client.foundation import expected_arrays
from models.foundation import base_digest
from models.foundation.centring import load_feature_mean, save_feature_mean
from models.foundation.export import ADAPTATION_CONFIG, export_foundation, load_export
from models.foundation.loading import FEATURE_MEAN_FILE, FoundationLoadError, load_encoder
from models.foundation.lora import trainable_keys
from models.tasks import build
from protocol.job import TrainConfig

from .test_foundation import _batch, _build, _randomise_trainable, _save, assert_exact_per_sample

FAMILIES = ("dinov2", "siglip", "monai_vit")     # with and without a CLS token, HF and MONAI


def _public_mean(directory, seed: int = 5, **options) -> torch.Tensor:
    """Write a mean of this adaptation's pooled features (a stand-in public batch) beside the
    weights in ``directory``; returns it."""
    torch.manual_seed(0)
    model = _build(directory, **options).eval()
    batch = _batch(seed)
    with torch.no_grad():
        mean = model.pool(model.forward_features(batch["image"], batch["present"]),
                          batch["present"]).mean(0)
    save_feature_mean(directory, mean, model.feature_signature)
    return mean


def assert_export_carries(model, directory, part: str, file_name: str, *,
                          rtol: float = 0.0) -> None:
    """``model`` exported to ``directory``: its public constant ``part`` is written as
    ``encoder/<file_name>``, named in adaptation.json, not read as a weight file, and
    reloaded exactly; the reloaded model gives the same outputs."""
    out = export_foundation(model, directory)
    assert (out / "encoder" / file_name).is_file()
    assert part in (out / ADAPTATION_CONFIG).read_text()
    load_encoder(out / "encoder")          # the constant beside the weights is not read as one
    again = load_export(out)
    torch.testing.assert_close(getattr(again, part), getattr(model, part), rtol=0, atol=0)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(batch["image"], batch["present"]),
                                   model(batch["image"], batch["present"]),
                                   rtol=rtol, atol=1e-4)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("centring")
    for family in FAMILIES:
        _save(family, root / family)
        _public_mean(root / family)
    return {family: root / family for family in FAMILIES}


def _pair(directory, **options):
    """The same model (same seed) without and with centring."""
    torch.manual_seed(0)
    off = _build(directory, **options)
    torch.manual_seed(0)
    on = _build(directory, centre_features=True, **options)
    return off.eval(), on.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_off_by_default_gives_todays_outputs_even_with_the_file_there(weights, family):
    torch.manual_seed(0)
    off = _build(weights[family]).eval()
    torch.manual_seed(0)
    explicit_off = _build(weights[family], centre_features=False).eval()
    assert off.feature_mean is None and "feature_mean" not in off.state_dict()
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(off(batch["image"], batch["present"]),
                                   explicit_off(batch["image"], batch["present"]), rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_on_the_pooled_features_are_centred_on_the_public_mean(weights, family):
    off, on = _pair(weights[family])
    mean = load_feature_mean(weights[family], on.feature_signature)
    # every other weight starts as without centring (no random draw for the mean)
    assert all(torch.equal(v, on.state_dict()[k]) for k, v in off.state_dict().items())
    batch = _batch(5)                                     # the batch the mean was taken on
    with torch.no_grad():
        tokens = off.forward_features(batch["image"], batch["present"])
        raw, centred = off.pool(tokens, batch["present"]), on.pool(tokens, batch["present"])
        torch.testing.assert_close(centred, raw - mean, rtol=0, atol=1e-6)
        assert centred.mean(0).abs().max() < 1e-5 < raw.mean(0).abs().max()
        torch.testing.assert_close(on(batch["image"], batch["present"]),
                                   off.head(raw - mean), rtol=0, atol=1e-6)


def test_a_missing_file_is_refused_in_one_line(weights, tmp_path):
    directory = tmp_path / "dinov2"
    shutil.copytree(weights["dinov2"], directory)
    (directory / FEATURE_MEAN_FILE).unlink()
    _build(directory)                                       # off: no file needed
    with pytest.raises(FoundationLoadError, match="centre_features is on but .* does not "
                                                  "exist") as err:
        _build(directory, centre_features=True)
    assert "\n" not in str(err.value)


def test_a_mean_made_for_another_adaptation_is_refused_in_one_line(weights):
    # the file was made for per-channel tokens at 32x32
    for options in ({"channel_tokens": "fused"}, {"image_size": 16}):
        with pytest.raises(FoundationLoadError, match="computed for another adaptation") as err:
            _build(weights["dinov2"], centre_features=True, **options)
        assert "\n" not in str(err.value)


def test_a_mean_made_with_another_patch_init_is_refused_and_an_older_file_is_read_as_mean(
        tmp_path):
    """The features at the adaptation's start depend on how the patch embedding starts: a
    mean made with the colours' mean is refused by a patch_init=channels model (an encoder of
    the layout's 4 channels), and a file written before patch_init was recorded counts as
    made with the mean."""
    import transformers
    from safetensors.torch import load_file, save_file

    from .test_foundation import TINY

    directory = tmp_path / "dinov2-4ch"
    torch.manual_seed(5)
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY, mlp_ratio=2, num_channels=4)
                             ).save_pretrained(directory)
    mean = _public_mean(directory)                                   # patch_init=mean
    with pytest.raises(FoundationLoadError, match="patch_init=mean") as err:
        _build(directory, centre_features=True, patch_init="channels")
    assert "\n" not in str(err.value)
    # as written before the key existed: no patch_init in the metadata
    signature = {k: v for k, v in _build(directory).feature_signature.items()
                 if k != "patch_init"}
    save_file(load_file(str(directory / FEATURE_MEAN_FILE)), str(directory / FEATURE_MEAN_FILE),
              metadata={"format": "medfed-feature-mean/1", **signature})
    torch.testing.assert_close(_build(directory, centre_features=True).feature_mean.detach(),
                               mean, rtol=0, atol=0)
    with pytest.raises(FoundationLoadError, match="computed for another adaptation"):
        _build(directory, centre_features=True, patch_init="channels")
    _public_mean(directory, patch_init="channels")                  # made for it: read
    assert _build(directory, centre_features=True, patch_init="channels").feature_mean is not None


def test_a_mean_of_the_wrong_shape_is_refused(weights, tmp_path):
    directory = tmp_path / "dinov2"
    shutil.copytree(weights["dinov2"], directory)
    signature = _build(directory).feature_signature
    with pytest.raises(ValueError, match="pooled_dim"):
        save_feature_mean(directory, torch.zeros(3), signature)
    from safetensors.torch import save_file

    save_file({"mean": torch.zeros(3)}, str(directory / FEATURE_MEAN_FILE),
              metadata={"format": "medfed-feature-mean/1", **signature})
    with pytest.raises(FoundationLoadError, match=r"mean of shape \(3,\)"):
        _build(directory, centre_features=True)


def assert_never_trains_or_travels(foundation_dir, part: str, **options) -> None:
    """A model built with ``options`` holds one ``part`` parameter: not trainable, not among
    the arrays a site sends, and unchanged by a round of training."""
    model, task = build("foundation", {"weights": "dinov2", "num_channels": 4, "image_size": 32,
                                       **options},
                        "classification", {}, foundation_dir=foundation_dir)
    names = [n for n, _ in model.named_parameters() if n.endswith(part)]
    assert len(names) == 1 and names[0] not in trainable_keys(model)
    assert not any(k.endswith(part) for k in expected_arrays(model, []))
    before = dict(model.named_parameters())[names[0]].detach().clone()
    batch = _batch()
    data = [{"image": batch["image"][i], "present": batch["present"][i],
             "label": batch["label"][i]} for i in range(2)]
    Engine(task, torch.device("cpu")).fit(model, data, TrainConfig(local_epochs=1, lr=0.1,
                                                                   batch_size=2))
    assert torch.equal(dict(model.named_parameters())[names[0]], before)


@pytest.mark.parametrize("method", ["lora", "linear_probe", "full"])
def test_the_mean_never_trains_and_never_travels(weights, method):
    assert_never_trains_or_travels(weights["dinov2"].parent, "feature_mean", method=method,
                                   centre_features=True)


def test_the_mean_is_part_of_the_base_digest(weights, tmp_path):
    directory = tmp_path / "dinov2"
    shutil.copytree(weights["dinov2"], directory)
    first = base_digest(_build(directory, centre_features=True))
    assert base_digest(_build(directory, centre_features=True)) == first
    assert base_digest(_build(directory)) != first          # off: no mean in the base
    _public_mean(directory, seed=9)                          # another public mean
    assert base_digest(_build(directory, centre_features=True)) != first


@pytest.mark.parametrize("family", FAMILIES)
def test_the_export_carries_the_mean_and_reloads_it(weights, family, tmp_path):
    _, model = _pair(weights[family], method="lora", lora_rank=2)
    _randomise_trainable(model, seed=3)
    assert_export_carries(model.eval(), tmp_path / "export", "feature_mean", FEATURE_MEAN_FILE)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tokens", ["per_channel", "fused"])
def test_per_sample_gradients_stay_exact_with_centring(weights, family, tokens, tmp_path):
    directory = weights[family]
    if tokens == "fused":
        directory = tmp_path / family
        shutil.copytree(weights[family], directory)
        _public_mean(directory, channel_tokens="fused")
    torch.manual_seed(0)
    model = _build(directory, method="lora", lora_rank=2, centre_features=True,
                   channel_tokens=tokens).double().train()
    assert model.feature_mean.abs().sum() > 0 and model.dp_unsupported is None
    _randomise_trainable(model)
    assert_exact_per_sample(model, _batch(dtype=torch.float64))
