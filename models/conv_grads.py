"""Per-sample weight gradients of convolutions and affine channel norms, in plain PyTorch.

DP-SGD clips each sample's gradient (``client/privacy/persample.py``); a convolutional decoder
(MONAI's UNETR / SwinUNETR blocks) holds its trainable weights in ``Conv{1,2,3}d``,
``ConvTranspose{1,2,3}d`` and, with affine parameters, ``GroupNorm`` / ``InstanceNorm``. Every
rule here takes what the clipper captured for one layer - its input ``a`` and the gradient
``g`` of the loss with respect to its output - and returns that layer's gradients, either per
sample or as the clip-weighted sum ``sum_i c_i grad_i``. None of these layers mixes samples
(no batch statistics), so the batch gradient is the sum of the per-sample ones.

Convolutions use ``aten.convolution_backward`` - the kernel autograd itself runs for the
weight gradient, for ordinary and transposed convolutions alike - so a rule is autograd's own
computation, not a reimplementation:

* per sample: the batch is folded into the channel groups (``[1, B*C, *S]`` with
  ``groups * B``), which keeps each sample's weight gradient separate, ``[B, *weight]``;
* clip-weighted sum: the weight gradient is bilinear in ``(a, g)``, so scaling sample *i*'s
  input (or output gradient) by ``c_i`` and taking one ordinary weight gradient gives
  ``sum_i c_i grad_i`` without materialising per-sample tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
              nn.ConvTranspose3d)
NORM_TYPES = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
PER_SAMPLE_BUDGET = 1 << 24       # elements of per-sample weight gradients held at once


def conv_unsupported(module: nn.Module) -> str | None:
    """Why the rules below do not hold for ``module`` (a ``CONV_TYPES`` instance), or None."""
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} (only 'zeros' has a rule)"
    if isinstance(module.padding, str):
        return f"padding={module.padding!r} (give the padding as integers)"
    return None


def _weight_grad(module: nn.Module, a: Tensor, g: Tensor, weight: Tensor,
                 groups: int) -> Tensor:
    """Autograd's weight gradient of ``module``'s convolution for input ``a``, output
    gradient ``g`` and a weight of ``weight``'s shape (values unused)."""
    transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
    return torch.ops.aten.convolution_backward(
        g, a, weight, None, list(module.stride), list(module.padding), list(module.dilation),
        transposed, list(module.output_padding), groups, [False, True, False])[1]


def conv_per_sample(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """``{"weight": [B, *weight.shape], "bias": [B, C_out]}`` (only the trainable ones
    are needed by the caller; both are cheap to return) for ``a [B, C_in, *S_in]``,
    ``g [B, C_out, *S_out]``. The batch is processed in chunks of at most
    ``PER_SAMPLE_BUDGET`` elements of per-sample gradients."""
    w = module.weight
    b = a.shape[0]
    chunk = max(1, PER_SAMPLE_BUDGET // w.numel())
    parts = []
    for start in range(0, b, chunk):
        ai, gi = a[start:start + chunk], g[start:start + chunk]
        n = ai.shape[0]
        # sample j's channels become groups j*G .. (j+1)*G-1 of one "sample"
        folded = w.detach().to(a.dtype).expand(n, *w.shape).reshape(-1, *w.shape[1:])
        grad = _weight_grad(module, ai.reshape(1, -1, *ai.shape[2:]),
                            gi.reshape(1, -1, *gi.shape[2:]), folded, module.groups * n)
        parts.append(grad.reshape(n, *w.shape))
    out = {"weight": torch.cat(parts)}
    if module.bias is not None:
        out["bias"] = g.flatten(2).sum(2)                                # [B, C_out]
    return out


def conv_clipped_sum(module: nn.Module, a: Tensor, g: Tensor, clip: Tensor,
                     names: set[str]) -> dict[str, Tensor]:
    """``{name: sum_i clip_i grad_i}`` for ``name`` in ``names`` ("weight", "bias")."""
    out = {}
    c = clip.to(g.dtype).reshape(-1, *([1] * (g.ndim - 1)))
    if "weight" in names:              # scale the smaller factor by c_i
        if a.numel() < g.numel():
            a, gw = a * c.to(a.dtype), g
        else:
            gw = g * c
        out["weight"] = _weight_grad(module, a, gw, module.weight.detach().to(a.dtype),
                                     module.groups)
    if "bias" in names:
        out["bias"] = clip.to(g.dtype) @ g.flatten(2).sum(2)
    return out


def _normalised(module: nn.Module, a: Tensor) -> Tensor:
    """``module``'s output before its affine parameters, ``[B, C, *S]``."""
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(a, module.num_groups, eps=module.eps)
    # training mode (or no running statistics): each instance's own statistics, as forward
    use_input = module.training or not module.track_running_stats
    return F.instance_norm(a, None if use_input else module.running_mean,
                           None if use_input else module.running_var,
                           use_input_stats=use_input, eps=module.eps)


def norm_per_sample(module: nn.Module, a: Tensor, g: Tensor) -> dict[str, Tensor]:
    """Per-sample affine gradients of a ``NORM_TYPES`` layer: ``weight``/``bias`` ``[B, C]``
    (each channel's scale sees the normalised input, its shift the output gradient)."""
    b, c = g.shape[:2]
    g = g.reshape(b, c, -1)
    normed = _normalised(module, a).reshape(b, c, -1)
    return {"weight": (g * normed).sum(2), "bias": g.sum(2)}


__all__ = ["CONV_TYPES", "NORM_TYPES", "conv_clipped_sum", "conv_per_sample",
           "conv_unsupported", "norm_per_sample"]
