"""GPU check of the training engine (run where a CUDA device exists; needs only torch, numpy,
einops, opacus, randomgen): device=auto picks CUDA; under bf16 autocast the engine fits 64
toy studies (training loss before/after, as tests/client/test_engine.py does on CPU), with and
without DP-SGD; DP-SGD's per-sample clipping matches individual backward passes on the GPU.

    PYTHONPATH=. python -m bench.gpu_engine [--out bench/results/gpu_engine.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from client.engine import Engine, TrainConfig, resolve_device
from client.privacy.dpsgd import DPSGDConfig
from client.privacy.persample import PerSampleClipper
from models import MODELS, TASKS


class Synthetic(torch.utils.data.Dataset):
    """Learnable toy studies: the class sets the mean intensity of one sequence."""

    def __init__(self, n: int, size: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.images = torch.randn(n, 4, size, size, generator=g)
        self.images[torch.arange(n), self.labels] += 2.0

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "present": torch.ones(4), "label": self.labels[i]}


def exactness(device: torch.device) -> float:
    """Max |clipped sum - reference| on the device, float32, no autocast."""
    torch.manual_seed(0)
    model = MODELS.build("mmvit", {"dim": 64, "depth": 2, "heads": 4}).to(device)
    x = torch.randn(8, 4, 64, 64, device=device)
    present = torch.ones(8, 4, device=device)
    present[2, 1] = 0
    y = torch.randint(0, 3, (8,), device=device)
    reference = {p: torch.zeros_like(p) for p in model.parameters()}
    for i in range(8):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1], present[i:i + 1]), y[i:i + 1]).backward()
        norm = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters()))
        for p in model.parameters():
            reference[p] += min(1.0, 1.0 / (norm.item() + 1e-6)) * p.grad
    clipper = PerSampleClipper(model, 1.0)
    with clipper.capture():
        F.cross_entropy(model(x, present), y, reduction="sum").backward()
    grads, _ = clipper.clipped_sum()
    return max((grads[p] - reference[p]).abs().max().item() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/gpu_engine.json")
    args = parser.parse_args()
    device = resolve_device("auto")
    task = TASKS.build("classification", {"num_classes": 3})
    data = Synthetic(64)
    result = {"device": str(device),
              "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
              "torch": torch.__version__, "exactness_max_abs_err": exactness(device)}
    for name, privacy in (("non_dp", None),
                          ("dp_sgd", DPSGDConfig(noise_multiplier=0.5, max_grad_norm=1.0,
                                                 sample_rate=16 / 64))):
        torch.manual_seed(0)
        model = MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2})
        engine = Engine(task, device)
        before = engine.evaluate(model, data).loss
        fit = engine.fit(model, data, TrainConfig(local_epochs=30, batch_size=16, lr=3e-3,
                                                  weight_decay=0.0), privacy=privacy)
        if device.type == "cuda":
            torch.cuda.synchronize()
        after = engine.evaluate(model, data).scalars()
        result[name] = {"train_set_loss_before": before, "train_set_loss_after": after["loss"],
                        "train_set_accuracy_after": after["accuracy"], "steps": fit["steps"],
                        "ms_per_step": 1000 * fit["seconds"] / fit["steps"],
                        "autocast": "bf16" if device.type == "cuda" else "none"}
        print(name, result[name], flush=True)
    result["dp_time_ratio"] = result["dp_sgd"]["ms_per_step"] / result["non_dp"]["ms_per_step"]
    print(json.dumps(result, indent=2))
    with open(args.out, "w") as f:
        json.dump(result | {"measured_at": time.strftime("%Y-%m-%d %H:%M")}, f, indent=2)


if __name__ == "__main__":
    main()
