"""The transformers ViT-like families (DINOv2 with and without registers, DINOv3, ViT,
ViT-MAE, CLIP, SigLIP): their seams (``families.FamilySeams``) - where each keeps its patch
projection, CLS token, positions, layers and final norm, and how ``encode`` runs those layers
over our multi-channel tokens with the family's own attention-mask builder. SAM, timm and
MONAI have their own modules.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from .coverage import FULL_NOT_COVERED


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

    def registers(self, encoder):
        tokens = self._registers(encoder)
        return 0 if tokens is None else int(tokens.shape[1])

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

    @staticmethod
    def fix_rope_positions(encoder) -> None:
        """Training positions as in evaluation: the RoPE module reads its own copy of the
        config with no shift, jitter or rescale (``encoder.config``, which export saves,
        keeps the family's values)."""
        rope = encoder.rope_embeddings
        rope.config = copy.deepcopy(rope.config)
        rope.config.pos_embed_shift = rope.config.pos_embed_jitter = None
        rope.config.pos_embed_rescale = None

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


__all__ = ["CLIPSeams", "DINOv3Seams", "Dinov2Seams", "Dinov2WithRegistersSeams", "SiglipSeams",
           "ViTMAESeams", "ViTSeams"]
