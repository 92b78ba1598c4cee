"""A pretrain -> fine-tune run hands phase 1's backbone to phase 2 after all of pretraining
(``models.tasks.backbone_weights``, then ``load_backbone``); a backbone phase 2 cannot load
is refused at config load, on the meta device, by those same functions, in one line naming
both phases and the first weight that does not fit. It used to fail at the coordinator
once pretraining had run to the end."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from models import TASKS
from models.mae import MAEConfig, MAETask
from models.tasks import BackboneMisfit, backbone_weights, build
from server.config import ConfigError, ExperimentConfig, load_experiment

TWO_PHASE = ("experiment=pretrain_finetune", "model=mmvit_tiny")
PHASES = "pretrain.objective=mm_dino -> task=classification (model=mmvit): "

# Every shipped phase-1 objective with every shipped task its layout serves, on the shipped
# two-phase experiment (conf/experiment/pretrain_finetune.yaml: mmvit_small); the README's
# two-phase commands; every ViT size. CLIP needs reports, which ct_volume has none of.
LAYOUT = {"chest3": ["data/layout=chest_xray"], "ct3": ["data/layout=ct_volume"]}
SHIPPED = [[f"pretrain={p}", f"task={t}", *LAYOUT.get(t, [])]
           for p in ("mm_dino", "mae", "clip", "clip_chest")
           for t in ("glioma3", "findings3", "lesion_seg", "chest3", "ct3")
           if not (p.startswith("clip") and t == "ct3")] + [
    ["pretrain=mae", "task.options.mode=lora", "task.options.label_fraction=0.1",
     "task.evaluate_missing=true"],
    ["pretrain=mm_dino", "task.options.mode=linear_probe", "model=mmvit_base"],
    ["pretrain=mae", "experiment=ct3"],
    ["pretrain=clip_chest", "experiment=smoke", "federation=sim3", "data/layout=chest_xray",
     "task=chest3"],
]


@pytest.mark.parametrize("overrides", SHIPPED, ids=lambda o: " ".join(o))
def test_shipped_two_phase_configurations_hand_their_backbone_over(overrides):
    cfg = load_experiment(["experiment=pretrain_finetune", *overrides])
    assert cfg.pretrain.objective is not None


def _phase1_with(monkeypatch, **options):
    """Phase 1 built with other backbone options than phase 2: what a divergence between
    the two phases' models looks like (both phases share ``model`` today)."""
    original = ExperimentConfig.pretrain_phase

    def pretrain_phase(self):
        phase = original(self)
        return replace(phase, model=replace(phase.model, options={**phase.model.options,
                                                                  **options}))

    monkeypatch.setattr(ExperimentConfig, "pretrain_phase", pretrain_phase)


def _refused(*overrides: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_experiment([*TWO_PHASE, *overrides])
    message = str(err.value)
    assert "\n" not in message, message
    return message


def test_a_wider_pretrained_backbone_is_refused_naming_the_first_weight(monkeypatch):
    _phase1_with(monkeypatch, dim=64)
    assert _refused() == (
        PHASES + "fine-tuning cannot load the pretrained backbone (after all of pretraining, "
        "the coordinator would refuse it): patch_embed.0.weight is [64, 256] after "
        "pretraining and [32, 256] in fine-tuning (24 weights unfit); both phases must build "
        "the same backbone")


def test_a_shallower_pretrained_backbone_is_refused_a_deeper_one_is_not(monkeypatch):
    """The hand-over's own rule, not a stricter one: every fine-tuning weight must come
    with its shape; extra pretrained blocks are left out (phase 2 takes the first ones)."""
    _phase1_with(monkeypatch, depth=1)
    message = _refused("model.options.depth=2")
    assert message.startswith(PHASES + "fine-tuning cannot load the pretrained backbone")
    assert "blocks.1.norm1.weight is absent after pretraining and [32] in fine-tuning" \
        in message, message
    _phase1_with(monkeypatch, depth=3)
    assert load_experiment([*TWO_PHASE, "model.options.depth=2"]).model.options["depth"] == 2


@pytest.mark.parametrize("phase1_depth,fits", [(1, False), (3, True)])
def test_the_verdict_is_the_real_hand_overs(phase1_depth, fits):
    """Real weights, as the coordinator hands them over after phase 1: the same verdict."""
    options = load_experiment([*TWO_PHASE, "model.options.depth=2"]).model_options()
    torch.manual_seed(0)
    phase1, _ = build("mmvit", {**options, "depth": phase1_depth}, "mm_dino", {"num_classes": 3})
    state = backbone_weights(phase1.state_dict())
    if fits:
        model, _ = build("mmvit", options, "classification", {}, backbone_state=state)
        assert torch.equal(model.state_dict()["blocks.1.norm1.weight"],
                           state["blocks.1.norm1.weight"])
    else:
        with pytest.raises(BackboneMisfit, match="blocks.1.norm1.weight is missing"):
            build("mmvit", options, "classification", {}, backbone_state=state)


class _ReEmbeddingMAE(MAETask):
    """An objective that changes the backbone it wraps (here: patches embedded at another
    size), as objectives adapt backbones (``take_companions``, ``head = None``)."""

    def wrap(self, backbone):
        backbone.patch_embed[0] = nn.Linear(64, backbone.config.dim)
        return super().wrap(backbone)


class _Unnamed(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner


class _HiddenBackboneMAE(MAETask):
    """An objective whose model holds the backbone under another name than ``backbone``."""

    def wrap(self, backbone):
        return _Unnamed(super().wrap(backbone))


@pytest.mark.parametrize("objective,message", [
    (_ReEmbeddingMAE, "patch_embed.0.weight is [32, 64] after pretraining and [32, 256] in "
                      "fine-tuning (1 weight unfit)"),
    (_HiddenBackboneMAE, "the pretrained model has no backbone.* weights; fine-tuning has "
                         "nothing to start from"),
])
def test_an_objective_that_changes_the_backbone_is_refused(monkeypatch, objective, message):
    monkeypatch.setitem(TASKS._entries, "_test_objective", (MAEConfig, objective))
    monkeypatch.setitem(TASKS._resources, "_test_objective", ())
    refusal = _refused("pretrain=mae", "pretrain.objective=_test_objective",
                       "tracking.log_models=false")         # nothing exported: the hand-over
    assert refusal.startswith("pretrain.objective=_test_objective -> task=classification "
                              "(model=mmvit): "), refusal
    assert message in refusal, refusal
