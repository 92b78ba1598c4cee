"""MM-DINOv2: self-distillation with a multi-modal student and an EMA teacher.

One step, per batch of studies ``image [B, S, *spatial]`` with ``present [B, S]``:

1. **crops** - two global crops (random resized, full size) and ``local_crops`` small ones;
2. **full-modality masking** - for the student, one randomly chosen present sequence of each
   sample (with >= 2) is removed (zeroed, ``present=False``), exactly how a missing sequence
   looks at inference; the teacher sees every present sequence;
3. **DINO loss** - cross-entropy between the teacher's centred, sharpened CLS prototypes of
   each global crop and the student's prototypes of every other crop;
4. **iBOT loss** - random patches of the student's global crops are blanked; the student
   predicts the teacher's patch prototypes there;
5. **semi-supervised loss** - cross-entropy of the backbone's class head on the labelled
   samples (``label >= 0``), averaged over them (not over the batch, so 10% of labels do not
   weigh 10x less), on the studies as given: no crop, no blanked patch, no removed sequence.
   A crop can cut the lesion out and a removed sequence can remove the evidence (the
   synthetic classes are relations between sequences), so on a corrupted view the label
   would often be wrong; the first version did that and fine-tuned from it worse than from
   random init;
6. **pseudo-labels** (``pseudo_label_weight > 0``) - the semi-supervised part that reaches
   the unlabelled studies' classes: where the EMA teacher's class head is confident
   (max probability >= ``pseudo_label_threshold``) on an unlabelled study, its argmax is the
   student's target there (mean-teacher / FixMatch-style self-training; averaged over all
   unlabelled studies of the batch, so it grows as the teacher grows confident). The
   teacher's probabilities are first aligned to the labelled class prior (ReMixMatch's
   distribution alignment: times the site's labelled class frequencies so far, divided by a
   running mean of the teacher's predictions on unlabelled studies, both kept at the site):
   without it a teacher that is confident about the majority class labels everything with
   it and the student follows (measured: 43% of a site's unlabelled studies pseudo-labelled,
   class-head MCC 0). Without pseudo-labels the unlabelled studies only feed 3-4.

The teacher, its two centres and the optimizer state are site state (``site_state``): they
never leave the site. Only the student (backbone + projection heads) is aggregated.

Centring follows DINOv2: Sinkhorn-Knopp equipartition of the teacher's scores over the batch
(``centering="sinkhorn"``, default) or DINO's EMA centre (``"ema"``); a KoLeo term spreads the
student's CLS features (``koleo_weight``). With the EMA centre alone, no KoLeo and a plain
linear prototype layer, the first version collapsed: every CLS feature identical, the DINO
loss pinned at ln(out_dim).

Sinkhorn and KoLeo stop a full collapse but not a near one: studies of one anatomy share
most of their content, and the CLS features of different studies had cosine ~0.98, so the
teacher's prototype scores differed by ~0.02 across a batch, its targets were almost
uniform and the DINO loss stayed at ln(out_dim) - the self-distillation term taught nothing.
``head_centring`` (default on) subtracts the batch mean of the projection head's bottleneck
(over every token it scores) before the L2 normalisation, as the BatchNorm in SimCLR/BYOL
projectors does without its scale: what remains is what tells the studies apart. A crop batch
of one token is left as is.

From a pretrained foundation model (``model=foundation``, ``models.foundation``): student and
teacher both start from the loaded, multi-channel-adapted backbone; the student trains what
the backbone's ``method`` says (LoRA adapters + new patch/channel embeddings + class head) plus
the two projection heads, and only those travel. The teacher is site-local: an EMA of the
student's trainable weights (its frozen base is the same loaded copy, never averaged), kept
across rounds in the site's state; only its trainable part is stored there. The encoder needs
a CLS token (``check_pretraining``).

Not DP-SGD ready: centring (either kind) and KoLeo couple the samples of a batch, so one
sample's loss depends on the others (``batch_coupling``). Use site-level DP for this
objective.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import TASKS
from .task import StepOutput, TaskModel
from .tasks import ClassHeadConfig, ClassificationConfig, ClassificationTask, drop_one_sequence
from .vit import MultiModalViT, TokenLayout, _init_weights


MAX_LOCAL_CROPS = 16                   # DINOv2 uses 8


@dataclass(frozen=True)
class DINOConfig(ClassHeadConfig):
    """The class head's options (``ClassHeadConfig``) and DINO's, iBOT's and the
    pseudo-labels' (their own: the head task's options of the same names mean others)."""
    out_dim: int = 256                 # prototypes
    hidden_dim: int = 128
    bottleneck_dim: int = 64
    local_crops: int = 2
    local_size: float = 0.5            # local crop side as a fraction of the image side
    global_scale: tuple[float, float] = (0.5, 1.0)   # crop area fraction
    local_scale: tuple[float, float] = (0.1, 0.5)
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    centering: str = "sinkhorn"        # DINOv2's Sinkhorn-Knopp, or "ema" (DINO's centre)
    sinkhorn_iterations: int = 3
    koleo_weight: float = 0.1          # DINOv2's KoLeo spread on student CLS (0: off)
    head_centring: bool = True         # subtract the batch mean of the head's bottleneck
    center_momentum: float = 0.9
    teacher_momentum: float = 0.99
    ibot_mask_ratio: float = 0.3       # fraction of patch tokens blanked in student globals
    ibot_weight: float = 1.0
    modality_mask_prob: float = 1.0    # MM-DINOv2 masks one present sequence per sample
    supervised_weight: float = 1.0
    pseudo_label_weight: float = 1.0   # teacher pseudo-labels on unlabelled studies (0: off)
    pseudo_label_threshold: float = 0.8
    alignment_momentum: float = 0.9    # running mean of the teacher's unlabelled predictions

    def __post_init__(self):
        for name in ("global_scale", "local_scale"):     # YAML gives lists; a frozen config
            object.__setattr__(self, name, tuple(getattr(self, name)))   # keeps a tuple
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if not 0 <= self.local_crops <= MAX_LOCAL_CROPS or not 0 < self.local_size <= 1:
            # each crop is a forward pass of every study (a site's memory and time)
            raise ValueError(f"local_crops must be in 0..{MAX_LOCAL_CROPS} and local_size in "
                             f"(0, 1]")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1")
        if not all(0 <= m < 1 for m in (self.teacher_momentum, self.center_momentum,
                                         self.alignment_momentum)):
            raise ValueError("teacher_momentum, center_momentum and alignment_momentum must be "
                             "in [0, 1)")
        if self.centering not in ("sinkhorn", "ema"):
            raise ValueError(f"centering must be 'sinkhorn' or 'ema', got {self.centering!r}")
        if self.sinkhorn_iterations < 1 or self.koleo_weight < 0:
            raise ValueError("sinkhorn_iterations must be >= 1 and koleo_weight >= 0")
        if not 0 <= self.ibot_mask_ratio < 1 or not 0 <= self.modality_mask_prob <= 1:
            raise ValueError("ibot_mask_ratio must be in [0, 1), modality_mask_prob in [0, 1]")
        if self.supervised_weight < 0 or self.pseudo_label_weight < 0:
            raise ValueError("supervised_weight and pseudo_label_weight must be >= 0")
        if not 1 / self.num_classes <= self.pseudo_label_threshold <= 1:
            raise ValueError(f"pseudo_label_threshold must be in [1/num_classes, 1], "
                             f"got {self.pseudo_label_threshold}")


class ProjectionHead(nn.Module):
    """DINO head: MLP -> L2-normalised bottleneck -> cosine scores against L2-normalised
    prototypes (DINO's weight-normalised last layer with its gain fixed at 1). Scores lie in
    [-1, 1] whatever the prototypes' norm, so weight decay shrinking them cannot flatten the
    teacher's targets: its temperature alone sets how sharp they are. (On its own this did not
    stop the first version's collapse; Sinkhorn-Knopp centring and KoLeo did.) With
    ``head_centring`` the bottleneck's mean over the tokens scored together is removed first
    (see the module docstring)."""

    def __init__(self, dim: int, config: DINOConfig):
        super().__init__()
        self.centring = config.head_centring
        self.mlp = nn.Sequential(nn.Linear(dim, config.hidden_dim), nn.GELU(),
                                 nn.Linear(config.hidden_dim, config.bottleneck_dim))
        self.prototypes = nn.Linear(config.bottleneck_dim, config.out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        z = self.mlp(x)
        tokens = z.reshape(-1, z.shape[-1])
        if self.centring and tokens.shape[0] > 1:
            z = z - tokens.mean(0)
        return F.linear(F.normalize(z, dim=-1), F.normalize(self.prototypes.weight, dim=-1))


class DINOStudent(TaskModel):
    """What is aggregated: the backbone (with its class head) and both projection heads."""

    def __init__(self, backbone: MultiModalViT, config: DINOConfig):
        super().__init__()
        if backbone.head is None:
            raise ValueError("MM-DINOv2 needs a backbone with a class head (num_classes > 0)")
        self.backbone = backbone
        self.dino_head = ProjectionHead(backbone.layout.dim, config)
        self.ibot_head = ProjectionHead(backbone.layout.dim, config)
        self.dino_head.apply(_init_weights)
        self.ibot_head.apply(_init_weights)

    def forward(self, images: Tensor, present: Tensor) -> Tensor:
        """Class logits (evaluation uses the semi-supervised head)."""
        return self.backbone(images, present)


def random_resized_crop(images: Tensor, size: int, scale: tuple[float, float],
                        generator: torch.Generator | None = None) -> Tensor:
    """Per-sample square crops of area fraction in ``scale``, resized to ``size`` (2D or 3D)."""
    b, s = images.shape[:2]
    dims = images.ndim - 2
    lo, hi = scale
    area = lo + (hi - lo) * torch.rand(b, device=images.device, generator=generator)
    side = area ** (1 / dims)                                           # [B] fraction per axis
    shift = (torch.rand(b, dims, device=images.device, generator=generator) * 2 - 1) \
        * (1 - side)[:, None]
    theta = torch.zeros(b, dims, dims + 1, device=images.device, dtype=images.dtype)
    for d in range(dims):
        theta[:, d, d] = side
        theta[:, d, dims] = shift[:, d]
    grid = F.affine_grid(theta, [b, s, *([size] * dims)], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False)


def blank_patches(images: Tensor, patch: int, ratio: float,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Zero a random ``ratio`` of patch positions (all sequences alike); ``masked [B, S*N]``."""
    b, s = images.shape[:2]
    dims = images.ndim - 2
    grid = images.shape[2] // patch
    n = grid**dims
    k = int(round(ratio * n))
    ranks = torch.rand(b, n, device=images.device, generator=generator).argsort(1).argsort(1)
    masked = ranks < k                                                   # [B, N]
    keep = (~masked).to(images.dtype).reshape(b, 1, *([grid] * dims))
    for axis in range(dims):
        keep = keep.repeat_interleave(patch, dim=2 + axis)
    return images * keep, masked.repeat(1, s)


def ibot_token_mask(masked: Tensor, keep: Tensor, token_groups: int) -> Tensor:
    """The student tokens iBOT scores: ``masked [B, S*N]`` (``blank_patches``' layout,
    channel-major: S blocks of N locations) on the channels the student sees (``keep [B, S]``)
    -> ``[B, token_groups*N]``.

    A removed sequence's blanked patch is no prediction task (its token is not attended).
    With one token per location over all S channels (a fused foundation backbone,
    ``token_groups == 1 < S``) a location is scored where any kept channel is blanked there.
    """
    b, s = keep.shape
    masked = masked & keep.repeat_interleave(masked.shape[1] // s, dim=1)   # [B, S*N]
    if token_groups == 1 < s:
        masked = masked.reshape(b, s, -1).any(dim=1)                        # [B, N]
    return masked


@torch.no_grad()
def sinkhorn_knopp(scores: Tensor, temp: float, iterations: int) -> Tensor:
    """DINOv2's teacher centring: targets ``[R, K]`` whose rows are distributions and whose
    prototypes are used equally over the ``R`` rows (equipartition, a few Sinkhorn-Knopp
    iterations in log space). Unlike an EMA centre it cannot settle on uniform targets while
    the rows differ."""
    log_q = scores.float() / temp                                        # [R, K]
    rows, k = log_q.shape
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(rows)
    return (log_q + math.log(rows)).exp()


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-sample Kozachenko-Leonenko spread ``[B]`` (DINOv2): minus the log distance of each
    L2-normalised feature to its nearest neighbour in the batch; it keeps the CLS features
    from collapsing onto one point."""
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.T
        dots.fill_diagonal_(-2)
        nearest = dots.argmax(1)
    return -torch.log((x - x[nearest]).norm(dim=-1) + eps)


def dino_loss(student: Tensor, teacher_probs: Tensor, temp: float) -> Tensor:
    """Per-sample cross-entropy ``[B]`` between teacher probabilities and student scores."""
    return -(teacher_probs * F.log_softmax(student.float() / temp, dim=-1)).sum(-1)


class MMDINOTask(ClassificationTask):
    """MM-DINOv2 pretraining step; evaluation is the class head's classification metrics."""

    batch_coupling = ("DINO/iBOT centring (Sinkhorn-Knopp over the batch or the batch mean of "
                      "teacher outputs) and the KoLeo nearest-neighbour term make one sample's "
                      "loss depend on the other samples of its batch")
    uses_unlabelled = True
    model_copies = 2                 # the student and its EMA teacher (a deep copy)

    def __init__(self, config: DINOConfig):
        # The class head's options and only those (``label_fraction`` reaches
        # ``data_needs``: the site hides the other labels); the head task's pseudo-labels stay
        # off, this task's own are the teacher's.
        head = {f.name: getattr(config, f.name) for f in fields(ClassHeadConfig)}
        super().__init__(ClassificationConfig(**head))
        self.dino = config
        self.teacher: DINOStudent | None = None
        self.center: Tensor | None = None
        self.patch_center: Tensor | None = None
        self.class_counts: Tensor | None = None     # labelled studies seen per class (+1)
        self.pseudo_mean: Tensor | None = None      # teacher's mean prediction, unlabelled
        self.frozen: set[str] = set()               # the student's frozen weight names

    def wrap(self, backbone: MultiModalViT) -> DINOStudent:
        from .foundation.adapt import FoundationBackbone

        if isinstance(backbone, FoundationBackbone):
            from .foundation.objectives import check_pretraining

            check_pretraining(backbone, "mm_dino")
            if backbone.config.num_classes != self.dino.num_classes:
                raise ValueError(f"mm_dino has {self.dino.num_classes} classes but the "
                                 f"foundation model's head {backbone.config.num_classes}")
            backbone.take_companions()      # no text tower or decoder in the teacher's copy
        return DINOStudent(backbone, self.dino)

    @staticmethod
    def _frozen(model: nn.Module) -> set[str]:
        """The student's frozen weights (a foundation model's base): the teacher's copy
        equals them (both loaded from this side's directory), so they are neither averaged
        nor kept in the site state."""
        return {n for n, p in model.named_parameters() if not p.requires_grad}

    def local_side(self, layout: TokenLayout) -> int:
        """A local crop's side: ``local_size`` of the image's, in whole patches (at least
        one)."""
        p = layout.patch_size
        return max(p, round(layout.img_size * self.dino.local_size / p) * p)

    def step_views(self, layout: TokenLayout) -> tuple[int, ...]:
        """Per study and step: the teacher's and the student's two global crops, the
        student's local crops, and the class terms' passes over the study as given (the
        student's, and the teacher's pseudo-label pass on an unlabelled one)."""
        return (layout.img_size,) * 6 + (self.local_side(layout),) * self.dino.local_crops

    # --- site state: never aggregated, never sent -------------------------------------
    def site_state(self) -> dict[str, Tensor]:
        if self.teacher is None:
            return {}
        state = {f"teacher.{k}": v.detach().cpu().clone()
                 for k, v in self.teacher.state_dict().items() if k not in self.frozen}
        return state | {name: getattr(self, name).cpu().clone() for name in self._running}

    def load_site_state(self, model: DINOStudent, state: dict[str, Tensor]) -> None:
        """Restore the teacher and centres kept from this site's previous rounds."""
        teacher = {k[len("teacher."):]: v for k, v in state.items() if k.startswith("teacher.")}
        self.frozen = self._frozen(model)
        if set(teacher) != set(model.state_dict()) - self.frozen:
            raise ValueError("the stored teacher does not match this model; refusing to mix")
        self.teacher = copy.deepcopy(model).requires_grad_(False)
        self.teacher.load_state_dict(teacher, strict=not self.frozen)
        self._init_running()
        for name in self._running:
            if name in state:        # sites that kept state before pseudo-labels start uniform
                setattr(self, name, state[name])

    def _ensure_teacher(self, model: DINOStudent, device: torch.device) -> DINOStudent:
        if self.teacher is None:     # first round at this site: teacher = the global student
            self.frozen = self._frozen(model)
            self.teacher = copy.deepcopy(model).requires_grad_(False)
            self._init_running()
        self.teacher.to(device).eval()
        for name in self._running:
            setattr(self, name, getattr(self, name).to(device))
        return self.teacher

    _running = ("center", "patch_center", "class_counts", "pseudo_mean")

    def _init_running(self) -> None:
        k = self.dino.num_classes
        self.center = torch.zeros(self.dino.out_dim)
        self.patch_center = torch.zeros(self.dino.out_dim)
        self.class_counts = torch.ones(k)
        self.pseudo_mean = torch.full((k,), 1 / k)

    # --- one step -------------------------------------------------------------------------
    def step(self, model: DINOStudent, batch: dict[str, Tensor]) -> StepOutput:
        c, images, present = self.dino, batch["image"], batch["present"]
        backbone = model.backbone
        cfg = backbone.layout
        teacher = self._ensure_teacher(model, images.device)
        size, local = cfg.img_size, self.local_side(cfg)
        globals_ = [random_resized_crop(images, size, c.global_scale) for _ in range(2)]
        locals_ = [random_resized_crop(images, local, c.local_scale)
                   for _ in range(c.local_crops)]

        with torch.no_grad():
            t_tokens = [teacher.backbone.forward_features(g, present) for g in globals_]
            t_cls = [teacher.dino_head(t[:, 0]).float() for t in t_tokens]
            t_patch = [teacher.ibot_head(t[:, 1:]).float() for t in t_tokens]
            if c.centering == "sinkhorn":
                t_probs = [sinkhorn_knopp(x, c.teacher_temp, c.sinkhorn_iterations)
                           for x in t_cls]
                t_patch_probs = [sinkhorn_knopp(x.flatten(0, 1), c.teacher_temp,
                                                c.sinkhorn_iterations).reshape(x.shape)
                                 for x in t_patch]
            else:
                t_probs = [F.softmax((x - self.center) / c.teacher_temp, -1) for x in t_cls]
                t_patch_probs = [F.softmax((x - self.patch_center) / c.teacher_temp, -1)
                                 for x in t_patch]

        dino_terms, ibot_terms, koleo_terms = [], [], []
        for i, crop in enumerate(globals_ + locals_):
            crop, keep = drop_one_sequence(crop, present, c.modality_mask_prob)
            is_global = i < 2
            if is_global and c.ibot_mask_ratio > 0:
                crop, masked = blank_patches(crop, cfg.patch_size, c.ibot_mask_ratio)
                masked = ibot_token_mask(masked, keep, cfg.num_sequences)
            tokens = backbone.forward_features(crop, keep)
            s_cls = model.dino_head(tokens[:, 0])
            for j in range(2):
                if j != i:
                    dino_terms.append(dino_loss(s_cls, t_probs[j], c.student_temp))
            if is_global and c.ibot_mask_ratio > 0:
                per_patch = dino_loss(model.ibot_head(tokens[:, 1:]), t_patch_probs[i],
                                      c.student_temp)                        # [B, S*N]
                m = masked.to(per_patch.dtype)
                ibot_terms.append((per_patch * m).sum(1) / m.sum(1).clamp(min=1))
            if is_global and c.koleo_weight > 0 and tokens.shape[0] > 1:
                koleo_terms.append(koleo_loss(tokens[:, 0]))
        loss = torch.stack(dino_terms).mean(0)                                # [B]
        if ibot_terms:
            loss = loss + c.ibot_weight * torch.stack(ibot_terms).mean(0)
        metrics = {"dino_loss": float(torch.stack(dino_terms).detach().mean())}
        if koleo_terms:
            koleo = torch.stack(koleo_terms).mean(0)
            loss = loss + c.koleo_weight * koleo
            metrics["koleo_loss"] = float(koleo.detach().mean())
        loss = loss.mean() + self._class_loss(model, teacher, batch, metrics)

        with torch.no_grad():        # centring state: EMA of the teacher's batch means
            m = c.center_momentum
            self.center.mul_(m).add_(torch.cat(t_cls).mean(0), alpha=1 - m)
            self.patch_center.mul_(m).add_(torch.cat(t_patch).flatten(0, 1).mean(0), alpha=1 - m)
        return StepOutput(loss, int(batch["label"].numel()), metrics)

    def _class_loss(self, model: DINOStudent, teacher: DINOStudent, batch: dict[str, Tensor],
                    metrics: dict) -> Tensor:
        """Semi-supervised terms 5-6 on the studies as given (no crop, no masking)."""
        c, images, present, labels = self.dino, batch["image"], batch["present"], batch["label"]
        labelled = labels >= 0
        # every step reports the same keys: Flower aggregates a metric only if every site has it
        metrics.update(labelled_fraction=float(labelled.float().mean()), supervised_loss=0.0,
                       pseudo_labelled=0.0)
        use_pseudo = c.pseudo_label_weight > 0 and not labelled.all()
        rows = torch.ones_like(labelled) if use_pseudo else labelled
        total = images.new_zeros(())
        if not rows.any() or (c.supervised_weight == 0 and not use_pseudo):
            return total
        logits = model.backbone(images[rows], present[rows]).float()
        if labelled.any() and c.supervised_weight > 0:
            ce = F.cross_entropy(logits[labelled[rows]], labels[labelled],
                                 label_smoothing=c.label_smoothing)
            total = total + c.supervised_weight * ce
            metrics["supervised_loss"] = float(ce.detach())
        if use_pseudo:
            unlabelled = ~labelled
            with torch.no_grad():
                probs = F.softmax(teacher.backbone(images[unlabelled],
                                                   present[unlabelled]).float(), dim=-1)
                prior = self.class_counts / self.class_counts.sum()
                aligned = probs * prior / self.pseudo_mean.clamp(min=1e-6)
                aligned = aligned / aligned.sum(-1, keepdim=True)
                confidence, pseudo = aligned.max(-1)
                m = c.alignment_momentum
                self.pseudo_mean.mul_(m).add_(probs.mean(0), alpha=1 - m)
                confident = (confidence >= c.pseudo_label_threshold).float()
            per_sample = F.cross_entropy(logits[unlabelled[rows]], pseudo, reduction="none")
            total = total + c.pseudo_label_weight * (per_sample * confident).mean()
            metrics["pseudo_labelled"] = float(confident.mean())
        if labelled.any():           # after use: this batch's labels align the next ones
            self.class_counts += torch.bincount(labels[labelled], minlength=c.num_classes)
        return total

    @torch.no_grad()
    def after_step(self, model: DINOStudent) -> None:
        """EMA teacher update, after the optimizer moved the student."""
        m = self.dino.teacher_momentum
        for t, s in zip(self.teacher.parameters(), model.parameters()):
            if s.requires_grad:      # a frozen base is the same in both: nothing to average
                t.mul_(m).add_(s.detach(), alpha=1 - m)



TASKS.register("mm_dino", DINOConfig)(MMDINOTask)
