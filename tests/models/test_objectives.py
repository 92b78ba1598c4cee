"""The contract every registered task/objective passes (STYLE.md): builds from a tiny config,
trains on CPU with a finite, decreasing loss, round-trips its state, runs in 3D, and - when it
declares itself DP-ready - has per-sample gradients that sum to the batch gradient."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch
from opacus import GradSampleModule

from client.privacy.persample import PerSampleClipper
from models import TASKS
from models.mae import MultiModalMAE, random_masking
from models.tasks import MultiLabelTask, batch_coupling, build, finding_targets, frozen_keys
from models.segmentation import SegmentationTask, dice_ce_loss

TINY = {"dim": 32, "depth": 1, "heads": 2, "img_size": 32, "patch_size": 8, "num_classes": 3,
        "sequence_fusion": True}
TINY_3D = TINY | {"spatial_dims": 3, "img_size": 32, "patch_size": 16}
# Every task the project registers (tests may register throwaway ones), plus the
# fine-tuning modes that change what trains.
PROJECT_TASKS = [n for n in TASKS.names() if TASKS.factory(n).__module__.startswith("models.")]
CASES = [(name, {}) for name in PROJECT_TASKS] + [
    ("classification", {"mode": "linear_probe"}), ("classification", {"mode": "lora"})]


def _batch(b: int = 6, size: int = 32, dims: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    present = torch.ones(b, 4, dtype=torch.bool)
    present[0, 1] = False
    present[1, 2:] = False
    image = torch.randn(b, 4, *([size] * dims), generator=g)
    image[~present] = 0
    label = torch.arange(b) % 3
    label[::3] = -1                                  # unlabelled studies (pretraining only)
    return {"image": image, "present": present, "label": label}


def _for(task, batch: dict) -> dict:
    needs = task.data_needs
    if needs.reports is not None:                    # image-report objectives (CLIP)
        b = batch["image"].shape[0]
        texts = [f"{1 + i}.{i} cm lesion in the {('right', 'left')[i % 2]} "
                 f"{('frontal', 'parietal', 'occipital')[i % 3]} lobe, "
                 f"{('ring', 'no', 'faint patchy')[i % 3]} enhancement." for i in range(b)]
        has_report = torch.ones(b, dtype=torch.bool)
        if b > 2:
            has_report[-1] = False                   # a study without a report is left out
        batch = batch | task.tokenize(texts) | {"has_report": has_report}
    if needs.masks:                                  # segmentation: a square lesion each
        b, size = batch["image"].shape[0], batch["image"].shape[-1]
        mask = torch.zeros(b, *batch["image"].shape[2:], dtype=torch.long)
        for i in range(b):
            lo = 2 + i % (size // 4)
            mask[i, lo:lo + size // 4, lo:lo + size // 4] = 1
        has_mask = torch.ones(b, dtype=torch.bool)
        has_mask[-1] = False                         # a study without a mask is left out
        batch = batch | {"mask": mask, "has_mask": has_mask}
    if needs.unlabelled:
        return batch
    if needs.multi_label:                            # bitmask of findings: 0 = none found
        return batch | {"label": (torch.arange(batch["label"].shape[0]) * 5) % 8}
    return batch | {"label": batch["label"].clamp(min=0)}


def _loss(task, model, batch, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)                          # same crops and masks on every call
    return task.step(model, batch).loss


@pytest.mark.parametrize("name, options", CASES, ids=lambda c: str(c))
def test_trains_with_a_finite_decreasing_loss(name, options):
    torch.manual_seed(0)
    model, task = build("mmvit", TINY, name, options)
    batch = _for(task, _batch())
    assert_trains(model, lambda: _loss(task, model, batch), 8, f"{name} {options}",
                  after_step=lambda: task.after_step(model))   # every task declares it


def assert_trains(model, loss, steps: int, label: str, after_step=lambda: None) -> None:
    """``steps`` AdamW steps on ``loss()``: finite, every trainable weight's gradient only
    (a frozen one gets none), and the last loss below the first."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=3e-3)
    losses = []
    for _ in range(steps):
        value = loss()
        assert torch.isfinite(value), f"{label}: loss {value}"
        optimizer.zero_grad()
        value.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
        optimizer.step()
        after_step()
        losses.append(value.item())
    assert losses[-1] < losses[0], f"{label}: loss did not decrease: {losses}"


@pytest.mark.parametrize("name", PROJECT_TASKS)
def test_step_views_bound_the_tokens_every_transformer_pass_of_a_step_reads(name, monkeypatch):
    """The site's step-token cap is ``batch x sum(tokens of step_views)``: counted here as
    the tokens entering every transformer pass (encoder, MAE decoder, DINO teacher; TINY
    is one block deep). Equal where every study passes every time; fewer where a study
    can skip a pass (CLIP: no report; MM-DINOv2: labelled, no teacher pseudo-label pass -
    exact in tests/models/test_dino.py)."""
    from models import vit

    read, forward = [], vit.Block.forward

    def counted(self, x, *args, **kwargs):
        read.append(x.shape[0] * x.shape[1])
        return forward(self, x, *args, **kwargs)
    monkeypatch.setattr(vit.Block, "forward", counted)
    torch.manual_seed(0)
    model, task = build("mmvit", TINY, name, {})
    layout = model.backbone.layout if hasattr(model, "backbone") else model.layout
    batch = _for(task, _batch())
    task.step(model, batch)
    bound = 6 * sum(layout.tokens(side) for side in task.step_views(layout))
    if "input_ids" in batch:                  # a text tower reads each report padded to it
        assert batch["input_ids"].shape[1] == task.step_text_tokens() > 0
    else:
        assert task.step_text_tokens() == 0
    assert 0 < sum(read) <= bound
    assert sum(read) == bound or name in ("clip", "mm_dino")


@pytest.mark.parametrize("name, options", CASES, ids=lambda c: str(c))
def test_state_dict_round_trips(name, options):
    torch.manual_seed(0)
    model, task = build("mmvit", TINY, name, options)
    torch.manual_seed(1)
    other, other_task = build("mmvit", TINY, name, options)
    other.load_state_dict(model.state_dict())
    batch = _for(task, _batch())
    model.eval(), other.eval()
    torch.testing.assert_close(_loss(task, model, batch), _loss(other_task, other, batch))
    _loss(task, model, batch).backward()
    task.after_step(model)
    kept = task.site_state()
    if kept is not None:                     # site-only state (DINO's teacher and centres)
        _, restored = build("mmvit", TINY, name, options)
        restored.load_site_state(other, kept)
        torch.testing.assert_close(_loss(task, model, batch), _loss(restored, other, batch))
    # Frozen weights are exactly the ones that do not train.
    assert set(frozen_keys(model)) == {n for n, p in model.named_parameters() if not p.requires_grad}


@pytest.mark.parametrize("name", PROJECT_TASKS)
def test_evaluator_reports_one_poolable_key_set_with_or_without_data(name):
    """The evaluation half of the contract: ``evaluator()`` accumulates batches and computes
    one ``SplitMetrics``; an empty split answers with the same wire keys (Flower requires
    every site's reply to have the same keys)."""
    from protocol.metrics import from_record, to_record

    torch.manual_seed(0)
    model, task = build("mmvit", TINY, name, {})
    batch = _for(task, _batch())
    if not getattr(task, "multi_label", False):
        batch["label"] = batch["label"].clamp(min=0)     # evaluation splits are labelled
    model.eval()
    evaluator = task.evaluator()
    halves = [{k: v[:3] for k, v in batch.items()}, {k: v[3:] for k, v in batch.items()}]
    for half in halves:
        evaluator.update(model, half)
    metrics = evaluator.compute()
    empty = task.evaluator().compute()
    assert metrics.n == 6 and empty.n == 0
    assert np.isfinite(metrics.loss), f"{name}: loss {metrics.loss}"
    assert set(to_record(metrics, "val")) == set(to_record(empty, "val"))
    assert from_record(to_record(metrics, "val"), "val") == metrics
    assert task.evaluator().compute() == empty             # a fresh evaluator per split


@pytest.mark.parametrize("name", PROJECT_TASKS)
def test_three_dimensional_input(name):
    torch.manual_seed(0)
    model, task = build("mmvit", TINY_3D, name, {})
    batch = _for(task, _batch(b=3, size=32, dims=3))
    loss = _loss(task, model, batch)
    loss.backward()
    assert torch.isfinite(loss)


def _per_sample_losses(model, task, batch):
    """Per-sample losses with the objective's randomness fixed for the whole batch."""
    if isinstance(model, MultiModalMAE):
        masked = random_masking(batch["present"], model.backbone.config.patches_per_sequence,
                                0.5, 0.5, torch.Generator().manual_seed(3))
        return model.forward_loss(batch["image"], batch["present"], masked=masked)[0]
    logits = model(batch["image"], batch["present"])
    if isinstance(task, SegmentationTask):           # studies without a mask add nothing
        return dice_ce_loss(logits, batch["mask"]) * batch["has_mask"]
    if isinstance(task, MultiLabelTask):
        targets = finding_targets(batch["label"], logits.shape[1]).to(logits.dtype)
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits, targets, reduction="none").mean(1)
    return torch.nn.functional.cross_entropy(logits, batch["label"], reduction="none")


DP_READY = [(n, o) for n, o in CASES if batch_coupling(n) is None]


def test_every_objective_is_covered():
    assert set(PROJECT_TASKS) == {"classification", "clip", "mae", "mm_dino", "multilabel",
                                  "segmentation"}


WITH_LABEL_FRACTION = [n for n in PROJECT_TASKS
                       if "label_fraction" in {f.name for f in fields(type(TASKS.config(n)))}]


def test_the_semi_supervised_objectives_take_a_label_fraction():
    assert {"classification", "mm_dino"} <= set(WITH_LABEL_FRACTION)


@pytest.mark.parametrize("name", WITH_LABEL_FRACTION)
def test_label_fraction_reaches_what_the_site_reads(name):
    # the site hides labels by ``task.config.label_fraction``; MM-DINOv2 once kept its own
    # option and the site read the default 1.0: pretraining saw every label
    task = TASKS.build(name, {"label_fraction": 0.25})
    assert task.config.label_fraction == 0.25


def test_dp_ready_objectives_are_declared():
    assert {n for n, _ in DP_READY} == {"classification", "mae", "multilabel", "segmentation"}
    assert "batch" in batch_coupling("mm_dino")


@pytest.mark.parametrize("name, options", DP_READY, ids=lambda c: str(c))
def test_dp_ready_per_sample_gradients_sum_to_the_batch_gradient(name, options):
    """Opacus' per-sample gradients and our one-pass clipper, against the batch gradient."""
    torch.manual_seed(0)
    model, task = build("mmvit", TINY, name, options)
    model = model.double()
    batch = _for(task, _batch(b=5))
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    if not isinstance(model, MultiModalMAE):         # the task's loss is their mean
        out = task.step(model, batch)
        torch.testing.assert_close(out.loss.double() * out.n,
                                   _per_sample_losses(model, task, batch).sum())

    _per_sample_losses(model, task, batch).sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    # Opacus' full backward hooks refuse MONAI's in-place activations (UNETR's decoder): there
    # the clipper is checked against the batch gradient and one pass per sample only (below).
    if not isinstance(task, SegmentationTask):
        gsm = GradSampleModule(model, loss_reduction="sum", strict=False)
        _per_sample_losses(gsm._module, task, batch).sum().backward()
        for n, p in gsm._module.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p.grad_sample.sum(0), reference[n], atol=1e-9,
                                           rtol=1e-7, msg=f"Opacus per-sample sum of {n}")
        gsm._close()
        model.zero_grad(set_to_none=True)

    clipper = PerSampleClipper(model, max_grad_norm=1e12)     # no clipping: exact sum
    with clipper.capture():
        _per_sample_losses(model, task, batch).sum().backward()
    grads, norms = clipper.clipped_sum()
    by_name = {id(p): n for n, p in model.named_parameters()}
    assert {by_name[id(p)] for p in grads} == set(reference)
    for p, g in grads.items():
        torch.testing.assert_close(g, reference[by_name[id(p)]], atol=1e-9, rtol=1e-7)
    # Each per-sample norm against that sample's own backward pass (same masks).
    expected = []
    for i in range(5):
        model.zero_grad(set_to_none=True)
        _per_sample_losses(model, task, batch)[i].backward()
        expected.append(torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()
                                       if p.requires_grad and p.grad is not None)))
    torch.testing.assert_close(norms, torch.stack(expected), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("name", ["classification", "multilabel"])
@pytest.mark.parametrize("options, message", [
    ({"mode": "adapters"}, "unknown fine-tuning mode 'adapters'"),
    ({"lora_rank": 0}, "lora_rank must be >= 1"),
    ({"label_fraction": 0.0}, r"label_fraction must be in \(0, 1\]")])
def test_head_tasks_refuse_bad_fine_tuning_options(name, options, message):
    with pytest.raises(ValueError, match=message):
        TASKS.build(name, options)


def test_multilabel_refuses_a_threshold_outside_zero_one():
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        TASKS.build("multilabel", {"threshold": 1.0})
