"""The ``foundation`` model's configuration: which pretrained encoder, how it is adapted to
the layout of the site's studies, and what of it trains."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .families import FAMILIES

# A weights NAME, resolved by each side in its own directory: letters, digits, . _ - only, so
# no separator, no "..", nothing absolute can ever make it point outside that directory.
WEIGHTS_NAME = re.compile(r"[A-Za-z0-9._-]+")


def check_weights_name(name: str) -> str:
    """``name`` if it is a bare directory name, else ``ValueError`` saying why."""
    if not isinstance(name, str) or not WEIGHTS_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"foundation weights must be a bare name ([A-Za-z0-9._-]+, not . or ..) "
                         f"that each site resolves in its own foundation-dir, got {name!r}; a "
                         "site never reads a path named by the job")
    return name

METHODS = ("lora", "dora", "ia3", "full", "linear_probe")
CHANNEL_TOKENS = ("per_channel", "fused")
PATCH_INIT = ("mean", "channels")


@dataclass(frozen=True)
class FoundationConfig:
    """A pretrained vision encoder fine-tuned on multi-channel studies.

    ``weights`` is a bare NAME, never a path: each side resolves it in its own directory of
    encoders (a site: node config ``foundation-dir``; the coordinator: ``model.foundation_dir``)
    as ``<dir>/<weights>`` (``save_pretrained`` layout, safetensors only). A path in a message
    from the server would let the coordinator choose what a site reads; the job carries the
    digest of the frozen base instead, which each site checks against its own copy.
    """

    weights: str = ""               # required: a name in each side's foundation directory
    family: str = ""                # if set, the directory must hold this family
    num_channels: int = 4           # input channels (MRI sequences), one patch embedding each
    image_size: int = 64
    spatial_dims: int = 2           # 3: volumes (a 3D layout sets it); needs a 3D MONAI ViT
    patch_size: int = 0             # 0 = the family's own; else the pretrained kernel is resized
    num_classes: int = 3
    method: str = "lora"            # lora | dora | ia3 | full | linear_probe
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()   # module-name suffixes; () = the family's default
    lora_dropout: float = 0.0
    modality_dropout: float = 0.0   # p: full-modality masking while training (adapt.py)
    # per_channel: one token per channel and patch (MM-DINOv2); fused: one token per patch
    # location from one patch embedding over all channels (kernel inflated as in adapt.py)
    channel_tokens: str = "per_channel"
    # recompute each encoder block's activations in the backward pass instead of keeping them
    # (models.checkpointing): memory of about one block's activations, one more forward;
    # exact under DP-SGD too
    gradient_checkpointing: bool = False
    # RoPE families (DINOv3): false keeps the rotary positions of evaluation in training too,
    # without the family's random coordinate shift/jitter/rescale (its config's
    # pos_embed_*; the exported config keeps them). True: as the family trains
    rope_augmentation: bool = True
    # fused only: a learned embedding of the ``present`` vector added to every patch token, so
    # an absent channel (zeroed) is told apart from a black one; zero at the start (adapt.py)
    presence_embedding: bool = False
    # how the new patch embedding starts (adapt.py): "mean" - the pretrained kernel's mean over
    # its input colours for every channel (MM-DINOv2's recipe, any encoder); "channels" - the
    # kernel's own slice for each channel, for an encoder pretrained on this layout's channels
    # (its input channel count must equal num_channels, checked when the model is built)
    patch_init: str = "mean"
    # subtract a PUBLIC mean of the pooled features before the head, read from
    # <weights>/feature_mean.safetensors (centring.py); frozen, in the base digest
    centre_features: bool = False
    # with centre_features: then divide by a PUBLIC per-dimension spread of the pooled
    # features, read from <weights>/feature_scale.safetensors (centring.py); frozen, in the
    # base digest. Every feature on one scale before the head (the head's DP-SGD noise is the
    # same on every weight)
    scale_features: bool = False
    # keep the new patch embedding at its pretrained-derived init (adapt.py): frozen, in the
    # base digest, never travels. Fewer trainable coordinates under DP-SGD (lora.py)
    freeze_patch_embed: bool = False
    # LoRA/DoRA: keep every lora_A at a random init drawn from its name, train lora_B only
    # (FFA-LoRA, Sun et al. 2024): frozen, in the base digest, never travels; with LoRA the
    # sites' averaged B times the one A is then exactly the average of their updates B A,
    # and DP-SGD's noise spreads over half the adapter coordinates (lora.py)
    freeze_lora_a: bool = False
    # k > 0: project the (centred) pooled features onto the first k PUBLIC principal directions
    # in <weights>/feature_projection.safetensors before a k-input head (projection.py);
    # frozen, in the base digest. 0 = off
    project_features: int = 0

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if not self.weights:
            raise ValueError("model option weights is required: the NAME of the pretrained "
                             "encoder's directory inside each site's foundation-dir")
        check_weights_name(self.weights)
        if self.family and self.family not in FAMILIES:
            raise ValueError(f"unknown foundation family {self.family!r}; supported: "
                             f"{', '.join(sorted(FAMILIES))}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")
        if self.num_channels < 1 or self.num_classes < 2:
            raise ValueError("num_channels must be >= 1 and num_classes >= 2")
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.patch_size < 0 or self.image_size < 1:
            raise ValueError("patch_size must be >= 0 and image_size >= 1")
        if self.patch_size and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size "
                             f"{self.patch_size}")
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_rank must be >= 1, lora_alpha > 0, lora_dropout in [0, 1)")
        if self.channel_tokens not in CHANNEL_TOKENS:
            raise ValueError(f"unknown channel_tokens {self.channel_tokens!r}; choose one of "
                             f"{', '.join(CHANNEL_TOKENS)}")
        if self.patch_init not in PATCH_INIT:
            raise ValueError(f"unknown patch_init {self.patch_init!r}; choose one of "
                             f"{', '.join(PATCH_INIT)}")
        for name in ("presence_embedding", "centre_features", "scale_features",
                     "freeze_patch_embed", "freeze_lora_a", "gradient_checkpointing",
                     "rope_augmentation"):
            if not isinstance(getattr(self, name), bool):    # "false" would switch it on
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.freeze_lora_a and self.method not in ("lora", "dora"):
            raise ValueError(f"freeze_lora_a freezes LoRA's A matrices; method {self.method!r} "
                             "has none (use method=lora or dora)")
        if self.scale_features and not self.centre_features:
            raise ValueError("scale_features divides the CENTRED pooled features by their "
                             "public spread; set centre_features=true as well")
        if self.scale_features and self.project_features:
            raise ValueError("scale_features and project_features cannot be combined (the "
                             "public directions are computed on unscaled features); drop one")
        if isinstance(self.project_features, bool) or not isinstance(self.project_features, int) \
                or self.project_features < 0:
            raise ValueError(f"project_features must be a whole number >= 0 (0 = off), got "
                             f"{self.project_features!r}")
        if self.presence_embedding and self.method == "linear_probe":
            raise ValueError("presence_embedding is a new part that trains, and "
                             "method=linear_probe trains the head only; drop one of them")
        if self.presence_embedding and self.channel_tokens != "fused":
            raise ValueError("presence_embedding needs channel_tokens=fused (per-channel "
                             "tokens of an absent channel are masked out of attention "
                             "already); set channel_tokens=fused or drop presence_embedding")
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1], got {self.modality_dropout}")


__all__ = ["CHANNEL_TOKENS", "FoundationConfig", "METHODS", "PATCH_INIT", "WEIGHTS_NAME", "check_weights_name"]
