"""Single-input wrapper for serving/export: absent sequences are all-zero channels."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ExportedClassifier(nn.Module):
    """``images [B, S, *spatial]`` -> class probabilities; presence is read off the input."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        c = model.config
        self.input_shape = (c.num_sequences, *([c.img_size] * c.spatial_dims))

    def forward(self, images: Tensor) -> Tensor:
        images = torch.as_tensor(images, dtype=torch.float32)
        present = images.flatten(2).abs().amax(-1) > 0                   # [B, S]
        present[:, 0] |= ~present.any(1)          # an all-zero input still needs one token set
        return self.model(images, present).softmax(-1)
