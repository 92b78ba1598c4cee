"""bench.dp_snr: one DP-SGD step's clipped sum and noise norm, overall and per group, match a
sample-by-sample computation; frozen parameters count neither as signal nor as noise."""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bench.dp_snr import step_signal_to_noise
from models.task import StepOutput


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


class Task:
    def step(self, model, batch):
        loss = F.cross_entropy(model(batch["x"]), batch["y"])
        return StepOutput(loss, int(batch["y"].numel()))


def per_sample(model, batch):
    """Each sample's gradient by name, one backward pass per sample."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = []
    for i in range(batch["y"].numel()):
        model.zero_grad()
        F.cross_entropy(model(batch["x"][i:i + 1]), batch["y"][i:i + 1]).backward()
        grads.append({n: p.grad.clone() for n, p in params.items()})
    model.zero_grad(set_to_none=True)
    return grads


def norm(grad):
    return math.sqrt(sum(float(v.square().sum()) for v in grad.values()))


@pytest.mark.parametrize("freeze_body", [False, True])
def test_figures_match_per_sample_computation(freeze_body):
    torch.manual_seed(0)
    model, batch = Tiny(), {"x": torch.randn(6, 5) * 3, "y": torch.tensor([0, 1, 2, 0, 1, 2])}
    model.body.requires_grad_(not freeze_body)
    grads = per_sample(model, batch)
    clip, sigma = sorted(norm(g) for g in grads)[2] * 1.01, 2.0     # some samples clipped
    clipped = sum(norm(g) > clip for g in grads) / len(grads)
    assert 0 < clipped < 1
    expected = {n: sum(g[n] * min(1.0, clip / (norm(g) + 1e-6)) for g in grads) for n in grads[0]}
    out = step_signal_to_noise(model, Task(), batch, noise_multiplier=sigma, max_grad_norm=clip)
    d = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert out["trainable"] == d == (15 if freeze_body else 39)
    assert set(out["groups"]) == ({"head"} if freeze_body else {"body", "head"})
    assert out["noise_norm"] == pytest.approx(sigma * clip * math.sqrt(d))
    head = math.sqrt(sum(float(v.square().sum()) for n, v in expected.items()
                         if n.startswith("head")))
    whole = math.sqrt(sum(float(v.square().sum()) for v in expected.values()))
    assert out["groups"]["head"]["clipped_sum_norm"] == pytest.approx(head, rel=1e-4)
    assert out["clipped_sum_norm"] == pytest.approx(whole, rel=1e-4)
    assert out["noise_over_signal"] == pytest.approx(out["noise_norm"] / whole, rel=1e-4)
    assert out["clipped_fraction"] == pytest.approx(clipped) and out["batch"] == 6
    assert all(p.grad is None for p in model.parameters())          # the step left no gradient
