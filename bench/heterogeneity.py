"""Strategies under label skew: 5 synthetic hospitals, Dirichlet alpha in {0.1, 0.5, 10}.

For each alpha, side by side in one run:
- FedAvg, FedProx, FedAdam: the final global model on the external site (never trains);
- FedAvg with logit adjustment (``task.options.logit_adjustment=1``: each site trains on
  logits + log of its own label prior, FedLC / balanced-softmax style), and the same plus
  feature decorrelation (``task.options.feature_decorrelation=0.1``, FedDecorr), same scoring;
- FedNova (``strategy=fednova``: updates normalised by local steps) with both options, and
  FedAvgM with both (not in the headline arms; ``--arms`` lists every choice);
- FedBN (normalisation layers local) and personalized FedAvg (each site's adapted model):
  these models exist only at their sites, so they are scored on the sites' own test splits;
- pooled centralized training on all sites' training data (upper bound), same backbone and
  the same number of passes over the data, scored both ways.

``best_over_pooled_alpha_0_5`` = best global strategy's external MCC / pooled external MCC.

    python -m bench.heterogeneity [--rounds 80] [--local-epochs 4] [--patients 120]
                                  [--alphas 0.1,0.5,10] [--seeds 0,1,2] [--arms ...] [--name ...]
                                  [--resume]

The JSON is written after every (seed, alpha) run; ``--resume`` keeps the runs already in it
(same rounds, epochs, patients and arms) and runs only the missing ones, so a bench longer
than one sitting can be finished in several. ``run_commits`` says which commit measured each.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import torch

from client.data.dataset import StudyDataset
from client.data.site import load_site
from client.engine import Engine, TrainConfig
from medfed.simulation import simulate
from medfed.synth.sites import Scenario, synthesize
from models import MODELS, TASKS
from server.checkpoint import latest_weights
from server.config import ExperimentConfig, load_experiment
from strategies.observed import RoundRecord
from protocol.metrics import from_record, report_splits
from strategies.pooling import pool

from .common import RESULTS_DIR, commit, update_results_md, write_result

ALPHAS = (0.1, 0.5, 10.0)
SITES = 5
GLOBAL = {"fedavg": ["strategy=personalized"],
          "fedavg_logit_adjusted": ["strategy=fedavg", "task.options.logit_adjustment=1.0"],
          "fedavg_la_decorr": ["strategy=fedavg", "task.options.logit_adjustment=1.0",
                               "task.options.feature_decorrelation=0.1"],
          "fedavgm_la_decorr": ["strategy=fedavgm", "task.options.logit_adjustment=1.0",
                                "task.options.feature_decorrelation=0.1"],
          "fednova_la_decorr": ["strategy=fednova", "task.options.logit_adjustment=1.0",
                                "task.options.feature_decorrelation=0.1"],
          "fedprox": ["strategy=fedprox"], "fedadam": ["strategy=fedadam"]}
ARMS = (*GLOBAL, "personalized", "fedbn", "pooled")
# the headline run: one arm per strategy family, FedAvg and FedNova with the skew options
HEADLINE_ARMS = ("fedavg", "personalized", "fedprox", "fedadam", "fedbn", "fedavg_la_decorr",
                 "fednova_la_decorr", "pooled")


class LastRound:
    """Keeps the last round's pooled site-test metrics (global and personal)."""

    def __init__(self):
        self.test, self.personal = {}, {}

    def on_train(self, record: RoundRecord) -> None:
        pass

    def on_round_end(self, record: RoundRecord) -> None:
        self.test, self.personal = ([pool([from_record(r.metrics, split) for r in record.evaluate
                                           if split in report_splits(r.metrics)])
                                     for split in ("test", "personal-test")])


def external_mcc(cfg: ExperimentConfig, weights: dict, external: StudyDataset) -> float:
    model = MODELS.build(cfg.model.name, cfg.model_options())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    engine = Engine(TASKS.build(cfg.task.name, cfg.task_options()), torch.device("cpu"))
    return engine.evaluate(model, external).scalars()["mcc"]


def pooled(cfg: ExperimentConfig, root: Path, epochs: int, external: StudyDataset) -> dict:
    classes = tuple(cfg.task.class_names)
    sites = [load_site(root / f"site-{i}", classes) for i in range(SITES)]
    train = StudyDataset([s for d in sites for s in d.split("train", labelled_only=True)],
                         cfg.task.image_size, augment=True)
    test = StudyDataset([s for d in sites for s in d.split("test", labelled_only=True)],
                        cfg.task.image_size)
    torch.manual_seed(cfg.seed)
    model = MODELS.build(cfg.model.name, cfg.model_options())
    engine = Engine(TASKS.build(cfg.task.name, cfg.task_options()), torch.device("cpu"))
    for epoch in range(epochs):
        train.reseed(epoch)
        engine.fit(model, train, TrainConfig(local_epochs=1, lr=cfg.train.lr,
                                             batch_size=cfg.train.batch_size, seed=epoch))
    return {"external_mcc": engine.evaluate(model, external).scalars()["mcc"],
            "site_test_mcc": engine.evaluate(model, test).scalars()["mcc"]}


def run_alpha(alpha: float, seed: int, args, work: Path) -> dict:
    root = work / f"seed-{seed}-alpha-{alpha}"
    synthesize(root, n_sites=SITES, seed=seed, external=True,
               scenario=Scenario(alpha=alpha, patients=args.patients))
    base = [f"data.root={root}", f"runs_dir={work / 'runs'}", f"federation.num_sites={SITES}",
            f"federation.num_rounds={args.rounds}", f"train.local_epochs={args.local_epochs}",
            "tracking.log_models=false", f"seed={seed}"]
    cfg = load_experiment(base)
    external = StudyDataset(load_site(root / "external", tuple(cfg.task.class_names)).studies,
                            cfg.task.image_size)
    arms = args.arms.split(",")
    table: dict[str, dict] = {}
    for name, override in GLOBAL.items():
        if name not in arms and not (name == "fedavg" and "personalized" in arms):
            continue
        run_cfg = load_experiment([*base, *override])
        last = LastRound()
        run_dir = simulate(run_cfg, observers=(last,))
        table[name] = {"external_mcc": external_mcc(run_cfg, latest_weights(run_dir), external),
                       "site_test_mcc": last.test.get("mcc")}
        if name == "fedavg":
            table["personalized"] = {"external_mcc": None, "site_test_mcc": last.personal.get("mcc")}
        print(f"seed {seed} alpha {alpha}: {name:12s} {table[name]}", flush=True)
    if "fedbn" in arms:
        fedbn_cfg = load_experiment([*base, "strategy=fedbn"])
        last = LastRound()
        simulate(fedbn_cfg, observers=(last,))
        table["fedbn"] = {"external_mcc": None, "site_test_mcc": last.test.get("mcc")}
    if "pooled" in arms:
        table["pooled"] = pooled(cfg, root, args.rounds * args.local_epochs, external)
    for name in ("personalized", "fedbn", "pooled"):
        if name in table:
            print(f"seed {seed} alpha {alpha}: {name:12s} {table[name]}", flush=True)
    return table


def mean_table(tables: list[dict]) -> dict:
    """Each arm's figures averaged over seeds (None where an arm has no such figure)."""
    out = {}
    for arm in tables[0]:
        out[arm] = {}
        for key in tables[0][arm]:
            values = [t[arm][key] for t in tables if t[arm][key] is not None]
            out[arm][key] = sum(values) / len(values) if values else None
    return out


def previous_runs(args) -> tuple[dict, dict]:
    """``(per_seed, run_commits)`` already in ``bench/results/<name>.json`` for ``--resume``;
    a file measured with other settings is refused rather than mixed in."""
    path = RESULTS_DIR / f"{args.name}.json"
    if not path.exists():
        return {}, {}
    old = json.loads(path.read_text())
    mine = {"rounds": args.rounds, "local_epochs": args.local_epochs,
            "patients_per_site": args.patients, "arms": args.arms.split(",")}
    differ = {k: (old.get(k), v) for k, v in mine.items() if old.get(k) != v}
    if differ:
        raise SystemExit(f"--resume: {path.name} was measured with other settings "
                         f"(file, now): {differ}; use another --name")
    per_seed = old.get("per_seed", {})
    commits = old.get("run_commits") or {f"{seed}/{alpha}": old.get("commit", "unknown")
                                         for seed, runs in per_seed.items() for alpha in runs}
    return per_seed, commits


def results(per_seed: dict, args, run_commits: dict | None = None) -> dict:
    """The JSON payload for the (seed, alpha) runs finished so far: ``tables`` holds each
    alpha's figures averaged over the seeds that finished it, ``per_seed`` each run."""
    alphas = {a for runs in per_seed.values() for a in runs}
    tables = {a: mean_table([runs[a] for runs in per_seed.values() if a in runs])
              for a in sorted(alphas, key=float)}
    payload = {"best_over_pooled_alpha_0_5": None, "best_strategy_alpha_0_5": None,
               "tables": tables, "per_seed": per_seed,
               "seeds": [int(s) for s in per_seed], "sites": SITES, "rounds": args.rounds,
               "local_epochs": args.local_epochs, "patients_per_site": args.patients,
               "arms": args.arms.split(","),
               "complete": all(str(float(a)) in per_seed.get(str(int(seed)), {})
                               for seed in args.seeds.split(",") for a in args.alphas.split(",")),
               "run_commits": run_commits or {}}
    mid = tables.get("0.5", {})
    candidates = [n for n in GLOBAL if n in mid]
    if candidates:
        best = max(candidates, key=lambda n: mid[n]["external_mcc"])
        payload["best_strategy_alpha_0_5"] = best
        pooled_mcc = mid.get("pooled", {}).get("external_mcc")
        if pooled_mcc is not None and pooled_mcc > 0:    # no ratio to a pooled model at chance
            payload["best_over_pooled_alpha_0_5"] = mid[best]["external_mcc"] / pooled_mcc
    return payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--local-epochs", type=int, default=4)
    parser.add_argument("--patients", type=int, default=120)
    parser.add_argument("--seeds", "--seed", default="0",
                        help="comma-separated; each seed draws new sites and a new model init, "
                             "and the tables average over them")
    parser.add_argument("--alphas", default=",".join(str(a) for a in ALPHAS),
                        help="comma-separated; must include 0.5 for the headline ratio")
    parser.add_argument("--arms", default=",".join(HEADLINE_ARMS),
                        help=f"comma-separated subset of {', '.join(ARMS)}")
    parser.add_argument("--name", default="heterogeneity",
                        help="results name (bench/results/<name>.json, RESULTS.md row)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the (seed, alpha) runs already in the results file and run "
                             "only the missing ones")
    args = parser.parse_args()
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    logging.basicConfig(level=logging.WARNING)
    per_seed, run_commits = previous_runs(args) if args.resume else ({}, {})
    with tempfile.TemporaryDirectory(prefix="medfed-hetero-") as tmp:
        for seed in args.seeds.split(","):
            for alpha in args.alphas.split(","):
                seed, alpha = str(int(seed)), str(float(alpha))
                if alpha in per_seed.get(seed, {}):
                    print(f"seed {seed} alpha {alpha}: kept from the results file", flush=True)
                    continue
                table = run_alpha(float(alpha), int(seed), args, Path(tmp))
                per_seed.setdefault(seed, {})[alpha] = table
                run_commits[f"{seed}/{alpha}"] = commit()
                # after every run, so that a stopped bench keeps what it measured
                write_result(args.name, results(per_seed, args, run_commits))
    payload = results(per_seed, args, run_commits)
    path = write_result(args.name, payload)
    best_name, ratio = payload["best_strategy_alpha_0_5"], payload["best_over_pooled_alpha_0_5"]
    tables = payload["tables"]
    if ratio is not None:
        print(f"best at alpha 0.5: {best_name}, external MCC "
              f"{tables['0.5'][best_name]['external_mcc']:.3f} vs pooled "
              f"{tables['0.5']['pooled']['external_mcc']:.3f} -> ratio {ratio:.3f}")
    shown = [n for n in (*GLOBAL, "pooled") if n in args.arms.split(",")]
    cells = "; ".join(f"α={a}: " + ", ".join(
        f"{n} {t[n]['external_mcc']:.2f}" for n in shown) for a, t in tables.items())
    seeds = payload["seeds"]
    seeds_cell = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of seeds {', '.join(map(str, seeds))}"
    update_results_md(
        args.name, f"| {args.name} | best/pooled external MCC at α=0.5: "
        f"{'n/a' if ratio is None else f'{ratio:.2f}'} ({best_name}) | external MCC {cells}; "
        f"{SITES} sites, {args.rounds} rounds x {args.local_epochs} epochs, {seeds_cell} | "
        f"`results/{path.name}` |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
