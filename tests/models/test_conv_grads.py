"""Exact per-sample clipping of convolutional decoders (``models/conv_grads.py`` rules, used by
``client/privacy/persample.py``): for convolutions, transposed convolutions and affine
GroupNorm / InstanceNorm in 1D-3D, the clipper's per-sample norms equal one backward pass per
sample and its clipped sum equals the clip-weighted sum of those, in float64; a layer whose rows
are not the batch's samples is refused unless the model declares the fold batch-major."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from client.privacy.persample import PerSampleClipper, UnsupportedLayerError
from models.conv_grads import conv_per_sample

B = 3
ATOL = 1e-10


def _decoder(dims: int) -> nn.Module:
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
    up = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
    inorm = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)[dims - 1]
    return nn.Sequential(
        conv(2, 4, 3, stride=2, padding=1),              # first layer: its input has no grad
        nn.GroupNorm(2, 4), nn.LeakyReLU(),
        up(4, 6, 2, stride=2, groups=2, bias=False),
        inorm(6, affine=True), nn.Tanh(),
        up(6, 3, 3, stride=2, padding=1, output_padding=1, dilation=1),
        conv(3, 2, 3, padding=2, dilation=2, groups=1),
        inorm(2, affine=False),                          # no parameters: nothing to clip
        conv(2, 1, 1))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():          # norms' affine parameters away from (1, 0)
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + 0.2)
    return model


def _individual(model: nn.Module, x: Tensor, views: int = 1
                ) -> tuple[list[list[Tensor]], Tensor]:
    """One backward pass per sample (``views``: sample i is rows ``i*views ..`` and its loss
    the mean over them)."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_sample = []
    for i in range(len(x) // views):
        model.zero_grad(set_to_none=True)
        (model(x[i * views:(i + 1) * views]).square().sum() / views).backward()
        per_sample.append([p.grad.clone() for p in params])
    model.zero_grad(set_to_none=True)
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in grads)) for grads in per_sample])
    return per_sample, norms


@pytest.mark.parametrize("dims, views", [(1, 1), (2, 1), (3, 1), (2, 2)])
def test_conv_decoder_per_sample_clipping_is_exact(dims, views):
    """``views`` 2 (augmentation multiplicity): each sample is two consecutive rows, its
    gradient the mean over them."""
    torch.manual_seed(dims)
    model = _randomised(_decoder(dims).double().train(), seed=dims)
    x = torch.randn(B * views, 2, *([8] * dims), dtype=torch.float64)
    per_sample, norms = _individual(model, x, views)
    params = [p for p in model.parameters() if p.requires_grad]
    c = float(norms.median())                 # some samples clipped, some not
    clipper = PerSampleClipper(model, c)
    with clipper.capture(views):
        (model(x).square().sum() / views).backward()
    grads, got = clipper.clipped_sum()
    torch.testing.assert_close(got, norms, rtol=0, atol=ATOL)
    factors = (c / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    assert {id(p) for p in grads} == {id(p) for p in params}
    for j, p in enumerate(params):
        expected = sum(f * grads_i[j] for f, grads_i in zip(factors, per_sample))
        torch.testing.assert_close(grads[p], expected, rtol=0, atol=ATOL)
        # and unclipped: the summed per-sample gradients are the batch gradient
    model.zero_grad(set_to_none=True)
    (model(x).square().sum() / views).backward()
    for j, p in enumerate(params):
        torch.testing.assert_close(sum(g[j] for g in per_sample), p.grad, rtol=0, atol=ATOL)


def test_per_sample_conv_gradients_are_computed_in_chunks(monkeypatch):
    import models.conv_grads as rules

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    g = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    whole = conv_per_sample(conv, x, g)["weight"]
    monkeypatch.setattr(rules, "PER_SAMPLE_BUDGET", conv.weight.numel() * 2)   # chunks of 2
    torch.testing.assert_close(conv_per_sample(conv, x, g)["weight"], whole, rtol=0, atol=0)
    for i in range(5):
        conv.zero_grad()
        conv(x[i:i + 1]).backward(g[i:i + 1])
        torch.testing.assert_close(whole[i], conv.weight.grad, rtol=0, atol=ATOL)


class _Windows(nn.Module):
    """Splits each sample's tokens into 2 windows folded into the batch, batch-major (rows
    2i, 2i+1 are sample i's), as Swin's window_partition does."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:             # [B, 4, 3]
        return self.proj(x.reshape(-1, 2, 3)).reshape(x.shape[0], 4, 2)


class _Model(nn.Module):
    def __init__(self, declare: bool):
        super().__init__()
        self.windows = _Windows()
        self.head = nn.Linear(2, 1)
        self.batch_major_folds = (_Windows,) if declare else ()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.windows(x))).sum((1, 2))


def test_rows_that_are_not_samples_are_refused_unless_declared_batch_major():
    torch.manual_seed(0)
    x = torch.randn(B, 4, 3, dtype=torch.float64)
    undeclared = _Model(declare=False).double()
    clipper = PerSampleClipper(undeclared, 1.0)
    with pytest.raises(UnsupportedLayerError, match=r"windows.proj \(Linear\) sees a leading "
                                                    r"dimension of 6, not the batch of 3"):
        with clipper.capture():
            undeclared(x).square().sum().backward()
    declared = _Model(declare=True).double()
    declared.load_state_dict(undeclared.state_dict())
    per_sample, norms = _individual(declared, x)
    clipper = PerSampleClipper(declared, 1e12)
    with clipper.capture():
        declared(x).square().sum().backward()
    grads, got = clipper.clipped_sum()
    torch.testing.assert_close(got, norms, rtol=0, atol=ATOL)
    for j, p in enumerate(declared.parameters()):
        torch.testing.assert_close(grads[p], sum(g[j] for g in per_sample), rtol=0, atol=ATOL)


def test_a_folded_layer_is_refused_when_the_batch_size_is_unknown():
    """Not calling the model's root (here: its window layer directly) leaves the batch unknown;
    a folded layer must not set it to B x windows and be clipped per window."""
    torch.manual_seed(0)
    declared = _Model(declare=True).double()
    clipper = PerSampleClipper(declared, 1.0)
    with pytest.raises(UnsupportedLayerError, match=r"windows.proj \(Linear\) may fold the batch"):
        with clipper.capture():
            declared.windows(torch.randn(B, 4, 3, dtype=torch.float64)).sum().backward()
