"""A model/task combination the sites cannot build, or the exporter cannot serve, is refused
at config load in one line naming what to change - before any site builds it (it used to
pass config load and fail at every site in the preflight or round 1, or at export after
round 1, with the cause only in the sites' logs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import MODELS
from models.vit import ViTConfig
from server.config import ConfigError, load_experiment

from ..models.test_foundation import _save

PLAIN = "_test_plain_backbone"


class _PlainBackbone(nn.Module):
    """A new backbone as a newcomer might register one: a class head, and none of what
    MultiModalViT offers (blocks with LoRA's projections, a token layout, a config)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.features = nn.Linear(config.img_size, config.dim)
        self.head = nn.Linear(config.dim, config.num_classes)

    def forward(self, images, present):
        return self.head(self.features(images.mean(dim=(1, 2))))


@pytest.fixture(autouse=True)
def _plain_backbone(monkeypatch):
    """Registered for this module's tests only: left in ``MODELS``, it showed in other
    tests' lists of registered names (test_vit's unknown-model refusal failed after it)."""
    monkeypatch.setitem(MODELS._entries, PLAIN, (ViTConfig, _PlainBackbone))
    monkeypatch.setitem(MODELS._resources, PLAIN, ())


def _plain(*overrides: str):
    return load_experiment(["model=mmvit_tiny", f"model.name={PLAIN}", "experiment=smoke",
                            *overrides])


def _refused(load, *overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load(*overrides)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_a_backbone_without_loras_projections_is_refused_for_mode_lora():
    message = _refused(_plain, "task.options.mode=lora")
    assert message.startswith(f"model={PLAIN} with task=classification "
                              "(task.options.mode=lora): every site's build would fail")
    assert "_PlainBackbone has none" in message and "use mode=full" in message


def test_a_backbone_that_is_no_multimodal_vit_is_refused_for_segmentation():
    message = _refused(_plain, "task=lesion_seg")
    assert "the segmentation decoder (UNETR) is built on a MultiModalViT, not a " \
           "_PlainBackbone" in message


def test_a_pretraining_objective_the_backbone_cannot_carry_is_refused_in_its_phase():
    message = _refused(_plain, "pretrain=mae", "pretrain.num_rounds=1")
    assert message.startswith(f"pretraining phase: model={PLAIN} with task=mae: every site's "
                              "build would fail (AttributeError:"), message


def test_a_model_the_exporter_cannot_serve_is_refused_unless_no_model_is_registered():
    message = _refused(_plain)
    assert "the model cannot be exported for serving" in message
    assert "no multi-modal ViT backbone" in message and "tracking.log_models=false" in message
    cfg = _plain("tracking.log_models=false")        # nothing is exported: it may train
    assert cfg.model.name == PLAIN


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    _save("dinov2", root / "dinov2")
    return root


def _foundation(encoders, *overrides: str):
    return load_experiment(["model=foundation", "model.options.weights=dinov2",
                            f"model.foundation_dir={encoders}", "task.image_size=32",
                            "experiment=smoke", *overrides])


def test_shipped_foundation_model_with_the_vits_lora_mode_is_refused_at_load(encoders):
    """The walkthrough's case on a shipped model: peft's NoMatchingPeftModuleError at every
    site before; the one line now names the option and the fix."""
    message = _refused(lambda *o: _foundation(encoders, *o), "task.options.mode=lora")
    assert "(task.options.mode=lora): every site's build would fail" in message
    assert "FoundationBackbone has none" in message and "use mode=full" in message
    assert _foundation(encoders).task.options["mode"] == "full"       # the fix loads


def test_shipped_foundation_model_with_the_segmentation_task_is_refused_at_load(encoders):
    message = _refused(lambda *o: _foundation(encoders, *o), "task=lesion_seg")
    assert "not a FoundationBackbone: use model=mmvit, or model=foundation_swin" in message


def test_config_load_builds_on_the_meta_device(encoders, monkeypatch):
    """The coordinator's check allocates nothing and loads no weights (a foundation model's
    weight files must exist, as before; on the meta device its loaders read config files
    only)."""
    built = []
    original = MODELS.build

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        built.append({t.device.type for t in model.state_dict().values()})
        return model

    monkeypatch.setattr(MODELS, "build", spy)
    _foundation(encoders)
    _plain("tracking.log_models=false")
    assert built and all(devices == {"meta"} for devices in built), built
    assert torch.get_default_device().type == "cpu"
