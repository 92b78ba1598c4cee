"""Bring-your-own foundation model: a pretrained DINOv2 / ViT / MAE / CLIP / SigLIP / SAM /
MONAI vision encoder from a local directory, adapted to multi-channel studies and fine-tuned
with LoRA (or DoRA, IA3, fully, or as a linear probe).

``loading`` (local directory -> encoder, strict), ``families`` (each family's seams),
``adapt`` (multi-channel backbone with the MultiModalViT interface), ``lora`` (what trains,
frozen digest). Registered in ``models.MODELS`` as ``"foundation"``. transformers, peft and
MONAI are imported only when such a model is built, so importing ``models`` stays light.
"""

from __future__ import annotations

from ..registry import MODELS
from .config import METHODS, FoundationConfig


@MODELS.register("foundation", FoundationConfig)
def build_foundation(config: FoundationConfig):
    """Load ``config.weights_dir``, adapt it to ``config.num_channels`` channels and set
    what trains (``config.method``).

    The task wrapping this model must leave it as built (``mode="full"`` in the head tasks):
    their LoRA mode targets MultiModalViT's module names.
    """
    from .adapt import FoundationBackbone
    from .loading import FoundationLoadError, load_encoder
    from .lora import apply_method

    if not config.weights_dir:
        # TODO(site-weights): resolve from the site's own configuration, never the server's.
        raise FoundationLoadError("model option weights_dir is required: the local directory "
                                  "holding the pretrained encoder")
    loaded = load_encoder(config.weights_dir, expected_family=config.family)
    model = FoundationBackbone(loaded, config)
    return apply_method(model, config.method, rank=config.lora_rank, alpha=config.lora_alpha,
                        targets=config.lora_targets, dropout=config.lora_dropout)


__all__ = ["FoundationConfig", "METHODS", "build_foundation"]
