"""Difficulty calibration of the synthetic task: how much headroom is there?

Trains centrally on the pooled training splits of the synthetic sites and evaluates on the
held-out external site, side by side in one run:

- the demo backbone (multi-modal ViT) with and without the training augmentation;
- a small CNN baseline (4-channel input, max-pooled), a strong learner for this task.

A task that any model solves in one epoch measures nothing; this reports MCC per epoch so the
gap between methods (and to the ceiling) is visible. ``vit_over_cnn`` is the headline ratio.

    python -m bench.calibration [--epochs 40] [--patients 200]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

from client.data.dataset import StudyDataset
from client.data.site import load_site
from client.engine import Engine, TrainConfig
from medfed.synth.sites import synthesize
from models import MODELS, TASKS
from server.config import load_experiment

from .common import update_results_md, write_result


class SmallCNN(nn.Module):
    """Baseline: sequences as channels, three conv blocks, global max pool."""

    def __init__(self, num_sequences: int = 4, num_classes: int = 3):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(num_sequences, 32, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.GELU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(64, num_classes))

    def forward(self, images, present):
        return self.net(images)


def run(name: str, model: nn.Module, train: StudyDataset, test: StudyDataset, epochs: int) -> list:
    torch.manual_seed(0)
    engine = Engine(TASKS.build("classification", {}), torch.device("cpu"))
    curve = []
    for epoch in range(epochs):
        train.reseed(epoch)
        engine.fit(model, train, TrainConfig(local_epochs=1, lr=1e-3, seed=epoch))
        metrics = engine.evaluate(model, test).scalars()
        curve.append({"epoch": epoch + 1, "mcc": metrics["mcc"], "auroc": metrics.get("auroc")})
        print(f"{name:12s} epoch {epoch + 1:3d}  external MCC {metrics['mcc']:.3f}  "
              f"AUROC {metrics.get('auroc', float('nan')):.3f}", flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--patients", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = load_experiment()
    classes = tuple(cfg.task.class_names)
    with tempfile.TemporaryDirectory(prefix="medfed-calib-") as tmp:
        root = Path(tmp) / "data"
        synthesize(root, n_sites=3, seed=0, patients=args.patients, external=True)
        sites = [load_site(root / f"site-{i}", classes) for i in range(3)]
        external = load_site(root / "external", classes)
    studies = [s for site in sites for s in site.split("train", labelled_only=True)]
    size = cfg.task.image_size
    test = StudyDataset(external.studies, size)
    curves = {
        "vit": run("vit", MODELS.build(cfg.model.name, cfg.model_options()),
                   StudyDataset(studies, size, augment=True), test, args.epochs),
        "vit_no_aug": run("vit no-aug", MODELS.build(cfg.model.name, cfg.model_options()),
                          StudyDataset(studies, size), test, args.epochs),
        "cnn": run("cnn", SmallCNN(), StudyDataset(studies, size, augment=True), test, args.epochs),
    }

    def final(name):       # mean of the last 5 epochs: single epochs are noisy
        tail = curves[name][-5:]
        return sum(c["mcc"] for c in tail) / len(tail)

    best = {k: max(c["mcc"] for c in v) for k, v in curves.items()}
    payload = {"vit_over_cnn": final("vit") / final("cnn") if final("cnn") > 0 else None,
               "final_mcc": {k: final(k) for k in curves}, "best_mcc": best,
               "train_studies": len(studies), "external_studies": len(test),
               "epochs": args.epochs, "curves": curves}
    path = write_result("calibration", payload)
    print(f"final external MCC (mean of last 5 epochs): " +
          ", ".join(f"{k} {v:.3f}" for k, v in payload["final_mcc"].items()))
    update_results_md(
        "task calibration",
        f"| task calibration | ViT/CNN external MCC {payload['vit_over_cnn']:.2f} "
        f"| centralized, {args.epochs} epochs, {len(studies)} train studies: ViT "
        f"{final('vit'):.2f}, ViT without augmentation {final('vit_no_aug'):.2f}, CNN "
        f"{final('cnn'):.2f} | `results/{path.name}` |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
