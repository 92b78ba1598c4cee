"""Choose a linear probe's learning rate on *public* data, separately for each DP row.

Under DP-SGD the best learning rate of a linear probe is not the non-private one: Adam's
second moment is dominated by the noise, so the same ``lr`` takes much smaller effective
steps (at ε = 8 on this federation, lr 3e-4 gave half the MCC of lr 3e-3, while the non-DP
probe prefers the smaller one). Tuning on the sites' own data would spend privacy that no
accountant charges (Papernot & Steinke 2022), so the rate is picked on a *public federation*:
synthetic hospitals drawn with their own seed - none of the sites' patients, and not the
cohort the backbone was pretrained on. The head trains on the frozen backbone's features
with the real engine (the same AdamW, Poisson sampling, per-sample clipping and noise as at a
site; a DP row's noise multiplier calibrated as a site would) in an in-process FedAvg, and
each candidate is scored by pooled validation + test MCC of that public federation.

The FedAvg here is a plain in-process weighted mean of head weights, not a Flower
simulation: the search runs ~40 small federations, ~2 s each, where one Flower run costs
minutes. Training itself is the project's one engine. Noise is seeded (``secure_mode=False``):
only public data is touched, and the chosen lr must be reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from client.data.dataset import StudyDataset
from client.data.site import load_site
from client.engine import Engine, TrainConfig
from client.privacy.dpsgd import DPSGDConfig, steps_per_epoch
from medfed.synth.sites import synthesize
from models import MODELS, TASKS
from models.tasks import load_backbone
from models.weights import load_pretrained
from server.config import ExperimentConfig
from protocol.accounting import calibrate_noise

LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2)


class FeatureHead(nn.Module):
    """A class head over precomputed features, called like the backbone: ``(x, present)``."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.head = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return self.head(features)


class Features(Dataset):
    """``{"image": pooled features, "present", "label"}`` items of frozen-backbone studies."""

    def __init__(self, features: torch.Tensor, present: torch.Tensor, labels: torch.Tensor):
        self.features, self.present, self.labels = features, present, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.features[i], "present": self.present[i], "label": self.labels[i]}


@torch.no_grad()
def frozen_features(backbone: nn.Module, data: StudyDataset) -> Features:
    items = [data[i] for i in range(len(data))]
    present = torch.stack([x["present"] for x in items])
    out = [backbone.pool(backbone.forward_features(torch.stack([x["image"] for x in chunk]), p), p)
           for chunk, p in ((items[i:i + 64], present[i:i + 64])
                            for i in range(0, len(items), 64))]
    return Features(torch.cat(out), present, torch.stack([x["label"] for x in items]))


@dataclass(frozen=True)
class Plan:
    rounds: int
    local_epochs: int
    batch_size: int
    delta: float
    max_grad_norm: float


def federated_probe(sites: list[Features], evaluation: Features, task, plan: Plan, *,
                    lr: float, epsilon: float | None, seed: int) -> float:
    """In-process FedAvg of the head (weighted by site size); pooled MCC on ``evaluation``."""
    torch.manual_seed(seed)
    global_head = FeatureHead(sites[0].features.shape[1], int(task.config.num_classes))
    engine = Engine(task, torch.device("cpu"))
    privacy = []
    for site in sites:
        if epsilon is None:
            privacy.append(None)
            continue
        q = min(1.0, plan.batch_size / len(site))
        sigma = calibrate_noise(target_epsilon=epsilon, delta=plan.delta, sample_rate=q,
                                steps=plan.rounds * plan.local_epochs * steps_per_epoch(q),
                                accountant="rdp")
        privacy.append((q, sigma))
    for server_round in range(plan.rounds):
        states, sizes = [], []
        for i, site in enumerate(sites):
            local = FeatureHead(site.features.shape[1], int(task.config.num_classes))
            local.load_state_dict(global_head.state_dict())
            step_seed = seed * 10_000 + server_round * 100 + i
            dp = None if privacy[i] is None else DPSGDConfig(
                noise_multiplier=privacy[i][1], max_grad_norm=plan.max_grad_norm,
                sample_rate=privacy[i][0], secure_mode=False, seed=step_seed)
            engine.fit(local, site, TrainConfig(local_epochs=plan.local_epochs, lr=lr,
                                                batch_size=plan.batch_size, seed=step_seed), dp)
            states.append(local.state_dict())
            sizes.append(len(site))
        total = sum(sizes)
        global_head.load_state_dict({k: sum(s[k] * (n / total) for s, n in zip(states, sizes))
                                     for k in states[0]})
    return engine.evaluate(global_head, evaluation).scalars()["mcc"]


def tune_probe_lr(cfg: ExperimentConfig, backbone_dir: Path, work: Path, plan: Plan, *,
                  epsilons: list[float], seed: int, repeats: int = 2,
                  grid: tuple[float, ...] = LR_GRID) -> dict[str, dict]:
    """``{"non_dp" | "eps_<e>": {"lr": best, "scores": {lr: mean public MCC}}}``."""
    root = work / "public-federation"
    synthesize(root, n_sites=3, seed=seed + 2000)
    classes = tuple(cfg.task.class_names)
    backbone = MODELS.build(cfg.model.name, cfg.model_options())
    load_backbone(backbone, load_pretrained(backbone_dir)[1])    # refuses a mismatched body
    backbone.eval()
    sites, held_out = [], []
    for i in range(3):
        site = load_site(root / f"site-{i}", classes)
        sites.append(frozen_features(backbone, StudyDataset(
            site.split("train", labelled_only=True), cfg.task.image_size)))
        held_out += site.split("val", labelled_only=True) + site.split("test", labelled_only=True)
    evaluation = frozen_features(backbone, StudyDataset(held_out, cfg.task.image_size))
    task = TASKS.build(cfg.task.name, cfg.task_options() | {"mode": "full"})
    out = {}
    for name, eps in [("non_dp", None), *((f"eps_{e:g}", e) for e in epsilons)]:
        scores = {lr: sum(federated_probe(sites, evaluation, task, plan, lr=lr, epsilon=eps,
                                          seed=seed * 100 + r) for r in range(repeats)) / repeats
                  for lr in grid}
        out[name] = {"lr": max(scores, key=scores.get), "scores": scores}
        print(f"public tuning {name}: " + ", ".join(f"lr {lr:g} {s:.3f}"
                                                     for lr, s in scores.items()), flush=True)
    return out
