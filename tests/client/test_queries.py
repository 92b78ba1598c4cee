"""The site's activation estimates (``client.queries``), checked against hand counts."""

from __future__ import annotations

import torch
from torch import nn

from client.queries import forward_activations, step_activations


class _Attention(nn.Module):
    """Tokens ``[rows, T, C]`` -> ``[rows, T, C]``, holding ``num_heads`` scores a pair."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return self.proj(x)


class _Segmenter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 2, stride=2)          # [B, 6, 4, 4] from 8 x 8
        self.attention = _Attention(6, heads=3)

    def forward(self, images, present):
        tokens = self.conv(images).flatten(2).transpose(1, 2)          # [B, 16, 6]
        return self.attention(tokens)


def test_a_meta_forward_counts_every_leaf_output_and_every_attention_score():
    with torch.device("meta"):
        model = _Segmenter()
    b = 5
    leaves = b * 6 * 16 + b * 16 * 6                                  # conv, proj outputs
    scores = b * 3 * 16 * 16                                          # rows x heads x T^2
    assert forward_activations(model, (2, 8, 8), b) == leaves + scores


def test_the_static_estimate_counts_widths_heads_and_strided_convolutions():
    model = _Segmenter()
    tokens, voxels, b = 16, 64, 5
    width, heads = 6, 3                                           # conv: 6 over stride 2 x 2
    assert step_activations(model, [(tokens, voxels)], b) == \
        b * (tokens * (width + heads * tokens) + voxels * 6 // 4)


def test_every_familys_attention_heads_are_counted():
    """Attention modules name their head count three ways (ours ``heads``; timm, MONAI,
    DINOv3, CLIP ``num_heads``; DINOv2, ViT, BERT, SAM ``num_attention_heads``): each
    layer's heads count once."""
    import transformers
    from monai.networks.nets import ViT

    from client.queries import _heads
    from models.vit import MultiModalViT, ViTConfig

    size = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3)
    with torch.device("meta"):
        models = [transformers.Dinov2Model(transformers.Dinov2Config(**size)),
                  transformers.BertModel(transformers.BertConfig(**size)),
                  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**size)),
                  transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
                      **size, intermediate_size=48)),
                  ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=24, mlp_dim=48,
                      num_layers=2, num_heads=3, spatial_dims=2),
                  MultiModalViT(ViTConfig(dim=24, depth=2, heads=3))]
    for model in models:
        assert sum(_heads(m) for m in model.modules()) == 2 * 3, type(model).__name__


def test_a_model_the_site_cannot_size_is_refused_not_waved_through():
    """Every registered model has a token layout or an input shape; one with neither (a
    future family, a registry mistake) would skip the activation check - refused instead."""
    import pytest

    from client.queries import QueryLimits, QueryRefused

    with pytest.raises(QueryRefused, match="cannot size what a training step of it holds"):
        QueryLimits().check_model_size(lambda: (nn.Linear(4, 4), None))
