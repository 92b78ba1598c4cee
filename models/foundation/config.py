"""The ``foundation`` model's configuration: which pretrained encoder, how it is adapted to
the layout of the site's studies, and what of it trains."""

from __future__ import annotations

from dataclasses import dataclass

from .families import FAMILIES

METHODS = ("lora", "dora", "ia3", "full", "linear_probe")


@dataclass(frozen=True)
class FoundationConfig:
    """A pretrained vision encoder fine-tuned on multi-channel studies.

    ``weights_dir`` names a local directory (``save_pretrained`` layout, safetensors only).
    TODO(site-weights): in deployment this directory must come from the SITE's own
    configuration (a name resolved by the site and checked against a digest), never from the
    coordinator - a path in a message from the server would let it choose what a site loads.
    Until that is wired, it is taken from the model options like any other option.
    """

    weights_dir: str = ""
    family: str = ""                # if set, the directory must hold this family
    num_channels: int = 4           # input channels (MRI sequences), one patch embedding each
    image_size: int = 64
    patch_size: int = 0             # 0 = the family's own; else the pretrained kernel is resized
    num_classes: int = 3
    method: str = "lora"            # lora | dora | ia3 | full | linear_probe
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()   # module-name suffixes; () = the family's default
    lora_dropout: float = 0.0
    modality_dropout: float = 0.0   # p: full-modality masking while training (adapt.py)

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if self.family and self.family not in FAMILIES:
            raise ValueError(f"unknown foundation family {self.family!r}; supported: "
                             f"{', '.join(sorted(FAMILIES))}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")
        if self.num_channels < 1 or self.num_classes < 2:
            raise ValueError("num_channels must be >= 1 and num_classes >= 2")
        if self.patch_size < 0 or self.image_size < 1:
            raise ValueError("patch_size must be >= 0 and image_size >= 1")
        if self.patch_size and self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size "
                             f"{self.patch_size}")
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_rank must be >= 1, lora_alpha > 0, lora_dropout in [0, 1)")
        if not 0.0 <= self.modality_dropout <= 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1], got {self.modality_dropout}")


__all__ = ["FoundationConfig", "METHODS"]
