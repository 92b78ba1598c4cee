"""Tasks: what a training step computes. The one training engine (client/engine.py) calls
``step`` and feeds ``evaluator()``; tasks never own a loop, an optimizer or a device. The
contract every task follows (``Task``, ``TaskBase``, ``DataNeeds``) is in ``models/task.py``."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from .backbone import Backbone
from .evaluation import ClassificationEvaluator, MultiLabelEvaluator
from .metrics import MAX_CATEGORIES
from .registry import MODELS, TASKS
from .task import UNDECLARED_COUPLING, DataNeeds, StepOutput, TaskBase

log = logging.getLogger(__name__)


FINETUNE_MODES = ("full", "linear_probe", "lora")
# mode=lora's adapters: every attention and MLP projection of a MultiModalViT's blocks (peft
# matches a string with re.fullmatch on each module's name)
LORA_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(0|3))"


def check_finetuning(config) -> None:
    """The options every head task shares: ``mode``, ``lora_rank``/``lora_alpha`` and
    ``label_fraction``."""
    if config.mode not in FINETUNE_MODES:
        raise ValueError(f"unknown fine-tuning mode {config.mode!r}; choose one of "
                         f"{', '.join(FINETUNE_MODES)}")
    if config.lora_rank < 1 or config.lora_alpha <= 0:
        raise ValueError("lora_rank must be >= 1 and lora_alpha > 0")
    if not 0.0 < config.label_fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {config.label_fraction}")
    if not 0.0 <= config.sequence_dropout <= 1.0:
        raise ValueError(f"sequence_dropout must be in [0, 1], got {config.sequence_dropout}")


@dataclass(frozen=True)
class ClassHeadConfig:
    """The class head's options: classification's, and MM-DINOv2's semi-supervised loss's
    (``models.dino``, whose class head is a classification task built from exactly these)."""
    num_classes: int = 3
    label_smoothing: float = 0.0
    label_fraction: float = 1.0       # fraction of each site's labelled training studies used


@dataclass(frozen=True)
class ClassificationConfig(ClassHeadConfig):
    mode: str = "full"                # full | linear_probe (head only) | lora (adapters + head)
    lora_rank: int = 4
    lora_alpha: float = 8.0
    # p in [0, 1]: while training, each sample with >= 2 present sequences loses one of them
    # (zeroed, present=False) with probability p - how a missing sequence looks at inference
    # (MM-DINOv2's full-modality masking, for supervised training). Per sample: DP-SGD safe.
    sequence_dropout: float = 0.0
    # tau >= 0: train on logits + tau * log(pi_site), pi_site = the site's own training label
    # frequencies (balanced softmax / FedLC-style logit adjustment against label skew);
    # predictions use the raw logits. 0 = off. Refused under DP-SGD (see private_state).
    logit_adjustment: float = 0.0
    # beta >= 0: adds beta * mean squared entry of the batch correlation matrix of the pooled
    # features (FedDecorr, Shi et al. 2023: against the dimensional collapse of local models
    # under label skew). Couples the batch, so refused under DP-SGD (see batch_coupling).
    feature_decorrelation: float = 0.0
    # tau in (1/num_classes, 1]: each round, before training, the site labels every
    # unlabelled training study (label hidden by label_fraction, or none) whose class
    # probability under the model as received is >= tau with that class, and trains on them
    # too with weight pseudo_label_weight (self-training). Each pseudo-label depends on its
    # own study and the received model only: DP-SGD stays per-sample, and its sample rate
    # and accounting cover every training study. 0 = off (labelled studies only).
    pseudo_label_threshold: float = 0.0
    pseudo_label_weight: float = 1.0

    def __post_init__(self):
        if not 2 <= self.num_classes <= MAX_CATEGORIES:
            raise ValueError(f"num_classes must be in [2, {MAX_CATEGORIES}], got "
                             f"{self.num_classes}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        check_finetuning(self)
        if not self.logit_adjustment >= 0.0:
            raise ValueError(f"logit_adjustment must be >= 0, got {self.logit_adjustment}")
        if not self.feature_decorrelation >= 0.0:
            raise ValueError(f"feature_decorrelation must be >= 0, got "
                             f"{self.feature_decorrelation}")
        tau = self.pseudo_label_threshold
        if not (tau == 0.0 or 1.0 / self.num_classes < tau <= 1.0):
            raise ValueError(f"pseudo_label_threshold must be 0 (off) or in (1/num_classes, 1] "
                             f"= ({1 / self.num_classes:.3g}, 1], got {tau}")
        if not 0.0 <= self.pseudo_label_weight < float("inf"):
            raise ValueError(f"pseudo_label_weight must be finite and >= 0, got "
                             f"{self.pseudo_label_weight}")


@dataclass(frozen=True)
class MultiLabelConfig:
    num_classes: int = 3              # number of findings (from task.class_names)
    mode: str = "full"                # full | linear_probe | lora, as for classification
    lora_rank: int = 4
    lora_alpha: float = 8.0
    label_fraction: float = 1.0       # fraction of each site's labelled training studies used
    threshold: float = 0.5            # a finding is predicted present at probability >= this
    sequence_dropout: float = 0.0     # as for classification

    def __post_init__(self):
        if self.num_classes < 1 or self.num_classes > 62:
            raise ValueError(f"num_classes (findings) must be in [1, 62], got {self.num_classes}")
        check_finetuning(self)
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")


def finding_targets(labels: Tensor | np.ndarray, num_findings: int):
    """Bitmask labels -> ``[N, num_findings]`` 0/1 targets (bit k set = finding k present)."""
    if isinstance(labels, np.ndarray):
        return (labels[:, None] >> np.arange(num_findings)) & 1
    return (labels[:, None] >> torch.arange(num_findings, device=labels.device)) & 1


def drop_one_sequence(images: Tensor, present: Tensor, prob: float,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Full-modality masking: zero one random present sequence of samples with >= 2."""
    b, s = present.shape
    drop = (torch.rand(b, device=present.device, generator=generator) < prob) \
        & (present.sum(1) >= 2)
    score = torch.rand(b, s, device=present.device, generator=generator)
    score = score.masked_fill(~present.bool(), -1)
    which = F.one_hot(score.argmax(1), s).bool() & drop[:, None]        # [B, S]
    keep = present.bool() & ~which
    shape = (b, s) + (1,) * (images.ndim - 2)
    return images * keep.reshape(shape).to(images.dtype), keep


def training_view(batch: dict[str, Tensor], sequence_dropout: float,
                  training: bool) -> tuple[Tensor, Tensor]:
    """The images and present mask a head task trains on: ``sequence_dropout`` applied while
    training, the batch as is otherwise."""
    if training and sequence_dropout > 0:
        return drop_one_sequence(batch["image"], batch["present"], sequence_dropout)
    return batch["image"], batch["present"]


def batch_coupling(task_name: str, task_options: dict | None = None) -> str | None:
    """Why a task's loss couples the samples of a batch (so per-sample clipping would not bound
    one sample's influence and DP-SGD's accounting would not hold), or None if it does not.

    Tasks declare it as the class attribute ``batch_coupling`` (``TaskBase``: coupled unless
    the task opts in with None), and ``options_coupling(options)`` for options that can
    couple the batch. A factory that is not a ``TaskBase`` declares nothing: coupled.
    """
    factory = TASKS.factory(task_name)
    if not (isinstance(factory, type) and issubclass(factory, TaskBase)):
        return UNDECLARED_COUPLING
    return factory.batch_coupling or factory.options_coupling(task_options or {})


def decorrelation_loss(features: Tensor, eps: float = 1e-5) -> Tensor:
    """Mean squared entry of the correlation matrix of ``features [N, D]`` over the batch
    (FedDecorr's regulariser): 1/D when the D dimensions are uncorrelated, 1 when they have
    collapsed onto one direction. Needs N >= 2."""
    z = features - features.mean(0)
    z = z / (z.square().mean(0).sqrt() + eps)
    corr = z.T @ z / features.shape[0]
    return corr.square().mean()


def private_state(task_name: str, task_options: dict) -> str | None:
    """Why a task configured this way would let statistics of the site's data that DP-SGD's
    accountant does not cover shape the released model, or None."""
    if float(task_options.get("logit_adjustment", 0.0) or 0.0) > 0:
        return ("logit_adjustment shifts the training loss by the log of the site's label "
                "counts, which per-sample clipping and noise do not cover; set "
                "task.options.logit_adjustment=0 or use site-level DP (privacy=sitedp)")
    return None


def build(model_name: str, model_options: dict, task_name: str, task_options: dict, *,
          backbone_state: dict | None = None, foundation_dir=None) -> tuple[nn.Module, object]:
    """The trainable model and its task, both by registry name: the backbone from ``MODELS``
    (optionally starting from ``backbone_state``, e.g. a pretraining phase's result), wrapped
    by the task (objective heads, frozen parts, adapters) when the task says so.
    ``foundation_dir``: the building side's OWN directory of pretrained encoders (site: node
    config ``foundation-dir``; coordinator: ``model.foundation_dir``), never the job's."""
    task = TASKS.build(task_name, task_options)
    model = MODELS.build(model_name, model_options, foundation_dir=foundation_dir)
    if backbone_state is not None:
        load_backbone(model, backbone_state)
    return task.wrap(model), task


def backbone_weights(state: dict) -> dict:
    """The backbone's weights out of a pretraining objective's model state (``backbone.*``):
    what a pretrain -> fine-tune run hands from phase 1 to phase 2 (``load_backbone``)."""
    prefix = "backbone."
    out = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise ValueError("the pretrained model has no backbone.* weights")
    return out


class BackboneMisfit(ValueError):
    """Pretrained weights that ``load_backbone`` refuses: ``key`` is the first weight of the
    backbone (in its own order) the state lacks (``state_shape`` None) or holds in another
    shape; ``count`` how many do not fit."""

    def __init__(self, key: str, shape: tuple, state_shape: tuple | None, count: int):
        self.key, self.shape, self.state_shape, self.count = key, shape, state_shape, count
        got = "missing" if state_shape is None else f"shape {list(state_shape)}"
        super().__init__(f"pretrained weights do not fit this backbone: {key} is {got} "
                         f"there and {list(shape)} here ({count} weight"
                         f"{'s' if count > 1 else ''} do{'es' if count == 1 else ''} not fit)")


def load_backbone(model: Backbone, state: dict) -> None:
    """Load pretrained weights into a backbone: every non-head weight must match; a head of
    the same shape is kept (MM-DINOv2 trains one), any other head starts fresh. Public
    constants the backbone read from its own directory (``public_constants``: a foundation
    model's feature mean and directions) are never taken from ``state`` nor required in it:
    a backbone pretrained without them fine-tunes with them, and every side keeps its own
    file's values (the ones the base digest covers). Weights of ``state`` the backbone lacks
    are left out (a shallower backbone takes the first blocks).

    Raises
    ------
    BackboneMisfit
        A non-head weight is missing from ``state`` or has another shape there.
    """
    own = model.state_dict()
    constants = set(model.public_constants)
    body = [k for k in own if not k.startswith("head.") and k not in constants]
    misfit = [k for k in body if k not in state or tuple(state[k].shape) != tuple(own[k].shape)]
    if misfit:
        key = misfit[0]
        raise BackboneMisfit(key, tuple(own[key].shape),
                             tuple(state[key].shape) if key in state else None, len(misfit))
    take = {k: v for k, v in state.items()      # the body (all fit) and a same-shape head
            if k in own and k not in constants and tuple(v.shape) == tuple(own[k].shape)}
    fresh = sorted(k for k in own if k.startswith("head.") and k not in take)
    if fresh:       # not silent: a pretrained model without (this) head
        log.info("pretrained backbone loaded; class head starts fresh (%s)", ", ".join(fresh))
    model.load_state_dict(take, strict=False)


def wrap_for_finetuning(backbone: Backbone, config) -> nn.Module:
    """What trains in a head task (``config.mode``): everything, the head only (linear
    probe), or LoRA adapters on every attention and MLP projection plus the head."""
    mode = config.mode
    if mode == "full":
        return backbone
    if backbone.head is None:
        raise ValueError(f"mode={mode} needs a backbone with a class head")
    if mode == "lora":
        if not any(re.fullmatch(LORA_TARGETS, name) for name, _ in backbone.named_modules()):
            # peft's own error (NoMatchingPeftModuleError) names a regex, not the fix
            raise ValueError(f"mode=lora puts adapters on a MultiModalViT's attention and MLP "
                             f"projections and {type(backbone).__name__} has none; a foundation "
                             "model adapts itself (model.options.method=lora): use mode=full")
        from peft import LoraConfig, inject_adapter_in_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                          target_modules=LORA_TARGETS)
        backbone = inject_adapter_in_model(lora, backbone)   # freezes all but adapters
    else:
        backbone.requires_grad_(False)
    backbone.head.requires_grad_(True)
    return backbone


def trained_head(model: nn.Module) -> nn.Module | None:
    """The class head (``model.head``) when it has parameters that train, else None: what
    ``train.head_lr``, ``train.head_only_rounds`` and DP-SGD's ``head_clip_share`` treat as
    "the head"."""
    head = getattr(model, "head", None)
    if isinstance(head, nn.Module) and any(p.requires_grad for p in head.parameters()):
        return head
    return None


def frozen_keys(model: nn.Module) -> list[str]:
    """State-dict keys of parameters that do not train (linear probe, LoRA base weights)."""
    return [name for name, p in model.named_parameters() if not p.requires_grad]


def pseudo_labels(model: nn.Module, data: Dataset, labels: Tensor, threshold: float,
                  weight: float, batch_size: int = 64) -> tuple[Tensor, Tensor]:
    """Labels and per-study loss weights for ``data``: a labelled study keeps its label
    (weight 1); an unlabelled one (-1) gets ``model``'s most probable class where that
    probability is >= ``threshold`` (weight ``weight``), else stays -1 (weight 0). Each study
    is judged on its own: nothing depends on the other studies. The model sees each study
    without augmentation where ``data`` offers it (``data.plain(i)``)."""
    assigned = labels.clone()
    weights = (labels >= 0).float()
    device = next(model.parameters()).device
    item = getattr(data, "plain", data.__getitem__)
    unlabelled = (labels < 0).nonzero().flatten()
    for chunk in unlabelled.split(batch_size) if len(unlabelled) else ():
        batch = default_collate([item(int(i)) for i in chunk])
        logits = model(batch["image"].to(device), batch["present"].to(device))
        confidence, predicted = logits.float().softmax(1).max(1)
        sure = (confidence >= threshold).cpu()
        assigned[chunk[sure]] = predicted.cpu()[sure]
        weights[chunk[sure]] = weight
    return assigned, weights


class Relabelled(Dataset):
    """``data`` with its labels replaced (``labels``, -1 = none) and a per-study
    ``label_weight`` added to every item."""

    def __init__(self, data: Dataset, labels: Tensor, weights: Tensor):
        if not len(labels) == len(weights) == len(data):
            raise ValueError("one label and one weight per study")
        self.data, self.assigned, self.weights = data, labels, weights

    def __len__(self) -> int:
        return len(self.data)

    @property
    def labels(self) -> Tensor:
        return self.assigned

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return dict(self.data[i]) | {"label": self.assigned[i], "label_weight": self.weights[i]}


class ClassificationTask(TaskBase):
    """Multi-class classification of a study from all its present sequences.

    ``mode`` picks what trains: everything, the head only (linear probe), or LoRA adapters
    on every attention and MLP projection plus the head. Frozen weights never change at a
    site, so they are not sent back (``frozen_keys``).
    """

    # Mean of per-sample cross-entropies; no batch statistics, no class weights from counts
    # (feature_decorrelation adds a batch statistic: see options_coupling).
    batch_coupling = None

    @staticmethod
    def options_coupling(options: dict) -> str | None:
        if float(options.get("feature_decorrelation", 0.0) or 0.0) > 0:
            return ("feature_decorrelation penalises the correlation of features across the "
                    "batch, so each sample's gradient depends on the others; set "
                    "task.options.feature_decorrelation=0")
        return None

    def __init__(self, config: ClassificationConfig):
        self.config = config
        self.log_prior: Tensor | None = None      # [C], set by set_label_prior at the site

    @property
    def data_needs(self) -> DataNeeds:
        # uses_unlabelled: MM-DINOv2 derives from this task and learns from every study;
        # pseudo-labels need the unlabelled studies too
        unlabelled = self.uses_unlabelled or self.config.pseudo_label_threshold > 0
        return DataNeeds(unlabelled=unlabelled, label_fraction=self.config.label_fraction)

    def set_label_prior(self, labels: Tensor) -> None:
        """The site's training label frequencies (add-one smoothed) for ``logit_adjustment``;
        unlabelled studies (-1) are ignored. Kept in the task, never sent anywhere."""
        labels = torch.as_tensor(labels).long()
        counts = torch.bincount(labels[labels >= 0], minlength=self.config.num_classes)
        counts = counts[:self.config.num_classes].double() + 1
        self.log_prior = (counts / counts.sum()).log().float()

    def training_data(self, model: nn.Module, data: Dataset, batch_size: int) -> Dataset:
        """With ``pseudo_label_threshold``: ``data`` with its confident unlabelled studies
        labelled by ``model`` (the engine calls this with the received model, in eval mode,
        under no_grad); otherwise ``data`` itself."""
        tau = self.config.pseudo_label_threshold
        if not tau:
            return data
        labels = torch.as_tensor(data.labels).long()
        assigned, weights = pseudo_labels(model, data, labels, tau,
                                          self.config.pseudo_label_weight, batch_size)
        log.info("pseudo-labels: %d of %d unlabelled training studies at threshold %g",
                 int(((labels < 0) & (assigned >= 0)).sum()), int((labels < 0).sum()), tau)
        if not (weights > 0).any():
            log.warning("no training study has a label or a pseudo-label at threshold %g (or "
                        "every weight is 0): this round's steps learn nothing (under DP-SGD "
                        "they are noise only)", tau)
        return Relabelled(data, assigned, weights)

    def wrap(self, backbone: nn.Module) -> nn.Module:
        return wrap_for_finetuning(backbone, self.config)

    def step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        beta = self.config.feature_decorrelation if model.training else 0.0
        images, present = training_view(batch, self.config.sequence_dropout, model.training)
        if beta:
            features = model.pool(model.forward_features(images, present), present)
            logits = model.head(features)
        else:
            logits = model(images, present)
        labels = batch["label"]
        scores = logits.float()
        tau = self.config.logit_adjustment
        if tau and model.training:
            if self.log_prior is None:
                raise RuntimeError("logit_adjustment needs the site's label prior: call "
                                   "set_label_prior before training")
            scores = scores + tau * self.log_prior.to(scores.device)
        weight = batch.get("label_weight")
        if weight is None:
            loss = F.cross_entropy(scores, labels, label_smoothing=self.config.label_smoothing)
            acc = (logits.argmax(1) == labels).float().mean().item()
        else:   # pseudo-labelled data: per-sample weights (0: no label), over the whole batch
            per_sample = F.cross_entropy(scores, labels.clamp(min=0), reduction="none",
                                         label_smoothing=self.config.label_smoothing)
            loss = (per_sample * weight.to(per_sample.dtype)).sum() / labels.numel()
            known = labels >= 0
            acc = (logits.argmax(1) == labels)[known].float().mean().item() if known.any() \
                else 0.0
        if beta and labels.numel() > 1:
            loss = loss + beta * decorrelation_loss(features.float())
        return StepOutput(loss, int(labels.numel()), {"accuracy": acc})

    def evaluator(self) -> ClassificationEvaluator:
        """Cross-entropy, the confusion matrix (so a server can pool it) and macro AUROC."""
        return ClassificationEvaluator(self.config.num_classes)


class MultiLabelTask(TaskBase):
    """Several findings per study (e.g. enhancement, necrosis, oedema), each present or not:
    one sigmoid per finding, binary cross-entropy averaged over findings.

    Labels arrive as bitmasks in the studies' ``label`` (bit k set = finding k present, 0 =
    read and nothing found, -1 = unlabelled; ``client/data/site.py`` reads them from
    ``findings.csv``), so label fractions, splits and DP-SGD treat them like class labels.
    Sites report one binary confusion matrix per finding (``SplitMetrics``), which the server
    pools exactly; MCC, F1 and accuracy are macro means over findings.
    """

    batch_coupling = None           # mean of per-sample losses

    def __init__(self, config: MultiLabelConfig):
        self.config = config

    @property
    def data_needs(self) -> DataNeeds:
        return DataNeeds(label_fraction=self.config.label_fraction, multi_label=True)

    def wrap(self, backbone: nn.Module) -> nn.Module:
        return wrap_for_finetuning(backbone, self.config)

    def step(self, model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
        images, present = training_view(batch, self.config.sequence_dropout, model.training)
        logits = model(images, present).float()
        targets = finding_targets(batch["label"], self.config.num_classes).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        acc = ((logits >= 0).float() == targets).float().mean().item()
        return StepOutput(loss, int(targets.shape[0]), {"accuracy": acc})

    def evaluator(self) -> MultiLabelEvaluator:
        """Mean BCE, one binary confusion per finding (poolable) and macro AUROC."""
        return MultiLabelEvaluator(self.config.num_classes, self.config.threshold,
                                   finding_targets)


TASKS.register("classification", ClassificationConfig)(ClassificationTask)
TASKS.register("multilabel", MultiLabelConfig)(MultiLabelTask)
