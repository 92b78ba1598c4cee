"""Evaluators: what a task accumulates over a split and what it reports for it.

A task's ``evaluator()`` returns a fresh ``Evaluator``; the one engine
(``client/engine.py``) owns the loop - device, autocast, ``no_grad`` - and calls
``update(model, batch)`` per batch and ``compute()`` once at the end. Whatever a metric needs
across batches (probabilities for AUROC, embeddings for retrieval recall) stays inside the
evaluator; what comes out is a ``SplitMetrics``, the form that crosses the wire and pools.

This module holds the protocol and the two head-task evaluators (multi-class and
multi-label); objectives with their own evaluation (CLIP, MAE, segmentation) define theirs
next to their loss.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import SplitMetrics, confusion_matrix, macro_auroc, multilabel_auroc, \
    multilabel_confusions


class Evaluator(Protocol):
    """Accumulates one split, batch by batch, then reports it."""

    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        """Score one batch (already on the model's device, under the engine's autocast)."""

    def compute(self) -> SplitMetrics:
        """The split's metrics; over no batches at all: ``n = 0`` and the same fields (a site
        with an empty split still answers with the task's full key set)."""


def to_numpy(x: Tensor) -> np.ndarray:
    """Float tensors as float32 on the CPU (the precision every metric was defined on)."""
    return (x.float() if x.is_floating_point() else x).detach().cpu().numpy()


class _Batches:
    """Per-batch arrays by name, concatenated once at ``compute`` (losses are averaged over
    the concatenation, as the engine did before evaluators: same float32 figures)."""

    def __init__(self, **widths: int):
        self.widths = widths
        self.parts: dict[str, list[np.ndarray]] = {k: [] for k in widths}

    def add(self, **arrays: Tensor) -> None:
        for name, value in arrays.items():
            self.parts[name].append(to_numpy(value))

    def get(self, name: str, dtype=np.float32) -> np.ndarray:
        if not self.parts[name]:
            return np.zeros((0, *([self.widths[name]] if self.widths[name] else [])), dtype)
        return np.concatenate(self.parts[name])


class ClassificationEvaluator:
    """Multi-class: mean cross-entropy, the confusion matrix (argmax of the softmax) and
    one-vs-rest macro AUROC where at least one class has both outcomes."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.seen = _Batches(loss=0, probs=num_classes, label=0)

    @torch.no_grad()
    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        logits = model(batch["image"], batch["present"]).float()
        loss = F.cross_entropy(logits, batch["label"], reduction="none")
        self.seen.add(loss=loss, probs=logits.softmax(1), label=batch["label"])

    def compute(self) -> SplitMetrics:
        losses, probs = self.seen.get("loss"), self.seen.get("probs")
        labels = self.seen.get("label", np.int64)
        cm = confusion_matrix(labels, probs.argmax(1), self.num_classes)
        return SplitMetrics(n=len(labels), loss=float(losses.mean()) if len(losses) else 0.0,
                            confusion=cm, auroc=macro_auroc(labels, probs) if len(labels) else None)


class MultiLabelEvaluator:
    """Multi-label: binary cross-entropy averaged over findings, one binary confusion per
    finding at ``threshold``, and AUROC averaged over findings that have both outcomes.

    ``targets`` decodes the bitmask labels (``models.tasks.finding_targets``)."""

    def __init__(self, num_findings: int, threshold: float, targets):
        self.num_findings, self.threshold, self.targets = num_findings, threshold, targets
        self.seen = _Batches(loss=0, probs=num_findings, label=0)

    @torch.no_grad()
    def update(self, model: nn.Module, batch: dict[str, Tensor]) -> None:
        logits = model(batch["image"], batch["present"]).float()
        targets = self.targets(batch["label"], self.num_findings).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1)
        self.seen.add(loss=loss, probs=logits.sigmoid(), label=batch["label"])

    def compute(self) -> SplitMetrics:
        losses, probs = self.seen.get("loss"), self.seen.get("probs")
        targets = self.targets(self.seen.get("label", np.int64), self.num_findings)
        cms = multilabel_confusions(targets, probs, self.threshold)
        return SplitMetrics(n=len(losses), loss=float(losses.mean()) if len(losses) else 0.0,
                            finding_confusions=cms,
                            auroc=multilabel_auroc(targets, probs) if len(losses) else None)
