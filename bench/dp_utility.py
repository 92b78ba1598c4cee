"""Utility of sample-level DP-FedAvg: test MCC at epsilon in {1, 3, 8} vs non-DP FedAvg.

The Quickstart federation (3 synthetic hospitals + an external site that never trains), the
same training configuration for every row; only ``privacy`` differs. Each DP row gives every
site an operator budget just above the target and a ledger of its own for this benchmark
(``privacy-dir`` under the site), so rows do not draw on each other's budget. Reported per row:
pooled site-test MCC after the last round (the demo's headline) and external-site MCC.

``mcc_ratio_epsN`` = DP test MCC / non-DP test MCC (pooled site test).

``--public-pretrain clip|mae`` first pretrains a backbone centrally on a *public* cohort - a
synthetic hospital drawn with another seed, none of the sites' patients - and every row, DP
or not, fine-tunes from it (``model.pretrained``) in ``--mode`` (linear_probe, lora, full).
The usual recipe for DP: public pretraining costs no site privacy, and the few trainable
parameters of a probe or adapters keep the DP noise small. With ``--tune-lr`` (linear probe
only) each row, DP or not, trains at the learning rate that scored best for it on a public
federation (``bench.public_tuning``: never on the sites' data, which would spend privacy
no accountant charges); without it every row uses ``train.lr``.

    python -m bench.dp_utility [--rounds 20] [--local-epochs 5] [--epsilons 1,3,8]
                               [--public-pretrain clip --public-epochs 50 --mode linear_probe]
                               [--tune-lr]
    python -m bench.dp_utility --combine NAME NAME ... --name dp_utility

``--combine`` pools finished runs of this bench (one seed each, every one side by side in its
own run) into one result: per row the mean MCC over the runs, ``mcc_ratio_epsN`` = mean DP
test MCC / mean non-DP test MCC, and each run's own ratios next to it.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from client.data.dataset import StudyDataset
from client.data.site import load_site
from client.engine import Engine, TrainConfig
from medfed.simulation import simulate
from medfed.synth.sites import Scenario, synthesize
from models.tasks import build
from models.weights import save_pretrained
from server.checkpoint import latest_weights
from server.config import ExperimentConfig, load_experiment

from .common import RESULTS_DIR, update_results_md, write_result
from .heterogeneity import LastRound, external_mcc
from .public_tuning import Plan, tune_probe_lr


def run(name: str, overrides: list[str], external: StudyDataset) -> dict:
    cfg = load_experiment(overrides)
    last = LastRound()
    start = time.perf_counter()
    run_dir = simulate(cfg, observers=(last,))
    row = {"test_mcc": last.test.get("mcc"), "test_auroc": last.test.get("auroc"),
           "external_mcc": external_mcc(cfg, latest_weights(run_dir), external),
           "seconds": time.perf_counter() - start}
    print(f"{name:8s} {row}", flush=True)
    return row


def public_backbone(cfg: ExperimentConfig, objective: str, work: Path, *, patients: int,
                    epochs: int, seed: int) -> Path:
    """Pretrain ``objective`` centrally on a public cohort (a synthetic hospital of its own
    seed: no site's patient) and save the backbone in the save_pretrained layout."""
    root = work / "public-data"
    synthesize(root, n_sites=1, seed=seed + 1000,
               scenario=Scenario(patients=patients, label_fraction=1.0, missing_fraction=0.0))
    pre = load_experiment([f"data.root={root}", f"pretrain={objective}", f"seed={seed}"]
                          ).pretrain_phase()
    torch.manual_seed(seed)
    model, task = build(pre.model.name, pre.model_options(), pre.task.name, pre.task_options())
    text = task.tokenize if task.data_needs.reports is not None else None
    cohort = load_site(root / "site-0", tuple(cfg.task.class_names)).studies
    data = StudyDataset(cohort, cfg.task.image_size, augment=True, text_transform=text)
    engine = Engine(task, torch.device("cpu"))
    for epoch in range(epochs):
        data.reseed(epoch)
        metrics = engine.fit(model, data, TrainConfig(local_epochs=1, lr=pre.train.lr,
                                                      batch_size=pre.train.batch_size,
                                                      seed=epoch))
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"public {objective} epoch {epoch + 1}: loss {metrics['train_loss']:.3f}",
                  flush=True)
    return save_pretrained(model.backbone, work / "public-backbone",
                           extra={"pretrained_on": f"public synthetic cohort ({len(cohort)} "
                                                   f"studies, seed {seed + 1000}), {objective}"})


def combine(names: list[str], name: str) -> None:
    runs = {n: json.loads((RESULTS_DIR / f"{n}.json").read_text()) for n in names}
    rows = {row: {key: statistics.mean(r["rows"][row][key] for r in runs.values())
                  for key in ("test_mcc", "test_auroc", "external_mcc")}
            for row in next(iter(runs.values()))["rows"]}
    reference = rows["non_dp"]["test_mcc"]
    ratios = {f"mcc_ratio_eps{k[4:]}": (r["test_mcc"] / reference if reference > 0 else None)
              for k, r in rows.items() if k != "non_dp"}
    per_run = {n: {k: v for k, v in r.items() if k.startswith("mcc_ratio")} for n, r in runs.items()}
    first = next(iter(runs.values()))
    payload = ratios | {"rows": rows, "runs": per_run,
                        "seeds_note": "mean over runs; each run is one seed, side by side"} | {
        k: first[k] for k in ("rounds", "local_epochs", "batch_size", "delta", "sites", "mode",
                              "public_pretrain", "public_patients", "public_epochs")}
    path = write_result(name, payload)
    cells = "; ".join(f"{k}: test {r['test_mcc']:.2f} / ext {r['external_mcc']:.2f}"
                      for k, r in rows.items())
    each = ", ".join(f"{r.get('mcc_ratio_eps8') or float('nan'):.2f}" for r in per_run.values())
    update_results_md(
        name, f"| {name} | DP-FedAvg test MCC / non-DP at ε=8, mean of {len(runs)} seeds: "
        f"{ratios.get('mcc_ratio_eps8') or float('nan'):.2f} (target ≥ 0.97; per seed {each}) | "
        f"mean {cells}; runs {', '.join(runs)} | `results/{path.name}` |")
    print(f"{ratios}\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--public-pretrain", choices=("none", "clip", "mae"), default="none")
    parser.add_argument("--public-patients", type=int, default=600)
    parser.add_argument("--public-epochs", type=int, default=50)
    parser.add_argument("--mode", choices=("full", "linear_probe", "lora"), default="full",
                        help="fine-tuning mode of every row")
    parser.add_argument("--tune-lr", action="store_true",
                        help="linear probe: pick each row's lr on a public federation")
    parser.add_argument("--combine", nargs="+", metavar="NAME",
                        help="names of finished runs (one seed each) to pool")
    parser.add_argument("--name", default="dp_utility",
                        help="results name (bench/results/<name>.json, RESULTS.md row)")
    args = parser.parse_args()
    if args.combine:
        return combine(args.combine, args.name)
    if args.tune_lr and (args.public_pretrain == "none" or args.mode != "linear_probe"):
        parser.error("--tune-lr tunes a linear probe over a public backbone: it needs "
                     "--public-pretrain and --mode linear_probe")
    epsilons = [float(e) for e in args.epsilons.split(",")]
    tuning = {}
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="medfed-dputil-") as tmp:
        root = Path(tmp) / "data"
        synthesize(root, n_sites=3, seed=args.seed, external=True)
        base = [f"data.root={root}", f"runs_dir={Path(tmp) / 'runs'}", "tracking.log_models=false",
                f"federation.num_rounds={args.rounds}", f"train.local_epochs={args.local_epochs}",
                f"train.batch_size={args.batch_size}", f"seed={args.seed}"]
        cfg = load_experiment(base)
        if args.public_pretrain != "none":
            backbone = public_backbone(cfg, args.public_pretrain, Path(tmp),
                                       patients=args.public_patients, epochs=args.public_epochs,
                                       seed=args.seed)
            base += [f"model.pretrained={backbone}"]
            if args.tune_lr:
                plan = Plan(rounds=args.rounds, local_epochs=args.local_epochs,
                            batch_size=args.batch_size, delta=1e-5,
                            max_grad_norm=load_experiment([*base, "privacy=dpsgd"]
                                                          ).privacy.max_grad_norm)
                tuning = tune_probe_lr(cfg, backbone, Path(tmp), plan, epsilons=epsilons,
                                       seed=args.seed)
        base += [f"task.options.mode={args.mode}"]
        lr = {name: [f"train.lr={t['lr']}"] for name, t in tuning.items()}
        external = StudyDataset(load_site(root / "external", tuple(cfg.task.class_names)).studies,
                                cfg.task.image_size)
        rows = {"non_dp": run("non-dp", [*base, *lr.get("non_dp", [])], external)}
        for eps in epsilons:
            budget = (f"+federation.site_node_config={{dp-epsilon:{eps * 1.01},dp-delta:1e-5,"
                      f"privacy-dir:.medfed/bench-eps-{eps:g}-{time.time_ns()}}}")
            rows[f"eps_{eps:g}"] = run(f"eps={eps:g}", [*base, *lr.get(f"eps_{eps:g}", []),
                                                         "privacy=dpsgd", f"privacy.epsilon={eps}",
                                                         budget], external)
    reference = rows["non_dp"]["test_mcc"] or 0.0
    ratios = {f"mcc_ratio_eps{k[4:]}": (r["test_mcc"] / reference if reference > 0 else None)
              for k, r in rows.items() if k != "non_dp"}
    payload = ratios | {"rows": rows, "rounds": args.rounds, "local_epochs": args.local_epochs,
                        "batch_size": args.batch_size, "delta": 1e-5, "sites": 3,
                        "mode": args.mode, "public_pretrain": args.public_pretrain,
                        "public_patients": args.public_patients,
                        "public_epochs": args.public_epochs,
                        "lr": {name: t["lr"] for name, t in tuning.items()} or cfg.train.lr,
                        "public_tuning": {name: {f"{k:g}": v for k, v in t["scores"].items()}
                                          for name, t in tuning.items()}}
    path = write_result(args.name, payload)
    cells = "; ".join(f"{k}: test {r['test_mcc']:.2f} / ext {r['external_mcc']:.2f}"
                      for k, r in rows.items())
    headline = ratios.get("mcc_ratio_eps8")
    start = ("from scratch" if args.public_pretrain == "none" else
             f"from a public {args.public_pretrain} backbone ({args.public_epochs} epochs on "
             f"{args.public_patients} public patients)")
    if tuning:
        start += "; lr per row tuned on a public federation: " + ", ".join(
            f"{name} {t['lr']:g}" for name, t in tuning.items())
    update_results_md(
        args.name, f"| {args.name} | DP-FedAvg test MCC / non-DP at ε=8: "
        f"{'n/a' if headline is None else f'{headline:.2f}'} (target ≥ 0.97) | {cells}; "
        f"{args.rounds} rounds x {args.local_epochs} epochs, δ=1e-5, {args.mode} {start} | "
        f"`results/{path.name}` |")
    print(f"{ratios}\nwrote {path}")


if __name__ == "__main__":
    main()
