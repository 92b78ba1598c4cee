"""What each supported vision-encoder family provides at its own seams.

One small class per family says where the family keeps its RGB patch projection, CLS token,
position embeddings, transformer layers and final norm, and how to run those layers over an
already-embedded token sequence with an attention mask. ``adapt.FoundationBackbone`` builds the
multi-channel embedding and calls these seams; nothing here copies a family's forward pass.

timm ViTs are read without timm (which needs torchvision, not installable beside this torch
build): ``timm_vit.TimmViT`` is a pure-PyTorch copy of timm's ``VisionTransformer`` with its
module names, and ``timm_family.TimmViTSeams`` its seams.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .coverage import FULL_NOT_COVERED
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


class _HFViTLike:
    """HF ViT-style encoders: embeddings with ``interpolate_pos_encoding``, pre-norm layers
    called as ``layer(hidden_states, attention_mask)``, a final LayerNorm."""

    has_cls: ClassVar[bool] = True
    dp_unsupported: ClassVar[str | None] = None
    dp_refused_methods: ClassVar[Mapping[str, str]] = FULL_NOT_COVERED
    masks_tokens: ClassVar[bool] = True

    def patch_size(self, encoder):
        p = encoder.config.patch_size
        return int(p[0] if isinstance(p, (tuple, list)) else p)

    def hidden_size(self, encoder):
        return int(encoder.config.hidden_size)

    def _projection(self, encoder) -> nn.Conv2d:
        return encoder.embeddings.patch_embeddings.projection

    def patch_kernel(self, encoder):
        conv = self._projection(encoder)
        return conv.weight, conv.bias

    def cls_token(self, encoder):
        return encoder.embeddings.cls_token

    def position_embedding(self, encoder, grid):
        # The family's own interpolation only reads the token count of its first argument and
        # the pixel size; the pixel size is the family's patch times our grid, so it resamples
        # to our grid whatever patch size our layout uses.
        pixels = grid * self.patch_size(encoder)
        d = self.hidden_size(encoder)
        dummy = torch.empty(1, int(self.has_cls) + grid * grid, d, device="meta")
        pos = encoder.embeddings.interpolate_pos_encoding(dummy, pixels, pixels)
        if self.has_cls:
            return pos[:, :1], pos[:, 1:]
        return None, pos

    def _layers(self, encoder):
        return encoder.layers

    def blocks(self, encoder):
        return list(self._layers(encoder))

    def _pre_norm(self, encoder):
        return None

    def _post_norm(self, encoder):
        return encoder.layernorm

    def _registers(self, encoder) -> Tensor | None:
        """Register tokens ``[1, R, D]`` the family puts after its CLS token, or None."""
        return None

    def _layer_arguments(self, encoder, tokens: Tensor, num_channels: int, grid: int) -> tuple:
        """Positional arguments every layer takes after ``(hidden_states, mask)``."""
        return ()

    def encode(self, encoder, tokens, attend, num_channels, grid):
        from transformers.masking_utils import create_bidirectional_mask

        # Registers (where the family has them) go between CLS and the patch tokens, as in the
        # family's own embeddings, always attendable, and are dropped after the final norm:
        # the adapter, pooling and objectives never see them.
        registers = self._registers(encoder)
        r = 0 if registers is None else registers.shape[1]
        if r:
            b = tokens.shape[0]
            tokens = torch.cat([tokens[:, :1], registers.to(tokens.dtype).expand(b, -1, -1),
                                tokens[:, 1:]], dim=1)
            attend = torch.cat([attend[:, :1], attend.new_ones(b, r), attend[:, 1:]], dim=1)
        # The family's own mask builder gives the format its attention implementation wants
        # (additive float for eager, boolean for sdpa).
        mask = create_bidirectional_mask(config=encoder.config, inputs_embeds=tokens,
                                         attention_mask=attend)
        extra = self._layer_arguments(encoder, tokens, num_channels, grid)
        pre = self._pre_norm(encoder)
        x = pre(tokens) if pre is not None else tokens
        for layer in self._layers(encoder):
            x = layer(x, mask, *extra)  # positional, no kwargs: per-sample hooks see plain calls
        x = self._post_norm(encoder)(x)
        return torch.cat([x[:, :1], x[:, 1 + r:]], dim=1) if r else x

    def unused(self, encoder):
        out = [self._projection(encoder)]
        for name in ("mask_token",):
            if getattr(encoder.embeddings, name, None) is not None:
                out.append(getattr(encoder.embeddings, name))
        if getattr(encoder, "pooler", None) is not None:
            out.append(encoder.pooler)
        return out

    def batch_major_folds(self, encoder):
        return ()        # one row per sample in every layer


class Dinov2Seams(_HFViTLike):
    name = "dinov2"
    lora_targets = ("q_proj", "v_proj")

    def _layers(self, encoder):
        return encoder.encoder.layer


class Dinov2WithRegistersSeams(Dinov2Seams):
    """DINOv2 with register tokens (Darcet et al. 2024): the registers join after CLS inside
    ``encode`` (they carry no position, as in the family's embeddings)."""
    name = "dinov2_with_registers"

    def _registers(self, encoder):
        return encoder.embeddings.register_tokens


class DINOv3Seams(_HFViTLike):
    """DINOv3 ViT: rotary positions (RoPE) inside attention instead of an additive position
    table, register tokens after CLS, layer scale. The rotation of a patch token depends on
    its location only, so every channel's token at one location gets that location's rotation
    (the sequence is channel-major: the family's own table for the grid, tiled once per token
    group); CLS and the registers get none, as in the family's forward. In training mode the
    family's own RoPE module jitters/rescales the coordinates as its config says (one draw a
    forward pass, shared by the batch: no sample's gradient depends on another sample)."""
    name = "dinov3"
    lora_targets = ("q_proj", "v_proj")

    def _projection(self, encoder):
        return encoder.embeddings.patch_embeddings

    def position_embedding(self, encoder, grid):
        like = encoder.embeddings.cls_token                                 # [1, 1, D]
        return torch.zeros_like(like), like.new_zeros(1, grid * grid, like.shape[-1])

    def _layers(self, encoder):
        return encoder.model.layer

    def _post_norm(self, encoder):
        return encoder.norm

    def _registers(self, encoder):
        return encoder.embeddings.register_tokens

    def _layer_arguments(self, encoder, tokens, num_channels, grid):
        side = grid * self.patch_size(encoder)
        # The RoPE module reads only the pixel grid's shape, device and dtype; the family's
        # forward gives it pixels in the patch kernel's dtype (float32 under bf16 autocast,
        # where the tokens are bf16), and so do we.
        like = self._projection(encoder).weight
        pixels = like.new_empty(1, 1, 1, 1).to(tokens.device).expand(1, 1, side, side)
        cos, sin = encoder.rope_embeddings(pixels)                          # [N, head_dim]
        return ((cos.repeat(num_channels, 1), sin.repeat(num_channels, 1)),)


class ViTSeams(_HFViTLike):
    name = "vit"
    lora_targets = ("q_proj", "v_proj")


class ViTMAESeams(_HFViTLike):
    name = "vit_mae"
    lora_targets = ("q_proj", "v_proj")
    # MAE's random masking lives in its embeddings' forward, which is never called: the
    # encoder sees every patch, as when an MAE encoder is fine-tuned.


class CLIPSeams(_HFViTLike):
    name = "clip"
    lora_targets = ("q_proj", "v_proj")

    def _projection(self, encoder):
        return encoder.embeddings.patch_embedding

    def cls_token(self, encoder):
        return encoder.embeddings.class_embedding.reshape(1, 1, -1)

    def _layers(self, encoder):
        return encoder.encoder.layers

    def _pre_norm(self, encoder):
        return encoder.pre_layrnorm

    def _post_norm(self, encoder):
        # CLIP normalises only its pooled CLS; a LayerNorm is per token, so applying it to
        # every token gives the same CLS and comparable patch features for the mean pool.
        return encoder.post_layernorm


class SiglipSeams(CLIPSeams):
    name = "siglip"
    has_cls = False          # SigLIP pools with its attention head; we mean-pool instead

    def cls_token(self, encoder):
        return None

    def _pre_norm(self, encoder):
        return None

    def unused(self, encoder):
        return super().unused(encoder) + ([encoder.head] if getattr(encoder, "head", None)
                                          is not None else [])


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
