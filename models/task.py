"""The task contract: what every task/objective provides, and what data it needs.

The one training engine (``client/engine.py``), the site's ClientApp (``client/app.py``) and
the server's validation and export call these members unconditionally. Optional behaviour
(a label prior, a post-step update, site-only state) is *declared* with a no-op default in
``TaskBase`` rather than discovered with ``hasattr``: a task that needs it overrides it.

``DataNeeds`` says what a task's site data must contain (labelled or every study, which
fraction of labels, lesion masks, tokenized reports, multi-label findings). It is hashable
and is the site's data cache key (with the site, the class names and the image size), so
two tasks with different needs are never served each other's data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor, nn
from torch.utils.data import Dataset

from .backbone import Backbone, TokenBackbone
from .text import load_tokenizer, tokenize, tokenizer_fingerprint
from .vit import TokenLayout

if TYPE_CHECKING:
    from .evaluation import Evaluator

# What a task that does not say otherwise is assumed to do: couple the batch, so it has to
# opt in to DP-SGD (``batch_coupling = None``) rather than be let in by omission.
UNDECLARED_COUPLING = "the task does not declare that its loss is a mean of per-sample terms"


@dataclass
class StepOutput:
    loss: Tensor                       # scalar, mean over the n samples it covers
    n: int
    metrics: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def merge(outs: list[StepOutput]) -> StepOutput | None:
        """One step's output from its chunks' (DP-SGD's physical batches): the loss and every
        metric as the mean over all the samples, weighted by each chunk's ``n``."""
        if not outs:
            return None
        if len(outs) == 1:
            return outs[0]
        n = sum(o.n for o in outs)
        loss = sum(o.loss.detach() * o.n for o in outs) / max(n, 1)
        keys = dict.fromkeys(k for o in outs for k in o.metrics)    # a chunk may lack one
        metrics = {k: sum(o.metrics[k] * o.n for o in outs if k in o.metrics)
                   / max(sum(o.n for o in outs if k in o.metrics), 1) for k in keys}
        return StepOutput(loss, n, metrics)


@dataclass(frozen=True)
class ReportText:
    """How reports are tokenized: the tokenizer's identity and the token length.

    ``fingerprint`` is the SHA-256 of the tokenizer file, so a directory whose tokenizer
    changed is a different key even under the same path.
    """
    tokenizer_dir: str | None          # None = the shipped default vocabulary
    max_length: int
    fingerprint: str

    @classmethod
    def of(cls, tokenizer_dir: str | None, max_length: int) -> ReportText:
        """The spec of the tokenizer in ``tokenizer_dir`` (``None``: shipped default)."""
        return cls(tokenizer_dir, max_length, tokenizer_fingerprint(tokenizer_dir))

    def transform(self) -> Callable[[list[str]], dict[str, Tensor]]:
        """Texts -> ``input_ids``/``attention_mask`` ``[N, max_length]`` and ``truncated``
        (``models.text.tokenize``); built from this spec, so data cached under it is exactly
        what it says."""
        if tokenizer_fingerprint(self.tokenizer_dir) != self.fingerprint:
            raise ValueError("the report tokenizer changed since the task was built; rebuild "
                             "the task so every site tokenizes reports the same way")
        tokenizer = load_tokenizer(self.tokenizer_dir)
        max_length = self.max_length

        def transform(texts: list[str]) -> dict[str, Tensor]:
            return tokenize(tokenizer, texts, max_length)
        return transform


@dataclass(frozen=True)
class DataNeeds:
    """What a task's site data must contain; hashable, the site data cache key.

    Attributes
    ----------
    unlabelled : bool
        Train on every training study (self-supervised objectives), labels beyond
        ``label_fraction`` hidden; otherwise on the labelled studies only.
    label_fraction : float
        Fraction of each site's labelled training studies whose labels are used.
    masks : bool
        Items carry the lesion ``mask`` and ``has_mask``; training keeps masked studies only.
    reports : ReportText or None
        Items carry the tokenized report and ``has_report``.
    multi_label : bool
        Labels are bitmasks of findings (``findings.csv``), not class indices.
    """
    unlabelled: bool = False
    label_fraction: float = 1.0
    masks: bool = False
    reports: ReportText | None = None
    multi_label: bool = False

    def __post_init__(self):
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")


class TaskModel(nn.Module):
    """Base of the models a task's ``wrap`` builds around a registry backbone (objective
    heads, decoders, a text tower): ``self.backbone`` is what fine-tuning starts from and
    what export serves. A task that trains the backbone as it is returns it unwrapped."""

    backbone: TokenBackbone


@runtime_checkable
class Task(Protocol):
    """What every registered task/objective provides (``TaskBase`` gives the defaults).

    Attributes
    ----------
    config : frozen dataclass
        The task's validated options (``TASKS.config``).
    batch_coupling : str or None
        Why the loss couples the samples of a batch (DP-SGD refused), or None if it is a
        mean of per-row terms over every row it was given, in order (DP-SGD's clipper takes
        rows for samples, or with augmentation multiplicity k consecutive rows for one: a
        step that dropped or reordered rows would mix samples). Class-level: the server
        decides before building.
    uses_unlabelled : bool
        Learns from unlabelled studies (a pretraining objective). Class-level, as above;
        ``data_needs.unlabelled`` equals it.
    model_copies : int
        Copies of the wrapped model's weights the task holds while training (an EMA
        teacher is a second); the site's parameter cap counts them all.
    """

    config: Any
    batch_coupling: ClassVar[str | None]
    uses_unlabelled: ClassVar[bool]
    model_copies: ClassVar[int]

    @staticmethod
    def options_coupling(options: dict) -> str | None:
        """Why these task options couple the batch, or None."""

    @property
    def data_needs(self) -> DataNeeds:
        """What this task's site data must contain."""

    def wrap(self, backbone: Backbone) -> nn.Module:
        """The trainable model around a registry backbone (heads, adapters, freezing)."""

    def step_views(self, layout: TokenLayout) -> tuple[int, ...]:
        """The image side of every backbone pass over one study in one training ``step``
        (crops, teacher passes): the site's token caps count each."""

    def step_text_tokens(self) -> int:
        """The text tokens one training ``step`` reads of a study (an image-report
        objective's report, padded to its length; 0 without text): counted like a pass."""

    def step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        """One training/validation step's loss over ``batch``."""

    def set_label_prior(self, labels: Tensor) -> None:
        """Before training: the site's training labels (-1 = unlabelled)."""

    def training_data(self, model: nn.Module, data: Dataset, batch_size: int) -> Dataset:
        """Before training, after ``set_label_prior``: the dataset the round trains on, e.g.
        ``data`` with pseudo-labels from ``model`` as received (one label per study, each a
        function of that study and the received model only, so DP-SGD stays per-sample),
        asking the model ``batch_size`` studies at a time (the job's, which the site's size
        check counted)."""

    def after_step(self, model: nn.Module) -> None:
        """After each optimizer step (e.g. an EMA teacher)."""

    def site_state(self) -> dict[str, Tensor] | None:
        """State kept at the site across rounds, never sent; None = the task keeps none."""

    def load_site_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        """Restore what ``site_state`` returned in an earlier round."""

    def evaluator(self) -> Evaluator:
        """A fresh accumulator for one split (``models/evaluation.py``); the engine feeds it."""


class TaskBase:
    """Defaults for the optional parts of ``Task``; every registered task derives from it.

    A subclass sets ``config`` and ``batch_coupling`` and implements ``step``; it overrides
    ``data_needs``, ``wrap`` and the hooks only where it needs to.
    """

    batch_coupling: ClassVar[str | None] = UNDECLARED_COUPLING
    uses_unlabelled: ClassVar[bool] = False
    model_copies: ClassVar[int] = 1
    config: Any

    @staticmethod
    def options_coupling(options: dict) -> str | None:
        return None

    @property
    def data_needs(self) -> DataNeeds:
        return DataNeeds(unlabelled=self.uses_unlabelled)

    def wrap(self, backbone: Backbone) -> nn.Module:
        return backbone

    def step_views(self, layout: TokenLayout) -> tuple[int, ...]:
        return (layout.img_size,)           # the study as given, once

    def step_text_tokens(self) -> int:
        return 0

    def step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        raise NotImplementedError(f"{type(self).__name__} does not implement step")

    def evaluator(self) -> Evaluator:
        raise NotImplementedError(f"{type(self).__name__} does not implement evaluator")

    def set_label_prior(self, labels: Tensor) -> None:
        return None

    def training_data(self, model: nn.Module, data: Dataset, batch_size: int) -> Dataset:
        return data

    def after_step(self, model: nn.Module) -> None:
        return None

    def site_state(self) -> dict[str, Tensor] | None:
        return None

    def load_site_state(self, model: nn.Module, state: dict[str, Tensor]) -> None:
        # Only reachable if state was stored under this task's name, which needs site_state.
        raise ValueError(f"{type(self).__name__} keeps no site state, but some was stored "
                         "for it; refusing to guess what it is")


__all__ = ["DataNeeds", "ReportText", "StepOutput", "Task", "TaskBase", "TaskModel",
           "UNDECLARED_COUPLING"]
