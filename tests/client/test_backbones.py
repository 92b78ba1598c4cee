"""The contract every registered backbone (``models.MODELS``) passes, built tiny with the task
a site trains it with: it has every member of ``models.backbone.Backbone`` (and of
``TokenBackbone`` where declared), a forward and backward pass of the task's step, a finite
loss that decreases, its state round-trips, it is servable (``models.serving.servable``) as
the trained model, the site sizes it before building it (``client.queries.step_size``: on
the meta device, at least what autograd keeps) and, where the site's DP-SGD rule admits it,
its per-sample gradients are exact. The task contract is ``tests/models/test_objectives.py``.

Here, not under ``tests/models``: the size estimate and the DP admission are the site's
(``client``), which ``models`` must not import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from client.privacy.dpsgd import clipping_refusal
from client.queries import QueryLimits, step_size
from models import MODELS
from models.backbone import Backbone, TokenBackbone, implements, missing_members
from models.checkpointing import counting_saved_activations
from models.foundation import FOUNDATION_DIR, dp_refusal
from models.serving import ExportedClassifier, ExportedSegmenter, servable
from models.tasks import batch_coupling, build

from ..models.test_foundation import assert_clipped_sum, looped_per_sample
from ..models.test_foundation_swin import _randomise_trainable
from ..models.test_objectives import _batch, _for, assert_trains
from .test_foundation_site import save_dinov2


def _save_swin(directory) -> None:
    from monai.networks.nets import SwinUNETR

    from models.foundation.monai_nets import SWIN_UNETR_TYPE, save_monai

    from ..models.test_foundation_swin import SWIN2D

    torch.manual_seed(0)
    save_monai(SwinUNETR(**SWIN2D), SWIN2D, directory, model_type=SWIN_UNETR_TYPE)


@dataclass(frozen=True)
class Case:
    options: dict
    task: str                       # the task a site trains this backbone with
    size: int                       # the input's side (the backbone's image size)
    dp: bool                        # declared: the site's DP-SGD rule admits it
    tokens: bool                    # declared: a TokenBackbone (objectives build on its tokens)
    save: Callable | None = None    # saves the pretrained directory its factory reads


# One tiny case per registered backbone (the smallest configs the family tests use).
# foundation_swin is the segmentation task's whole network (server/config/validation.py
# refuses it with any other task); "foundation" is one family here, every family in
# tests/models/test_foundation*.py.
BACKBONES = {
    "mmvit": Case({"dim": 32, "depth": 1, "heads": 2, "img_size": 32, "patch_size": 8,
                   "num_classes": 3}, "classification", 32, dp=True, tokens=True),
    "foundation": Case({"weights": "dino", "num_channels": 4, "image_size": 32,
                        "lora_rank": 2}, "classification", 32, dp=True, tokens=True,
                   save=save_dinov2),
    "foundation_swin": Case({"weights": "swin", "num_channels": 4, "image_size": 64,
                             "spatial_dims": 2, "lora_rank": 2}, "segmentation", 64, dp=True,
                            tokens=False, save=_save_swin),
}
# Every backbone the project registers (tests may register throwaway ones).
PROJECT_BACKBONES = [n for n in MODELS.names()
                     if MODELS.factory(n).__module__.startswith("models.")]


def test_every_registered_backbone_has_a_case():
    """A new backbone registered in ``models.MODELS`` fails here until it has a case, and a
    case that needs a pretrained directory says how to save one."""
    assert set(BACKBONES) == set(PROJECT_BACKBONES)
    needs_directory = {n for n in PROJECT_BACKBONES if FOUNDATION_DIR in MODELS.resources(n)}
    assert needs_directory == {n for n, case in BACKBONES.items() if case.save is not None}


@pytest.fixture(scope="module")
def foundation_dir(tmp_path_factory):
    """The site's directory of pretrained encoders: one tiny directory per case needing one."""
    root = tmp_path_factory.mktemp("foundation")
    for name, case in BACKBONES.items():
        if case.save is not None:
            case.save(root / case.options["weights"])
    return root


def _build(name: str, foundation_dir, seed: int = 0):
    case = BACKBONES[name]
    torch.manual_seed(seed)
    return build(name, case.options, case.task, {}, foundation_dir=foundation_dir)


def _inputs(name: str, task, b: int = 4, dtype=torch.float32) -> dict:
    batch = _for(task, _batch(b=b, size=BACKBONES[name].size))
    if "has_mask" in batch:
        batch["has_mask"][:] = True           # every study adds to the loss
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("name", PROJECT_BACKBONES)
def test_it_has_every_member_of_the_backbone_contract(name, foundation_dir):
    """As built by the registry, every member of ``Backbone`` (``TokenBackbone`` where the
    case declares it) is there and reads without error: the tasks, the site's size check,
    weight loading and export read them without a default. ``implements`` (how the site finds
    the token backbone) agrees with the declaration."""
    case = BACKBONES[name]
    torch.manual_seed(0)
    backbone = MODELS.build(name, case.options, foundation_dir=foundation_dir)
    assert isinstance(backbone, Backbone)
    assert missing_members(backbone, Backbone) == []
    assert implements(backbone, TokenBackbone) == case.tokens
    if case.tokens:
        assert missing_members(backbone, TokenBackbone) == []
    assert tuple(backbone.input_shape) == tuple(_batch(size=case.size)["image"].shape[1:])


@pytest.mark.parametrize("name", PROJECT_BACKBONES)
def test_trains_with_a_finite_decreasing_loss(name, foundation_dir):
    model, task = _build(name, foundation_dir)
    batch = _inputs(name, task)
    assert_trains(model, lambda: task.step(model.train(), batch).loss, 3, name)


@pytest.mark.parametrize("name", PROJECT_BACKBONES)
def test_state_round_trips_and_the_served_model_is_the_trained_one(name, foundation_dir):
    model, task = _build(name, foundation_dir)
    _randomise_trainable(model)
    other, _ = _build(name, foundation_dir, seed=1)
    other.load_state_dict(model.state_dict())
    batch = _inputs(name, task, b=2)
    with torch.no_grad():
        torch.testing.assert_close(task.step(model.eval(), batch).loss,
                                   task.step(other.eval(), batch).loss)
        logits = model(batch["image"], batch["present"])
        exported = servable(model).eval()
        assert exported.input_shape == tuple(batch["image"].shape[1:])
        served = exported(batch["image"])          # presence read off the all-zero channels
    if BACKBONES[name].task == "segmentation":
        assert isinstance(exported, ExportedSegmenter)
        expected = logits.softmax(1)
    else:
        assert isinstance(exported, ExportedClassifier)
        expected = logits.softmax(-1)
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", PROJECT_BACKBONES)
def test_the_site_sizes_it_before_building_it(name, foundation_dir):
    """On the meta device, the size check counts the real build's parameters and buffers and
    at least the activations autograd keeps in a training step (else a job would get past the
    operator's cap with more); the default limits admit the tiny model."""
    b = 4

    def job():
        return _build(name, foundation_dir)
    size = step_size(job, batch=b)
    QueryLimits().check_model_size(job, batch=b, per_sample=BACKBONES[name].dp)
    model, task = job()
    assert size.parameters == sum(t.numel() for t in (*model.parameters(), *model.buffers()))
    with counting_saved_activations(model.train()) as saved:
        task.step(model, _inputs(name, task, b=b))
    assert 0 < saved["bytes"] / 4 <= size.activations          # float32 values


@pytest.mark.parametrize("name", PROJECT_BACKBONES)
def test_dp_sgd_admission_is_as_declared_and_per_sample_gradients_are_exact(
        name, foundation_dir):
    """The site's DP-SGD rule (``client.foundation.check_site_model``: the backbone's own
    refusal, then the exact clipper's) agrees with the case's declaration; where it admits
    the backbone, summed per-sample gradients are the batch gradient and the clipper's
    clipped sum is that of one backward pass per sample (float64)."""
    model, task = _build(name, foundation_dir)
    case = BACKBONES[name]
    refusal = batch_coupling(case.task) or dp_refusal(model) or clipping_refusal(model)
    assert (refusal is None) == case.dp, refusal
    if refusal is not None:
        return
    model = model.double().train()
    _randomise_trainable(model)
    batch = _inputs(name, task, b=2, dtype=torch.float64)

    def summed(b):
        out = task.step(model, b)
        return out.loss * out.n
    individual, norms = looped_per_sample(model, summed, batch, 2)
    summed(batch).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad.abs().max() > 0, n
            torch.testing.assert_close(individual[0][n] + individual[1][n], p.grad,
                                       rtol=0, atol=1e-10, msg=n)
    model.zero_grad(set_to_none=True)
    assert_clipped_sum(model, summed, batch, individual, norms, float(norms.mean()), 1e-10)
