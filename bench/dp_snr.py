"""How loud is DP-SGD's noise against what clipping lets through? One step, group by group.

A DP-SGD step (``client.privacy.dpsgd.PrivateGradients``) releases ``sum_i clip_C(g_i) +
N(0, (sigma C)^2 I_d)`` over the ``d`` trainable coordinates. The noise's norm is about
``sigma C sqrt(d)`` whatever the data; the clipped sum's norm is at most ``B C`` and smaller when
the samples disagree. ``step_signal_to_noise`` measures both for one real batch through the same
per-sample clipper the sites use, split by top-level module (``head``, ``patch_embed``, the
encoder's LoRA adapters, ...): a group whose noise is hundreds of times its share of the clipped
sum learns nothing but a random walk (Adam turns noise into lr-sized steps on every
coordinate), and the group that dominates the per-sample norm takes the clipping budget from the
others. Session 21 used it to find why ``bench.foundation_mcc``'s ``dp_lora`` arm scores 0.

    python -m bench.dp_snr --root DRAW_DIR --foundation-dir ENCODERS [override ...]

prints, for each ``site-*`` of ``DRAW_DIR`` (a ``bench.foundation_mcc`` draw), the site's
calibrated sigma, q and steps (``client.privacy.policy``'s rules) and the step's figures.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from torch import nn

from client.privacy.persample import PerSampleClipper


def _group(name: str) -> str:
    """The figure a parameter counts under: ``lora`` for adapters, else its top-level module."""
    return "lora" if "lora_" in name else name.split(".", 1)[0]


def step_signal_to_noise(model: nn.Module, task, batch: dict, *, noise_multiplier: float,
                         max_grad_norm: float) -> dict:
    """One DP-SGD step's clipped-sum norm and expected noise norm, overall and per group.

    Parameters
    ----------
    model : nn.Module
        Its trainable parameters (``requires_grad``) are what the site privatises; frozen
        ones get neither gradient nor noise.
    task
        Provides ``step(model, batch) -> StepOutput`` (mean loss over ``n`` samples).
    batch : dict
        One collated batch (the Poisson batch of a step).
    noise_multiplier, max_grad_norm : float
        sigma and C.

    Returns
    -------
    dict
        ``trainable`` (d), ``batch``, per-sample norm ``median``/``min`` before clipping,
        ``clipped_fraction``, ``clipped_sum_norm``, ``noise_norm`` (``sigma C sqrt(d)``),
        ``noise_over_signal``, and ``groups``: the same per group.
    """
    clipper = PerSampleClipper(model, max_grad_norm)
    with clipper.capture():
        out = task.step(model, batch)
        (out.loss * out.n).backward()       # each sample's own gradient, as the site does
    grads, norms = clipper.clipped_sum()
    model.zero_grad(set_to_none=True)
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = groups.setdefault(_group(name), {"trainable": 0, "sq": 0.0})
        g["trainable"] += p.numel()
        g["sq"] += float(grads[p].double().square().sum()) if p in grads else 0.0
    std = noise_multiplier * max_grad_norm

    def figures(d: int, sq: float) -> dict:
        signal, noise = math.sqrt(sq), std * math.sqrt(d)
        return {"trainable": d, "clipped_sum_norm": signal, "noise_norm": noise,
                "noise_over_signal": noise / signal if signal > 0 else math.inf}

    total = figures(sum(g["trainable"] for g in groups.values()),
                    sum(g["sq"] for g in groups.values()))
    return total | {"batch": int(norms.numel()), "per_sample_norm_median": float(norms.median()),
                    "per_sample_norm_min": float(norms.min()),
                    "clipped_fraction": float((norms > max_grad_norm).float().mean()),
                    "groups": {k: figures(g["trainable"], g["sq"]) for k, g in groups.items()}}


def site_reports(root: Path, overrides: list[str], *, seed: int = 0) -> list[dict]:
    """Each training site of a draw under the experiment ``overrides`` (a DP one): the sigma
    it would calibrate for the whole run, q, steps, and one first-round step's figures."""
    from torch.utils.data import default_collate

    from client.data.dataset import StudyDataset
    from client.data.site import load_site
    from client.privacy.dpsgd import steps_per_epoch
    from client.runtime import label_subset
    from models.tasks import build
    from protocol.accounting import calibrate_noise
    from server.config import load_experiment

    cfg = load_experiment([f"data.root={root}", *overrides])
    p, t = cfg.privacy, cfg.train
    fraction = float(cfg.task_options().get("label_fraction", 1.0))
    reports = []
    for site in sorted(root.glob("site-*")):
        studies = load_site(site, tuple(cfg.task.class_names)).split("train", labelled_only=True)
        studies = label_subset(studies, fraction) if fraction < 1 else studies
        n = len(studies)
        q = p.sample_rate or min(1.0, t.batch_size / n)
        steps = t.local_epochs * steps_per_epoch(q)
        sigma = p.noise_multiplier or calibrate_noise(
            target_epsilon=p.epsilon, delta=p.delta, sample_rate=q,
            steps=steps * cfg.federation.num_rounds, accountant=p.accountant)
        torch.manual_seed(seed)
        model, task = build(cfg.model.name, cfg.model_options(), cfg.task.name,
                            cfg.task_options(), foundation_dir=cfg.model.foundation_dir)
        model.train()
        data = StudyDataset(studies, cfg.task.image_size, augment=True)
        batch = default_collate([data[i] for i in range(min(n, max(1, round(q * n))))])
        reports.append({"site": site.name, "n": n, "sample_rate": q, "steps_per_round": steps,
                        "noise_multiplier": sigma} | step_signal_to_noise(
                            model, task, batch, noise_multiplier=sigma,
                            max_grad_norm=p.max_grad_norm))
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="a draw's directory of sites")
    parser.add_argument("--foundation-dir", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="more experiment overrides")
    args = parser.parse_args()
    base = ["federation.num_rounds=20", "train.local_epochs=5", "task.options.label_fraction=0.1",
            "model=foundation", "model.options.weights=dinov2-public",
            f"model.foundation_dir={args.foundation_dir}", "privacy=dpsgd", "privacy.epsilon=8"]
    for report in site_reports(args.root, [*base, *args.overrides]):
        print(json.dumps(report, indent=None, default=float))


if __name__ == "__main__":
    main()
