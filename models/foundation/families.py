"""What each supported vision-encoder family provides at its own seams.

One small class per family says where the family keeps its RGB patch projection, CLS token,
position embeddings, transformer layers and final norm, and how to run those layers over an
already-embedded token sequence with an attention mask. ``adapt.FoundationBackbone`` builds the
multi-channel embedding and calls these seams; nothing here copies a family's forward pass.

Here: the protocol, SAM and the registry. The transformers ViT-like families (DINOv2, DINOv3,
ViT, MAE, CLIP, SigLIP) are in ``hf_families``, MONAI's ViT in ``monai_nets``. timm ViTs are
read without timm (which needs torchvision, not installable beside this torch build):
``timm_vit.TimmViT`` is a pure-PyTorch copy of timm's ``VisionTransformer`` with its module
names, and ``timm_family.TimmViTSeams`` its seams.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hf_families import (CLIPSeams, DINOv3Seams, Dinov2Seams, Dinov2WithRegistersSeams,
                          SiglipSeams, ViTMAESeams, ViTSeams)
from .monai_nets import MonaiViTSeams  # MONAI's seams live with the rest of MONAI
from .timm_family import TimmViTSeams


class FamilySeams(Protocol):
    """The seams of one encoder family (see module docstring)."""

    name: ClassVar[str]
    has_cls: ClassVar[bool]
    lora_targets: ClassVar[tuple[str, ...]]     # attention projections LoRA adapts by default
    dp_unsupported: ClassVar[str | None]        # why DP-SGD's per-sample rule cannot hold
    dp_refused_methods: ClassVar[Mapping[str, str]]   # method -> why DP-SGD cannot cover it
    masks_tokens: ClassVar[bool]                # ``encode`` honours a per-token key mask

    def patch_kernel(self, encoder: nn.Module) -> tuple[Tensor, Tensor | None]:
        """Pretrained patch projection as ``([D, C, p, p] weight, [D] bias or None)``."""

    def patch_size(self, encoder: nn.Module) -> int: ...

    def hidden_size(self, encoder: nn.Module) -> int: ...

    def cls_token(self, encoder: nn.Module) -> Tensor | None:
        """``[1, 1, D]`` or None for families without one."""

    def position_embedding(self, encoder: nn.Module, grid: int) -> tuple[Tensor | None, Tensor]:
        """``(CLS position [1, 1, D] or None, patch positions [1, grid*grid, D])``."""

    def encode(self, encoder: nn.Module, tokens: Tensor, attend: Tensor,
               num_channels: int, grid: int) -> Tensor:
        """``tokens [B, T, D]``, ``attend [B, T]`` (keys that may be attended to) -> final,
        normalised hidden states ``[B, T, D]``."""

    def blocks(self, encoder: nn.Module) -> list[nn.Module]:
        """The transformer blocks ``encode`` runs, in order (what gradient checkpointing
        wraps, ``models.checkpointing``)."""

    def registers(self, encoder: nn.Module) -> int:
        """How many register tokens ``encode`` adds after CLS (and drops again): tokens the
        layers read beyond the ones the adapter hands over."""

    def unused(self, encoder: nn.Module) -> list[nn.Module | nn.Parameter]:
        """Parts of the loaded model our forward never uses (frozen, so nothing expects a
        gradient for them)."""

    def batch_major_folds(self, encoder: nn.Module) -> tuple[type[nn.Module], ...]:
        """Module types under which ``encode`` folds further items into the batch dimension,
        sample-major (DP-SGD's clipper regroups their Linear rows per sample); () if none."""




def _interpolate_grid(pos: Tensor, grid: int) -> Tensor:
    """``[1, G*G, D]`` or ``[1, G, G, D]`` -> ``[1, grid*grid, D]`` (bicubic, as HF does)."""
    d = pos.shape[-1]
    side = int(round((pos.numel() // d) ** 0.5))
    square = pos.reshape(1, side, side, d)
    if side != grid:
        square = F.interpolate(square.permute(0, 3, 1, 2).float(), size=(grid, grid),
                               mode="bicubic", align_corners=False).permute(0, 2, 3, 1).to(pos)
    return square.reshape(1, grid * grid, d)


class SamSeams:
    """SAM's image encoder: windowed attention over a ``[B, H, W, D]`` grid with relative
    positions, and no attention-mask argument. Each channel is therefore encoded as its own
    grid (channels folded into the batch) and fused by the pooled mean over present channels:
    absent channels never meet the present ones, which is exact masking without a mask.

    DP-SGD: inside every ``SamVisionLayer`` the rows are sample-major folds of the batch -
    ``encode`` folds channels (``[B*S, g, g, D]``, sample i's channels are rows
    ``i*S .. i*S+S-1``), a windowed layer's ``window_partition`` pads the grid to a multiple
    of the window and folds windows after that (``[B*S*nW, w, w, D]``, a reshape then a
    permute that keeps the batch index outermost), a global layer keeps ``[B*S, g, g, D]``.
    The layer is declared (``batch_major_folds``) so the clipper sums a sample's rows: LoRA
    (on ``qkv``, and on ``proj``/``lin1``/``lin2`` when targeted) and a linear probe are
    exact. ``method=full`` is refused: it trains the relative-position tables
    (``rel_pos_h``/``rel_pos_w``), the absolute position grid and the LayerNorms inside the
    folded layers, none of which has a per-sample rule for folded rows.
    """

    name = "sam"
    has_cls = False
    masks_tokens = False     # no attention-mask argument: a hidden token cannot be hidden
    lora_targets = ("qkv",)
    dp_unsupported = None
    dp_refused_methods = MappingProxyType({
        "full": "method=full trains SAM's relative-position tables, position grid and the "
                "LayerNorms of its window-folded layers, which have no exact per-sample "
                "gradient rule; use method=lora or linear_probe"})

    def patch_size(self, encoder):
        p = encoder.config.patch_size
        return int(p[0] if isinstance(p, (tuple, list)) else p)

    def hidden_size(self, encoder):
        return int(encoder.config.hidden_size)

    def patch_kernel(self, encoder):
        conv = encoder.patch_embed.projection
        return conv.weight, conv.bias

    def cls_token(self, encoder):
        return None

    def position_embedding(self, encoder, grid):
        if encoder.pos_embed is None:
            return None, torch.zeros(1, grid * grid, self.hidden_size(encoder),
                                     dtype=encoder.patch_embed.projection.weight.dtype)
        return None, _interpolate_grid(encoder.pos_embed, grid)

    def encode(self, encoder, tokens, attend, num_channels, grid):
        b, t, d = tokens.shape
        x = tokens.reshape(b * num_channels, grid, grid, d)           # [B*S, g, g, D]
        for layer in encoder.layers:
            x = layer(x)
        return x.reshape(b, t, d)                                      # [B, S*N, D]

    def blocks(self, encoder):
        return list(encoder.layers)

    def registers(self, encoder):
        return 0

    def unused(self, encoder):
        return [encoder.patch_embed.projection, encoder.neck]

    def batch_major_folds(self, encoder):
        # The layers ``encode`` calls, by the types they have (a renamed class in another
        # transformers version cannot slip out): every module inside one sees sample-major
        # folds (see the class docstring); nothing outside one does (our patch embeddings and
        # head see one row per sample). The neck, which would see [B*S, ...] too, is frozen.
        return tuple({type(layer): None for layer in encoder.layers})


FAMILIES: dict[str, type] = {cls.name: cls for cls in
                             (Dinov2Seams, Dinov2WithRegistersSeams, DINOv3Seams, ViTSeams,
                              ViTMAESeams, CLIPSeams, SiglipSeams, SamSeams, MonaiViTSeams,
                              TimmViTSeams)}


def seams_for(family: str, **monai_args) -> FamilySeams:
    """The seams object of ``family``; MONAI's needs its checkpoint's constructor arguments."""
    if family not in FAMILIES:
        raise ValueError(f"unsupported encoder family {family!r}; supported: "
                         f"{', '.join(sorted(FAMILIES))}")
    if family == MonaiViTSeams.name:
        return MonaiViTSeams(monai_args)
    return FAMILIES[family]()


__all__ = ["FAMILIES", "FamilySeams", "seams_for"]
