"""Model quality with few labels: does federated pretraining pay off, and how close to pooled?

Synthetic federation: 3 training hospitals + 1 external hospital that never trains. Every
arm fine-tunes on the same 10% of each site's labelled training studies (``label_fraction``,
chosen at the site by a hash of the study); pretraining sees every training study, labelled
or not. Side by side in one run:

(i)   ``supervised`` - federated FedAvg from scratch on the labelled 10%;
(ii)  ``mm_dino``    - federated MM-DINOv2 pretraining, then federated fine-tuning;
(iii) ``mae``        - federated multi-modal MAE pretraining, then federated fine-tuning;
(iv)  ``pooled``     - centralized training on all sites' labelled 10% pooled (upper bound of
                       (i): same data, no federation), same passes over the data;
(v)   ``local_only`` - each site alone on its labelled 10%; mean over sites.
(vi)  ``clip``       - federated image-report CLIP pretraining on every training study's
                       report, then federated fine-tuning. Reports name the diagnosis in their
                       impression (as real ones do), so this arm learns from weak text labels on
                       every study - not comparable to (ii)/(iii), which see no text. Also scores
                       the phase-1 CLIP model itself on the external site (``clip_external``:
                       image<->report recall@1/5, zero-shot macro-AUROC) next to the same
                       untrained model (chance level).

Scored on the external site with all sequences (``external_mcc``) and with one sequence
removed, averaged over which one (``external_mcc_missing_one``). Federated arms run through
``medfed.simulation.simulate`` (the real ServerApp/ClientApp on Ray).

    python -m bench.model_quality [--rounds 10] [--pretrain-rounds 10] [--patients 120]
                                  [--arms ...] [--override ...] [--name ...] [--merge]

The JSON is written after every arm. ``--merge`` keeps the arms already in the results file
(measured with the same settings) and measures ``--arms`` anew beside them, so one arm can be
re-measured after a change without re-running the hour-long rest; ``arm_commits`` says which
commit measured each arm.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from client.data.dataset import StudyDataset
from client.data.site import load_site
from client.data.views import WithoutSequence
from client.engine import Engine, TrainConfig
from client.runtime import label_subset
from medfed.simulation import simulate
from medfed.synth.sites import Scenario, synthesize
from models.tasks import build
from server.checkpoint import latest_weights
from server.config import ExperimentConfig, load_experiment

from .common import RESULTS_DIR, commit, update_results_md, write_result

SITES = 3
ARMS = ("supervised", "mm_dino", "mae", "clip", "pooled", "local_only")
PRETRAINED = ("mm_dino", "mae", "clip")


def _build(cfg: ExperimentConfig):
    """``(model, task)`` as the coordinator builds them (its own foundation directory)."""
    return build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options(),
                 foundation_dir=cfg.model.foundation_dir)


def score(cfg: ExperimentConfig, model, external: StudyDataset) -> dict[str, float]:
    _, task = _build(cfg)
    engine = Engine(task, torch.device("cpu"))
    full = engine.evaluate(model, external).scalars()["mcc"]
    missing = [engine.evaluate(model, WithoutSequence(external, j)).scalars()["mcc"]
               for j in range(cfg.model_options().get("num_sequences", 4))]
    return {"external_mcc": full, "external_mcc_missing_one": float(np.mean(missing))}


def federated(cfg: ExperimentConfig, external: StudyDataset, external_studies: list,
              observers: tuple = ()) -> dict:
    run_dir = simulate(cfg, observers=observers)
    phase_dir = run_dir / "finetune" if cfg.pretrain.objective else run_dir
    model, _ = _build(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in latest_weights(phase_dir).items()})
    result = score(cfg, model, external)
    if cfg.pretrain.objective == "clip":
        result["clip_external"] = clip_scores(cfg.pretrain_phase(), run_dir / "pretrain",
                                               external_studies)
    return result


def clip_scores(cfg: ExperimentConfig, phase_dir: Path, studies: list) -> dict:
    """The phase-1 CLIP model on the external site's image-report pairs, and the same model
    untrained (same seed): retrieval recall@1/5 both ways and zero-shot macro-AUROC."""
    out = {}
    for name, weights in (("trained", latest_weights(phase_dir)), ("untrained", None)):
        torch.manual_seed(cfg.seed)
        model, task = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options())
        if weights is not None:
            model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
        pairs = StudyDataset(studies, cfg.task.image_size, text_transform=task.tokenize)
        metrics = Engine(task, torch.device("cpu")).evaluate(model, pairs).scalars()
        out[name] = {k: float(v) for k, v in metrics.items() if k.startswith(("recall_", "auroc"))}
    return out


def centralized(cfg: ExperimentConfig, studies: list, epochs: int,
                external: StudyDataset) -> dict[str, float]:
    train = StudyDataset(studies, cfg.task.image_size, augment=True)
    torch.manual_seed(cfg.seed)
    model, task = _build(cfg)
    engine = Engine(task, torch.device("cpu"))
    for epoch in range(epochs):
        train.reseed(epoch)
        engine.fit(model, train, TrainConfig(local_epochs=1, lr=cfg.train.lr,
                                             batch_size=cfg.train.batch_size,
                                             weight_decay=cfg.train.weight_decay, seed=epoch))
    return score(cfg, model, external)


def clip_cell(clip: dict | None) -> str:
    if not clip:
        return ""
    t, u = clip["trained"], clip["untrained"]
    return (f"; CLIP phase 1 on the external site (trained vs untrained): image->report "
            f"R@1 {t['recall_i2r_1']:.2f} vs {u['recall_i2r_1']:.2f}, R@5 {t['recall_i2r_5']:.2f} "
            f"vs {u['recall_i2r_5']:.2f}, zero-shot AUROC {t.get('auroc', float('nan')):.2f} vs "
            f"{u.get('auroc', float('nan')):.2f}")


SETTINGS = ("rounds", "pretrain_rounds", "local_epochs", "pretrain_epochs", "patients_per_site",
            "seed", "label_fraction", "finetune_mode", "finetune_lr", "overrides")


def previous_arms(args: argparse.Namespace) -> tuple[dict, dict]:
    """``(table, arm_commits)`` of the arms already in ``bench/results/<name>.json`` for
    ``--merge``; a file measured with other settings is refused rather than mixed in."""
    path = RESULTS_DIR / f"{args.name}.json"
    if not path.exists():
        return {}, {}
    old = json.loads(path.read_text())
    mine = results({}, args, [])
    differ = {k: (old.get(k, [] if k == "overrides" else None), mine[k]) for k in SETTINGS
              if old.get(k, [] if k == "overrides" else None) != mine[k]}
    if differ:
        raise SystemExit(f"--merge: {path.name} was measured with other settings (file, now): "
                         f"{differ}; use another --name")
    table = {arm: {"external_mcc": mcc,
                   "external_mcc_missing_one": old["external_mcc_missing_one"][arm]}
             for arm, mcc in old["external_mcc"].items()}
    if "local_only" in table:
        table["local_only"]["per_site"] = old.get("local_only_per_site")
    if "clip" in table:
        table["clip"]["clip_external"] = old.get("clip_external")
    commits = old.get("arm_commits") or {arm: old.get("commit", "unknown") for arm in table}
    return table, commits


def results(table: dict, args: argparse.Namespace, n_labelled: list[int],
            arm_commits: dict | None = None) -> dict:
    """The JSON payload for the arms finished so far."""
    payload = {
        "external_mcc": {a: table[a]["external_mcc"] for a in table},
        "external_mcc_missing_one": {a: table[a]["external_mcc_missing_one"] for a in table},
        "local_only_per_site": table.get("local_only", {}).get("per_site"),
        "labelled_training_studies_per_site": n_labelled, "label_fraction": args.label_fraction,
        "sites": SITES, "rounds": args.rounds, "pretrain_rounds": args.pretrain_rounds,
        "local_epochs": args.local_epochs, "pretrain_epochs": args.pretrain_epochs,
        "patients_per_site": args.patients, "seed": args.seed,
        "finetune_mode": args.finetune_mode, "finetune_lr": args.finetune_lr,
        "overrides": args.override, "arms_requested": args.arms.split(","),
        "complete": set(args.arms.split(",")) <= set(table),
        "arm_commits": arm_commits or {},
    }
    if "clip" in table:
        payload["clip_external"] = table["clip"]["clip_external"]
    mcc = payload["external_mcc"]
    fed = [a for a in ("supervised", *PRETRAINED) if a in mcc]
    if "pooled" in mcc and mcc["pooled"] > 0 and fed:
        best = max(fed, key=mcc.get)
        payload["best_federated_over_pooled"] = mcc[best] / mcc["pooled"]
        payload["best_federated"] = best
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="fine-tuning rounds")
    parser.add_argument("--pretrain-rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=3)
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--label-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--finetune-mode", default="full", choices=("full", "linear_probe", "lora"),
                        help="fine-tuning mode of the pretrained arms (ii) and (iii)")
    parser.add_argument("--finetune-lr", type=float, default=None,
                        help="fine-tuning learning rate of the pretrained arms (default: train.lr)")
    parser.add_argument("--override", action="append", default=[],
                        help="a Hydra override for every arm (repeatable), e.g. "
                             "task.options.sequence_dropout=0.5")
    parser.add_argument("--name", default="model_quality",
                        help="results name (bench/results/<name>.json, RESULTS.md row)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the arms already in the results file (same settings) and "
                             "measure --arms anew beside them")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    arms = args.arms.split(",")
    with tempfile.TemporaryDirectory(prefix="medfed-quality-") as tmp:
        root = Path(tmp) / "data"
        synthesize(root, n_sites=SITES, seed=args.seed, external=True,
                   scenario=Scenario(patients=args.patients, label_fraction=1.0))
        base = [f"data.root={root}", f"runs_dir={Path(tmp) / 'runs'}",
                f"federation.num_sites={SITES}", f"federation.num_rounds={args.rounds}",
                f"train.local_epochs={args.local_epochs}", "tracking.log_models=false",
                f"task.options.label_fraction={args.label_fraction}", f"seed={args.seed}",
                *args.override]
        pre = [f"pretrain.num_rounds={args.pretrain_rounds}",
               f"pretrain.local_epochs={args.pretrain_epochs}"]
        cfg = load_experiment(base)
        classes = tuple(cfg.task.class_names)
        external_studies = [s for s in load_site(root / "external", classes).studies
                            if s.label >= 0]
        external = StudyDataset(external_studies, cfg.task.image_size)
        labelled = [label_subset(load_site(root / f"site-{i}", classes)
                                 .split("train", labelled_only=True), args.label_fraction)
                    for i in range(SITES)]
        n_labelled = [len(site) for site in labelled]
        epochs = args.rounds * args.local_epochs
        table, arm_commits = previous_arms(args) if args.merge else ({}, {})
        for arm in arms:
            if arm == "supervised":
                table[arm] = federated(cfg, external, external_studies)
            elif arm in PRETRAINED:
                arm_cfg = [*base, f"pretrain={arm}", *pre,
                           f"task.options.mode={args.finetune_mode}"]
                if args.finetune_lr is not None:    # pretraining keeps its own (or train's) lr
                    own = load_experiment(arm_cfg).pretrain.lr or cfg.train.lr
                    arm_cfg += [f"train.lr={args.finetune_lr}", f"pretrain.lr={own}"]
                table[arm] = federated(load_experiment(arm_cfg), external, external_studies)
            elif arm == "pooled":
                table[arm] = centralized(cfg, [s for site in labelled for s in site], epochs,
                                         external)
            elif arm == "local_only":
                per_site = [centralized(cfg, site, epochs, external) for site in labelled]
                table[arm] = {k: float(np.mean([p[k] for p in per_site])) for k in per_site[0]}
                table[arm]["per_site"] = per_site
            else:
                raise SystemExit(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
            print(f"{arm:11s} external MCC {table[arm]['external_mcc']:.3f}   "
                  f"missing one {table[arm]['external_mcc_missing_one']:.3f}", flush=True)
            if "clip_external" in table[arm]:
                print(f"{'':11s} CLIP on the external site: {table[arm]['clip_external']}",
                      flush=True)
            arm_commits[arm] = commit()
            # after every arm, so that a stopped run keeps what it measured ("complete": false)
            write_result(args.name, results(table, args, n_labelled, arm_commits))
    payload = results(table, args, n_labelled, arm_commits)
    mcc = payload["external_mcc"]
    path = write_result(args.name, payload)
    cells = ", ".join(f"{a} {mcc[a]:.2f}/{payload['external_mcc_missing_one'][a]:.2f}"
                      for a in table)
    ratio = payload.get("best_federated_over_pooled")
    update_results_md(
        args.name, f"| {args.name} | best federated / pooled external MCC: "
        f"{'n/a' if ratio is None else f'{ratio:.2f}'} ({payload.get('best_federated', '-')}) | "
        f"external MCC all/missing-one: {cells}; {SITES} sites, {args.label_fraction:.0%} labels "
        f"({sum(n_labelled)} labelled studies), {args.pretrain_rounds}+{args.rounds} rounds, "
        f"fine-tuning {args.finetune_mode}{''.join(f', {o}' for o in args.override)}"
        f"{clip_cell(payload.get('clip_external'))} | "
        f"`results/{path.name}` |")


if __name__ == "__main__":
    main()
