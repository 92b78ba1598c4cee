"""Tasks: what a training step computes. The one training engine (client/engine.py) calls
``step`` and ``predict``; tasks never own a loop, an optimizer or a device."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import classification_metrics, confusion_matrix
from .registry import MODELS, TASKS
from .vit import MultiModalViT, ViTConfig


@dataclass
class StepOutput:
    loss: Tensor                       # scalar, mean over the n samples it covers
    n: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ClassificationConfig:
    num_classes: int = 3
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")


def batch_coupling(task_name: str) -> str | None:
    """Why a task's loss couples the samples of a batch (so per-sample clipping would not bound
    one sample's influence and DP-SGD's accounting would not hold), or None if it does not.

    Tasks declare it as a class attribute ``batch_coupling``; a task that does not declare it
    is treated as coupled - it has to opt in to DP-SGD.
    """
    return getattr(TASKS.factory(task_name), "batch_coupling",
                   "the task does not declare that its loss is a mean of per-sample terms")


class ClassificationTask:
    """Multi-class classification of a study from all its present sequences."""

    # Mean of per-sample cross-entropies; no batch statistics, no class weights from counts.
    batch_coupling = None

    def __init__(self, config: ClassificationConfig):
        self.config = config

    def step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        logits = model(batch["image"], batch["present"])
        labels = batch["label"]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.config.label_smoothing)
        acc = (logits.argmax(1) == labels).float().mean().item()
        return StepOutput(loss, int(labels.numel()), {"accuracy": acc})

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample loss, class probabilities and labels for one batch."""
        logits = model(batch["image"], batch["present"]).float()
        loss = F.cross_entropy(logits, batch["label"], reduction="none")
        return loss, logits.softmax(1), batch["label"]

    def summarize(self, losses: np.ndarray, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Metrics plus the flattened confusion matrix (``cm_i_j``) so a server can pool it."""
        out = {"loss": float(losses.mean())} | classification_metrics(labels, probs)
        cm = confusion_matrix(labels, probs.argmax(1), self.config.num_classes)
        out |= {f"cm_{i}_{j}": float(cm[i, j]) for i in range(cm.shape[0]) for j in range(cm.shape[1])}
        return out


MODELS.register("mmvit", ViTConfig)(MultiModalViT)
TASKS.register("classification", ClassificationConfig)(ClassificationTask)
