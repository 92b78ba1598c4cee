"""Lesion segmentation: a MONAI UNETR-style decoder on the (pretrained) multi-modal ViT.

The backbone's tokens are fused across present sequences (masked mean per patch position),
reshaped to the patch grid and upsampled by MONAI's UNETR blocks (GroupNorm, so no batch
statistics), with skips from intermediate transformer layers and a convolutional stem on
the raw sequences - UNETR (Hatamizadeh et al. 2022) for any ``patch_size = 2**L``, 2D or 3D.

Loss: per-sample Dice + cross-entropy over studies that have a mask (``has_mask``); a mean of
per-sample terms, so DP-SGD clips each study's gradient exactly.
Metrics: Dice and HD95 (MONAI) per study, averaged over studies with a lesion mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import SplitMetrics
from .registry import TASKS
from .task import DataNeeds, StepOutput, TaskBase, TaskModel
from .vit import MultiModalViT


SEGMENT_CLASSES = 2     # background / lesion: every segmenter's output channels, the loss's


@dataclass(frozen=True)
class SegmentationConfig:
    num_classes: int = 3              # the study classes (unused here; passed by the server)
    feature_size: int = 16            # channels at full resolution (UNETR's feature_size)
    groups: int = 8                   # GroupNorm groups
    dice_weight: float = 1.0
    label_fraction: float = 1.0       # fraction of each site's masked training studies used

    def __post_init__(self):
        if self.feature_size < 1 or self.feature_size % self.groups:
            raise ValueError(f"feature_size {self.feature_size} must be a positive multiple "
                             f"of groups {self.groups}")
        if not 0.0 < self.label_fraction <= 1.0:
            raise ValueError(f"label_fraction must be in (0, 1], got {self.label_fraction}")


class UNETR(TaskModel):
    """Backbone (``self.backbone``) plus a UNETR decoder producing ``[B, 2, *spatial]`` logits."""

    def __init__(self, backbone: MultiModalViT, config: SegmentationConfig):
        # Imported here: importing any MONAI module imports all of MONAI (~5 s of CPU), which
        # a process that never builds a UNETR (every classification run) should not pay.
        from monai.networks.blocks import (UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock,
                                           UnetrUpBlock)

        super().__init__()
        c = backbone.config
        levels = int(round(math.log2(c.patch_size)))
        if 2**levels != c.patch_size or levels < 1:
            raise ValueError(f"UNETR needs patch_size to be a power of two >= 2, got {c.patch_size}")
        backbone.head = None
        self.backbone = backbone
        self.levels = levels
        norm = ("group", {"num_groups": config.groups})
        f, d, dims = config.feature_size, c.dim, c.spatial_dims
        self.stem = UnetrBasicBlock(dims, c.num_sequences, f, kernel_size=3, stride=1,
                                    norm_name=norm, res_block=True)
        # Skip at 1/2**l resolution from transformer layer l (layers reused if depth < levels).
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(dims, d, f * 2**lvl, num_layer=levels - lvl - 1, kernel_size=3,
                           stride=1, upsample_kernel_size=2, norm_name=norm, res_block=True)
            for lvl in range(1, levels))
        channels = [f * 2**lvl for lvl in range(levels)]
        self.ups = nn.ModuleList(
            UnetrUpBlock(dims, d if lvl == levels - 1 else channels[lvl + 1], channels[lvl],
                         kernel_size=3, upsample_kernel_size=2, norm_name=norm, res_block=True)
            for lvl in range(levels))
        self.out = UnetOutBlock(dims, f, SEGMENT_CLASSES)

    def _grid(self, tokens: Tensor, present: Tensor) -> Tensor:
        """Patch tokens ``[B, 1+S*N, D]`` -> ``[B, D, g, g(, g)]``, mean over present sequences."""
        c = self.backbone.config
        b, s = present.shape
        x = tokens[:, 1:].reshape(b, s, -1, c.dim)                        # [B, S, N, D]
        w = present.to(x.dtype)[:, :, None, None]
        x = (x * w).sum(1) / w.sum(1).clamp(min=1)                        # [B, N, D]
        g = round(x.shape[1] ** (1 / c.spatial_dims))
        return x.transpose(1, 2).reshape(b, c.dim, *([g] * c.spatial_dims))

    def forward(self, images: Tensor, present: Tensor) -> Tensor:
        hidden: list[Tensor] = []
        last = self.backbone.forward_features(images, present, collect=hidden)
        depth = len(hidden)
        pick = [min(depth - 1, round(lvl * depth / self.levels) - 1) for lvl in range(1, self.levels)]
        skips = [self.stem(images)] + [
            block(self._grid(hidden[max(i, 0)], present)) for block, i in zip(self.skips, pick)]
        x = self._grid(last, present)
        for lvl in reversed(range(self.levels)):
            x = self.ups[lvl](x, skips[lvl])
        return self.out(x)


def dice_ce_loss(logits: Tensor, mask: Tensor, dice_weight: float = 1.0) -> Tensor:
    """Per-sample soft Dice (foreground) + cross-entropy ``[B]``, in at least float32
    (bf16 logits under autocast; float64 stays float64)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = F.cross_entropy(logits, mask.long(), reduction="none").flatten(1).mean(1)
    prob = logits.softmax(1)[:, 1].flatten(1)
    target = mask.to(logits.dtype).flatten(1)
    dice = (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
    return ce + dice_weight * (1 - dice)


class SegmentationTask(TaskBase):
    """Binary lesion segmentation; studies without a mask do not contribute."""

    # A mean of per-sample losses. The decoders' layers (convolutions, transposed
    # convolutions, GroupNorm/InstanceNorm) have exact per-sample rules (models/conv_grads.py);
    # a layer without one is refused by name by the site's clipper (and SwinUNETR fine-tunes
    # it does not cover at config load, models/foundation/swin.py swin_dp_refusal).
    batch_coupling = None

    def __init__(self, config: SegmentationConfig):
        self.config = config

    @property
    def data_needs(self) -> DataNeeds:
        return DataNeeds(label_fraction=self.config.label_fraction, masks=True)

    def wrap(self, backbone: MultiModalViT) -> UNETR:
        from .foundation.swin import SwinSegmenter

        if isinstance(backbone, SwinSegmenter):      # a whole pretrained segmentation network
            return backbone
        if not isinstance(backbone, MultiModalViT):   # the decoder reads its config and blocks
            raise ValueError(f"the segmentation decoder (UNETR) is built on a MultiModalViT, "
                             f"not a {type(backbone).__name__}: use model=mmvit, or "
                             "model=foundation_swin for a pretrained segmentation network")
        return UNETR(backbone, self.config)

    def step(self, model: UNETR, batch: dict[str, Tensor]) -> StepOutput:
        has = batch["has_mask"].bool()
        logits = model(batch["image"], batch["present"])
        per_sample = dice_ce_loss(logits, batch["mask"], self.config.dice_weight)
        loss = (per_sample * has).sum() / has.sum().clamp(min=1)
        return StepOutput(loss, int(has.sum()))

    def evaluator(self) -> SegmentationEvaluator:
        return SegmentationEvaluator(self.config)


class SegmentationEvaluator:
    """Per study with a mask: the loss, Dice and HD95 (MONAI); ``loss``/``dice``/``hd95`` are
    means over those studies (``n_masks``; Dice where the mask holds a lesion, HD95 where it
    is defined: the others are counted in ``dice_undefined`` / ``hd95_undefined``). Studies
    without a mask count in ``n`` and nowhere else. The counts say how many studies each
    figure averages over, so a site's floor checks them (``client.queries.split_counts``): a
    split of many studies and one mask would otherwise send that one study's figures."""

    def __init__(self, config: SegmentationConfig):
        self.config = config
        self.losses: list[Tensor] = []
        self.scores: list[Tensor] = []        # [B, 2]: (Dice, HD95) per study, NaN if no mask
        self.has: list[Tensor] = []

    @torch.no_grad()
    def update(self, model: UNETR, batch: dict[str, Tensor]) -> None:
        from monai.metrics import compute_dice, compute_hausdorff_distance   # see UNETR

        logits = model(batch["image"], batch["present"]).float()
        mask = batch["mask"].long()
        loss = dice_ce_loss(logits, mask, self.config.dice_weight)
        pred = F.one_hot(logits.argmax(1), 2).movedim(-1, 1).float()
        truth = F.one_hot(mask, 2).movedim(-1, 1).float()
        dice = compute_dice(pred, truth, include_background=False)[:, 0]
        hd95 = compute_hausdorff_distance(pred, truth, percentile=95)[:, 0]
        has = batch["has_mask"].bool()
        scores = torch.stack([dice, hd95], 1).masked_fill(~has[:, None], float("nan"))
        self.losses.append(loss.masked_fill(~has, float("nan")).float().cpu())
        self.scores.append(scores.float().cpu())
        self.has.append(has.cpu())

    def compute(self) -> SplitMetrics:
        if not self.losses:
            return SplitMetrics(n=0, loss=0.0, means={"dice": 0.0, "hd95": 0.0},
                                counts={"n_masks": 0.0, "dice_undefined": 0.0,
                                        "hd95_undefined": 0.0})
        losses, scores = torch.cat(self.losses).numpy(), torch.cat(self.scores).numpy()
        keep = torch.cat(self.has).numpy()
        dice, hd95 = scores[keep, 0], scores[keep, 1]
        defined, finite = np.isfinite(dice), np.isfinite(hd95)
        return SplitMetrics(
            n=len(losses), loss=float(np.nanmean(losses[keep])) if keep.any() else 0.0,
            means={"dice": float(dice[defined].mean()) if defined.any() else 0.0,
                   "hd95": float(hd95[finite].mean()) if finite.any() else 0.0},
            counts={"n_masks": float(keep.sum()), "dice_undefined": float((~defined).sum()),
                    "hd95_undefined": float((~finite).sum())})


TASKS.register("segmentation", SegmentationConfig)(SegmentationTask)
