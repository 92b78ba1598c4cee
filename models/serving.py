"""Single-input wrappers for serving/export: absent sequences are all-zero channels.

``servable(model)`` turns whatever a phase trained into a plain module: a classifier (LoRA
adapters merged into their base weights), a segmenter (a fine-tuned SwinUNETR, or the UNETR
decoder on our ViT, adapters merged) or, for a pretraining objective, its backbone as an
encoder of pooled features. The backbone is our ``MultiModalViT`` or a pretrained foundation
encoder (``models.foundation``: peft LoRA/DoRA/IA3 merged); both are token backbones
(``models.backbone.TokenBackbone``: ``input_shape``, ``forward_features``/``pool``/``head``),
so the wrappers serve either.
"""

from __future__ import annotations

import copy
import sys

import torch
from torch import Tensor, nn

from .backbone import TokenBackbone
from .foundation.adapt import FoundationBackbone
from .foundation.swin import SwinSegmenter
from .segmentation import UNETR
from .task import TaskModel
from .vit import MultiModalViT


class ExportedClassifier(nn.Module):
    """``images [B, S, *spatial]`` -> class probabilities (softmax), or with ``multi_label``
    one independent probability per finding (sigmoid); presence is read off the input."""

    def __init__(self, model: TokenBackbone, multi_label: bool = False):
        super().__init__()
        self.model = model
        self.multi_label = multi_label
        self.input_shape = model.input_shape

    def forward(self, images: Tensor) -> Tensor:
        images = torch.as_tensor(images, dtype=torch.float32)
        logits = self.model(images, _present(images))
        return logits.sigmoid() if self.multi_label else logits.softmax(-1)


def _present(images: Tensor) -> Tensor:
    present = images.flatten(2).abs().amax(-1) > 0                       # [B, S]
    present[:, 0] |= ~present.any(1)          # an all-zero input still needs one token set
    return present


class ExportedSegmenter(nn.Module):
    """``images [B, S, *spatial]`` -> per-voxel class probabilities ``[B, 2, *spatial]``
    (softmax over background / lesion) of a fine-tuned segmenter: a SwinUNETR, or the UNETR
    decoder on our multi-modal ViT (``models.segmentation``)."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...]):
        super().__init__()
        self.model = model
        self.input_shape = tuple(input_shape)

    def forward(self, images: Tensor) -> Tensor:
        images = torch.as_tensor(images, dtype=torch.float32)
        return self.model(images, _present(images)).softmax(1)


class ExportedEncoder(nn.Module):
    """``images [B, S, *spatial]`` -> pooled backbone features ``[B, 2D]``."""

    def __init__(self, backbone: TokenBackbone):
        super().__init__()
        self.backbone = backbone
        self.input_shape = backbone.input_shape

    def forward(self, images: Tensor) -> Tensor:
        images = torch.as_tensor(images, dtype=torch.float32)
        present = _present(images)
        return self.backbone.pool(self.backbone.forward_features(images, present), present)


def merge_adapters(model: MultiModalViT) -> MultiModalViT:
    """A plain backbone with any LoRA adapters merged into the base weights (a copy)."""
    merged = copy.deepcopy(model)
    # A LoRA layer is an instance of a class in peft.tuners.lora: without that module
    # loaded there is none to merge, and importing peft costs ~2 s of CPU.
    lora = sys.modules.get("peft.tuners.lora")
    if lora is None:
        return merged
    layers = [m for m in merged.modules() if isinstance(m, lora.LoraLayer)]
    if not layers:
        return merged
    for layer in layers:
        layer.merge()
    plain = MultiModalViT(model.config)
    if model.head is None:                  # a segmenter's or an encoder's ViT
        plain.head = None
    state = {k.replace(".base_layer.", "."): v for k, v in merged.state_dict().items()
             if "lora_" not in k}
    plain.load_state_dict(state)
    return plain


def plain_backbone(model: nn.Module) -> TokenBackbone:
    """A copy of the backbone inside any trained model (a classifier, or a pretraining
    objective's ``backbone``), LoRA adapters merged, class head kept if it has one."""
    backbone = trained_backbone(model)
    if isinstance(backbone, FoundationBackbone):
        from .foundation.export import merge_adapters as merge_foundation

        return merge_foundation(backbone)
    return merge_adapters(backbone)


def trained_backbone(model: nn.Module) -> TokenBackbone:
    """The backbone inside any trained model, as it is (adapters not merged)."""
    backbone = model.backbone if isinstance(model, TaskModel) else model
    if not isinstance(backbone, (MultiModalViT, FoundationBackbone)):
        raise TypeError(f"cannot export {type(model).__name__}: no multi-modal ViT backbone "
                        "(MultiModalViT or a foundation model's)")
    return backbone


def servable(model: nn.Module, *, multi_label: bool = False) -> nn.Module:
    """What a model registry should hold for ``model`` (see module docstring);
    ``multi_label``: the head scores independent findings (sigmoid, not softmax)."""
    if isinstance(model, SwinSegmenter):
        from .foundation.export import merge_adapters as merge_foundation

        return ExportedSegmenter(merge_foundation(model), model.input_shape)
    if isinstance(model, UNETR):            # its ViT's adapters merged, the decoder as trained
        segmenter = copy.deepcopy(model)
        segmenter.backbone = merge_adapters(model.backbone)
        return ExportedSegmenter(segmenter, model.backbone.input_shape)
    plain = plain_backbone(model)
    if isinstance(model, (MultiModalViT, FoundationBackbone)) and model.head is not None:
        return ExportedClassifier(plain, multi_label)
    plain.head = None
    return ExportedEncoder(plain)
