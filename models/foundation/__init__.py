"""Bring-your-own foundation model: a pretrained DINOv2 / ViT / MAE / CLIP / SigLIP / SAM /
MONAI vision encoder from a local directory, adapted to multi-channel studies and fine-tuned
with LoRA (or DoRA, IA3, fully, or as a linear probe).

``loading`` (local directory -> encoder, strict; ``convert``: pickle -> safetensors),
``families`` (each family's seams),
``adapt`` (multi-channel backbone with the MultiModalViT interface), ``lora`` (what trains,
frozen digest). Registered in ``models.MODELS`` as ``"foundation"``; ``swin``: a pretrained
MONAI SwinUNETR as the segmentation task's network, ``"foundation_swin"``. transformers, peft and
MONAI are imported only when such a model is built, so importing ``models`` stays light.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..registry import MODELS
from .config import METHODS, FoundationConfig, check_weights_name
from .swin import SwinSegConfig

FOUNDATION_DIR = "foundation_dir"     # the building side's own directory (a registry resource)


def resolve_weights(foundation_dir: str | Path | None, name: str) -> Path:
    """``<foundation_dir>/<name>``: where THIS side keeps the encoder the job names.

    Raises
    ------
    FoundationLoadError
        No directory configured here, or ``name`` is not a bare name.
    """
    from .loading import FoundationLoadError

    try:
        check_weights_name(name)
    except ValueError as err:
        raise FoundationLoadError(str(err)) from None
    if not foundation_dir:
        raise FoundationLoadError(
            f"the foundation model {name!r} needs a directory of pretrained encoders on this "
            "side: node config 'foundation-dir' at a site, model.foundation_dir on the "
            "coordinator")
    return Path(foundation_dir) / name


@MODELS.register("foundation", FoundationConfig, resources=(FOUNDATION_DIR,))
def build_foundation(config: FoundationConfig, *, foundation_dir: str | Path | None = None):
    """Load ``<foundation_dir>/<config.weights>``, adapt it to ``config.num_channels``
    channels and set what trains (``config.method``).

    ``foundation_dir`` is the building side's own setting, never a job option. The task
    wrapping this model must leave it as built (``mode="full"`` in the head tasks): their LoRA
    mode targets MultiModalViT's module names.
    """
    from .adapt import FoundationBackbone
    from .loading import load_encoder
    from .lora import apply_method

    loaded = load_encoder(resolve_weights(foundation_dir, config.weights),
                          expected_family=config.family)
    model = FoundationBackbone(loaded, config)
    return apply_method(model, config.method, rank=config.lora_rank, alpha=config.lora_alpha,
                        targets=config.lora_targets, dropout=config.lora_dropout,
                        freeze_patch_embed=config.freeze_patch_embed,
                        freeze_lora_a=config.freeze_lora_a)


@MODELS.register("foundation_swin", SwinSegConfig, resources=(FOUNDATION_DIR,))
def build_foundation_swin(config: SwinSegConfig, *, foundation_dir: str | Path | None = None):
    """Load the SwinUNETR ``<foundation_dir>/<config.weights>`` as the segmentation task's
    whole network (``swin.SwinSegmenter``), adapted to ``config.num_channels`` channels."""
    from .swin import SwinSegmenter, apply_swin_method, load_swin

    net, constructor = load_swin(resolve_weights(foundation_dir, config.weights))
    return apply_swin_method(SwinSegmenter(net, constructor, config))


def _site_owned_types() -> tuple[type, ...]:
    from .adapt import FoundationBackbone
    from .swin import SwinSegmenter

    return (FoundationBackbone, SwinSegmenter)


def site_owned_base(model: nn.Module) -> bool:
    """Whether ``model`` (as a task wrapped it) holds a foundation backbone: its frozen base
    weights then come from each side's own directory and never travel."""
    return any(isinstance(m, _site_owned_types()) for m in model.modules())


def base_digest(model: nn.Module) -> str:
    """Digest of every frozen weight of ``model`` (``lora.frozen_digest``): the coordinator
    sends it with the job; a site whose own base gives another refuses. A CLIP/SigLIP pair's
    tokenizer is part of its base (read from the same directory), so its file's sha256 is
    folded in: a site that would tokenize reports differently refuses too."""
    import hashlib

    from .lora import frozen_digest
    from .pair import PretrainedPair

    digest = frozen_digest(model)
    tokenizers = [m.tokenizer_sha256 for m in model.modules() if isinstance(m, PretrainedPair)]
    if not tokenizers:
        return digest
    return hashlib.sha256(f"{digest}|tokenizer:{'|'.join(tokenizers)}".encode()).hexdigest()


def dp_refusal(model: nn.Module) -> str | None:
    """Why DP-SGD's per-sample rule does not hold for a foundation backbone in ``model``
    (its family's ``dp_unsupported``), or None."""
    reasons = [m.dp_unsupported for m in model.modules()
               if isinstance(m, _site_owned_types()) and m.dp_unsupported]
    return reasons[0] if reasons else None


__all__ = ["FOUNDATION_DIR", "FoundationConfig", "METHODS", "SwinSegConfig", "base_digest",
           "build_foundation", "build_foundation_swin", "dp_refusal", "resolve_weights",
           "site_owned_base"]
