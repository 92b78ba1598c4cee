"""A pretraining objective that cannot start from the named foundation model, or a setting
the adapted model cannot take, is refused at config load, in one line, from the coordinator's
own directory's config.json - before any site builds anything."""

from __future__ import annotations

import pytest

from server.config import ConfigError, load_experiment

from ..models.test_foundation import _save
from ..models.test_foundation_objectives import _save_pair, _save_pair_with_big_tokenizer


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    for family in ("dinov2", "siglip", "sam"):
        _save(family, root / family)
    _save_pair("clip", root / "clip_pair")
    _save("clip", root / "clip_no_tokenizer")
    _save_pair_with_big_tokenizer(root / "clip_big_tokenizer")
    _save_pair("clip", root / "clip_broken_tokenizer")
    (root / "clip_broken_tokenizer" / "tokenizer.json").write_text("{not json")
    return root


def _load(encoders, weights: str, *overrides: str):
    return load_experiment(["model=foundation", f"model.options.weights={weights}",
                            f"model.foundation_dir={encoders}", "task.image_size=32",
                            *overrides])


@pytest.mark.parametrize("weights,overrides,message", [
    ("siglip", ["pretrain=mm_dino", "pretrain.num_rounds=1"], "needs an encoder with a CLS token"),
    ("sam", ["pretrain=mae", "pretrain.num_rounds=1"], "needs an encoder with a CLS token"),
    ("dinov2", ["pretrain=clip", "pretrain.num_rounds=1"], "needs a CLIPModel or SiglipModel"),
    ("clip_no_tokenizer", ["pretrain=clip", "pretrain.num_rounds=1"], "has none of tokenizer"),
    # the shipped default report length (128) against the pair's text positions, with the
    # key a user types (not the phase's task.options)
    ("clip_pair", ["pretrain=clip", "pretrain.num_rounds=1"],
     r"max_length=128 \(pretrain.options.max_length\) exceeds the 'clip_pair' text tower's "
     r"\d+ positions; set pretrain.options.max_length=\d+ or less"),
    # found at config load, not when the sites build the pair after the run has started
    ("clip_big_tokenizer", ["pretrain=clip", "pretrain.num_rounds=1",
                            "pretrain.options.max_length=16"],
     r"the tokenizer in 'clip_big_tokenizer' has 28 tokens but its text tower embeds 24; "
     r"the directory's tokenizer and weights do not belong together"),
    # a tokenizer file that does not parse: one line, not the parser's traceback
    ("clip_broken_tokenizer", ["pretrain=clip", "pretrain.num_rounds=1",
                               "pretrain.options.max_length=16"],
     r"the one in 'clip_broken_tokenizer' cannot be read \(\w+\): put the pair's own"),
    ("dinov2", ["pretrain=mae", "pretrain.num_rounds=1", "model.options.method=linear_probe"],
     "linear_probe"),
    ("dinov2", ["pretrain=mm_dino", "pretrain.num_rounds=1", "privacy=dpsgd"],
     "privacy.mechanism=dp-sgd refused"),
    ("dinov2", ["pretrain=mae", "pretrain.num_rounds=1", "model.options.channel_tokens=fused"],
     "needs channel_tokens=per_channel"),
    ("dinov2", ["model.options.channel_tokens=stacked"], "per_channel, fused"),
])
def test_objective_and_foundation_model_that_do_not_fit_fail_at_config_load(
        encoders, weights, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        _load(encoders, weights, *overrides)
    assert "\n" not in str(err.value)


def test_a_family_wide_dp_refusal_is_said_at_config_load_for_any_method(encoders, monkeypatch):
    """Config validation asks ``family_dp_refusal`` as the model does (no shipped family
    refuses DP-SGD as a whole, so this patches a reason in)."""
    from models.foundation.families import FAMILIES

    _load(encoders, "dinov2", "privacy=dpsgd")                  # LoRA: covered
    monkeypatch.setattr(FAMILIES["dinov2"], "dp_unsupported", "no per-sample rule at all")
    with pytest.raises(ConfigError, match="dp-sgd refused for a dinov2 foundation model: "
                                          "no per-sample rule at all"):
        _load(encoders, "dinov2", "privacy=dpsgd")


@pytest.mark.parametrize("weights,pretrain,extra", [
    ("dinov2", "mm_dino", []), ("dinov2", "mae", []), ("clip_pair", "clip", []),
    ("dinov2", "mae", ["privacy=dpsgd"]),        # MAE from a foundation model is DP-SGD ready
    ("dinov2", "mae", ["privacy=dpsgd", "model.options.method=dora"]),  # per-sample rules for
    ("dinov2", "mae", ["privacy=dpsgd", "model.options.method=ia3"]),   # DoRA's and IA3's vectors
    ("dinov2", "mm_dino", ["model.options.channel_tokens=fused"]),
])
def test_objectives_that_fit_compose(encoders, weights, pretrain, extra):
    cfg = _load(encoders, weights, f"pretrain={pretrain}", "pretrain.num_rounds=1",
                "pretrain.options.max_length=16" if pretrain == "clip" else "pretrain.lr=null",
                *extra)
    assert cfg.pretrain.objective == pretrain


def test_per_group_clipping_is_refused_when_only_the_head_trains(encoders):
    """A linear probe trains its head alone: nothing to split the clipping bound with."""
    probe = ("privacy=dpsgd", "privacy.head_clip_share=0.5")
    with pytest.raises(ConfigError, match=r"only the head trains here "
                                          r"\(model.options.method=linear_probe\)"):
        _load(encoders, "dinov2", *probe, "model.options.method=linear_probe")
    _load(encoders, "dinov2", *probe, "model.options.method=lora")
