"""Framework overhead per round of the simulated federation, with 3 and 10 sites.

overhead = (round wall time - slowest site's compute time) / round wall time, where a site's
compute is its training plus evaluation seconds as it measured them itself, and the round
wall time runs from the server sampling sites to the end of aggregating their evaluations
(MLflow logging and model registration included). Round 1 (Ray actor start, imports, data
loading) is reported separately and excluded from the headline figure.

Beside each MedFed run, a plain Flower app (``bench/flower_baseline.py``: the same model,
sites, studies per site, epochs and batch size; Flower's FedAvg and nothing else) is timed
the same way. ``round_seconds_over_flower`` is MedFed's mean round minus Flower's (rounds
2..N); the goal is at most 10% of the site compute (the slowest site's train + eval seconds).

Two more views of the same runs, because a round's span ends before the round's own
bookkeeping (observers: checkpoint, MLflow queue) and a wall time on a shared 2-core machine
moves with other processes' load:

- ``cycle_seconds_over_flower``: start of a round to start of the next (rounds 2..N-1), so
  everything between two rounds counts;
- ``steady_round_seconds_over_flower``: the same difference over rounds 4..N only, after the
  phase's first model version and the first-time costs of the writer (the phase's model is
  traced once, ~2 s of server CPU: since session 20 while the MLflow run is set up, before
  round 1; session 19 while round 1 trained; before, while rounds 2-3 trained) - what each
  further round of a long run costs;
- ``cpu_seconds_over_flower``: CPU seconds per round (rounds 2..N-1) of the server process
  (all its threads: the round loop, Flower's message pumps, the MLflow writer) plus the
  sites' message handlers (each handler's own thread, measured by a client mod in both
  apps) - what each framework costs whatever else runs on the machine.

    python -m bench.framework_overhead [--rounds 5] [--patients 40]
"""

from __future__ import annotations

import argparse
import os
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench.flower_baseline import SiteSize, run_plain_flower
from medfed.simulation import simulate
from medfed.synth.sites import synthesize
from server.config import load_experiment
from strategies.observed import RoundRecord

from .common import update_results_md, write_result


STEADY_FROM = 4        # first round of the steady view (module docstring)


class HandlerCPU:
    """Client mod: each message's handler CPU seconds (its own thread) and server round,
    appended to ``path`` (one line per message; simulated sites run in other processes)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __call__(self, msg, context, call_next):
        started = time.thread_time()
        reply = call_next(msg, context)
        seconds = time.thread_time() - started
        config = msg.content.config_records.get("config") if msg.has_content() else None
        rnd = int(config.get("server-round", 0)) if config is not None else 0
        with open(self.path, "a") as f:
            f.write(f"{rnd}\t{msg.metadata.message_type}\t{seconds:.6f}\n")
        return reply

    def per_round(self) -> dict[int, float]:
        """Round -> the sites' handler CPU seconds summed (round 0: messages of no round)."""
        out: dict[int, float] = defaultdict(float)
        if os.path.exists(self.path):
            for line in open(self.path):
                rnd, _, seconds = line.split("\t")
                out[int(rnd)] += float(seconds)
        return dict(out)


def cpu_and_cycles(rounds: list[dict], handlers: dict[int, float]) -> dict:
    """Means over rounds 2..N-1 (those with a next round): start-to-start seconds, server
    process CPU, sites' handler CPU, and their sum."""
    inner = [r for r in rounds if r["round"] > 1 and "cycle_s" in r]
    if not inner:
        return {}
    server = statistics.mean(r["server_cpu_s"] for r in inner)
    sites = statistics.mean(handlers.get(r["round"], 0.0) for r in inner)
    return {"cycle_s": statistics.mean(r["cycle_s"] for r in inner), "server_cpu_s": server,
            "sites_cpu_s": sites, "cpu_s": server + sites}


class RoundTimes:
    def __init__(self):
        self.rounds: list[dict] = []
        self.sizes: dict[str, SiteSize] = {}      # site id -> studies trained / evaluated
        self._cpu = 0.0

    def on_train(self, record: RoundRecord) -> None:
        if self.rounds and "cycle_s" not in self.rounds[-1]:   # the previous round, start
            self.rounds[-1]["cycle_s"] = record.started - self.rounds[-1]["started"]  # to start

    def on_round_end(self, record: RoundRecord) -> None:
        train = {r.site_id: r.metrics.get("train-seconds", 0.0) for r in record.train}
        evals = {r.site_id: r.metrics.get("eval-seconds", 0.0) for r in record.evaluate}
        compute = {s: train.get(s, 0.0) + evals.get(s, 0.0) for s in set(train) | set(evals)}
        slowest = max(compute.values(), default=0.0)
        ntrain = {r.site_id: int(r.metrics.get("num-examples", 0)) for r in record.train}
        self.sizes = {r.site_id: SiteSize(ntrain.get(r.site_id, 0),
                                          int(r.metrics.get("num-examples", 0)))
                      for r in record.evaluate}
        wall = record.wall_seconds
        cpu, previous = time.process_time(), self._cpu   # this process, end to end of a round
        self._cpu = cpu
        self.rounds.append({"round": record.round, "started": record.started, "wall_s": wall,
                            "slowest_site_s": slowest, "sum_site_s": sum(compute.values()),
                            "overhead": (wall - slowest) / wall if wall > 0 else 0.0}
                           | ({"server_cpu_s": cpu - previous} if self.rounds else {}))


def measure(n_sites: int, rounds: int, patients: int, work: Path, log_models: bool = True) -> dict:
    data = work / f"data-{n_sites}"
    if not data.exists():
        synthesize(data, n_sites=n_sites, seed=0, patients=patients)
    cfg = load_experiment(["experiment=demo", f"data.root={data}", f"runs_dir={work / 'runs'}",
                           f"federation.num_sites={n_sites}", f"federation.num_rounds={rounds}",
                           "train.local_epochs=2", f"tracking.log_models={str(log_models).lower()}"])
    times = RoundTimes()
    meter = HandlerCPU(work / f"handlers-medfed-{n_sites}-{log_models}.tsv")
    simulate(cfg, observers=(times,), client_mods=(meter,))
    steady = [r for r in times.rounds if r["round"] > 1]
    out = {
        "sites": n_sites,
        "overhead": statistics.mean(r["overhead"] for r in steady),
        "round_wall_s": statistics.mean(r["wall_s"] for r in steady),
        "slowest_site_s": statistics.mean(r["slowest_site_s"] for r in steady),
        "sum_site_s": statistics.mean(r["sum_site_s"] for r in steady),
        "first_round": times.rounds[0],
        "rounds": times.rounds,
    } | cpu_and_cycles(times.rounds, meter.per_round())
    if not log_models:
        return out
    sizes = [times.sizes[f"site-{i}"] for i in range(n_sites)]
    plain_meter = HandlerCPU(work / f"handlers-flower-{n_sites}.tsv")
    flower = run_plain_flower(cfg, sizes, rounds, mods=(plain_meter,))
    plain = [r for r in flower if r["round"] > 1]
    out["flower"] = {"round_wall_s": statistics.mean(r["wall_s"] for r in plain),
                     "slowest_site_s": statistics.mean(r["slowest_site_s"] for r in plain),
                     "first_round": flower[0], "rounds": flower,
                     "studies_per_site": [[s.train, s.evaluate] for s in sizes]} \
        | cpu_and_cycles(flower, plain_meter.per_round())
    out["round_seconds_over_flower"] = out["round_wall_s"] - out["flower"]["round_wall_s"]
    # once the phase's first version and the writer's first-time costs are behind: the
    # per-round cost a long run pays
    steady = {"medfed": [r["wall_s"] for r in times.rounds if r["round"] >= STEADY_FROM],
              "flower": [r["wall_s"] for r in flower if r["round"] >= STEADY_FROM]}
    if steady["medfed"] and steady["flower"]:
        out["steady_round_wall_s"] = statistics.mean(steady["medfed"])
        out["flower"]["steady_round_wall_s"] = statistics.mean(steady["flower"])
        out["steady_round_seconds_over_flower"] = (out["steady_round_wall_s"]
                                                   - out["flower"]["steady_round_wall_s"])
    out["cycle_seconds_over_flower"] = out["cycle_s"] - out["flower"]["cycle_s"]
    out["cpu_seconds_over_flower"] = {
        k: out[k] - out["flower"][k] for k in ("cpu_s", "server_cpu_s", "sites_cpu_s")}
    out["goal_seconds"] = 0.1 * out["slowest_site_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--patients", type=int, default=40)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="medfed-bench-") as tmp:
        results = {n: measure(n, args.rounds, args.patients, Path(tmp)) for n in (3, 10)}
        no_models = measure(3, args.rounds, args.patients, Path(tmp), log_models=False)
    payload = {
        "round_seconds_over_flower": {f"{n}_sites": r["round_seconds_over_flower"]
                                      for n, r in results.items()},
        "round_seconds_over_flower_3_sites": results[3]["round_seconds_over_flower"],
        "round_seconds_over_flower_10_sites": results[10]["round_seconds_over_flower"],
        "steady_round_seconds_over_flower": {
            f"{n}_sites": r.get("steady_round_seconds_over_flower") for n, r in results.items()},
        "goal_seconds": {f"{n}_sites": r["goal_seconds"] for n, r in results.items()},
        "goal_met": all(r["round_seconds_over_flower"] <= r["goal_seconds"]
                        for r in results.values()),
        "cycle_seconds_over_flower": {f"{n}_sites": r["cycle_seconds_over_flower"]
                                      for n, r in results.items()},
        "cpu_seconds_over_flower": {f"{n}_sites": r["cpu_seconds_over_flower"]
                                    for n, r in results.items()},
        "overhead_3_sites": results[3]["overhead"],
        "overhead_10_sites": results[10]["overhead"],
        "overhead_3_sites_without_model_registration": no_models["overhead"],
        # the same 3 sites with tracking.log_models=false: what per-round registration costs
        "without_model_registration_3_sites": {
            k: no_models[k] for k in ("round_wall_s", "cycle_s", "cpu_s", "server_cpu_s",
                                      "sites_cpu_s") if k in no_models},
        "definition": "overhead: (round wall - slowest site's train+eval seconds) / round "
                      "wall; round_seconds_over_flower: MedFed round wall - plain Flower "
                      "round wall (same model, sites, studies, epochs); goal: <= 10% of the "
                      "slowest site's compute; rounds 2..N, round 1 reported separately; "
                      "cycle: round start to next round start, cpu: server process CPU per "
                      "round + the sites' handler-thread CPU, both rounds 2..N-1; steady: "
                      "rounds 4..N, after the phase's first model version",
        "details": {str(k): v for k, v in results.items()},
    }
    # other processes' load on this machine while it ran (1, 5, 15 min averages)
    payload["load_average_at_end"] = list(os.getloadavg())
    path = write_result("framework_overhead", payload)
    for n, r in results.items():
        print(f"{n:2d} sites: overhead {r['overhead']:.1%}  (round {r['round_wall_s']:.2f}s, "
              f"slowest site {r['slowest_site_s']:.2f}s, all sites {r['sum_site_s']:.2f}s; "
              f"first round {r['first_round']['wall_s']:.1f}s); plain Flower round "
              f"{r['flower']['round_wall_s']:.2f}s: +{r['round_seconds_over_flower']:.2f}s "
              f"(goal <= {r['goal_seconds']:.2f}s); rounds {STEADY_FROM}..: "
              f"+{r.get('steady_round_seconds_over_flower', float('nan')):.2f}s; "
              f"start-to-start {r['cycle_s']:.2f}s vs "
              f"{r['flower']['cycle_s']:.2f}s; CPU per round {r['cpu_s']:.2f}s (server "
              f"{r['server_cpu_s']:.2f}s, sites {r['sites_cpu_s']:.2f}s) vs Flower "
              f"{r['flower']['cpu_s']:.2f}s ({r['flower']['server_cpu_s']:.2f}s, "
              f"{r['flower']['sites_cpu_s']:.2f}s)")
    print(f" 3 sites without per-round model registration: overhead {no_models['overhead']:.1%} "
          f"(round {no_models['round_wall_s']:.2f}s, start-to-start "
          f"{no_models.get('cycle_s', float('nan')):.2f}s, CPU per round "
          f"{no_models.get('cpu_s', float('nan')):.2f}s: server "
          f"{no_models.get('server_cpu_s', float('nan')):.2f}s)")
    r3, r10 = results[3], results[10]
    update_results_md(
        "framework overhead",
        f"| framework overhead | round vs plain Flower: +{r3['round_seconds_over_flower']:.2f}s "
        f"(3 sites) / +{r10['round_seconds_over_flower']:.2f}s (10 sites); goal <= 10% of site "
        f"compute ({r3['goal_seconds']:.2f}s / {r10['goal_seconds']:.2f}s): "
        f"{'met' if payload['goal_met'] else 'not met'}; rounds {STEADY_FROM}..N "
        f"+{r3.get('steady_round_seconds_over_flower', float('nan')):.2f}s / "
        f"+{r10.get('steady_round_seconds_over_flower', float('nan')):.2f}s "
        f"| MedFed round {r3['round_wall_s']:.2f}s vs Flower {r3['flower']['round_wall_s']:.2f}s, "
        f"slowest site {r3['slowest_site_s']:.2f}s (3); {r10['round_wall_s']:.2f}s vs "
        f"{r10['flower']['round_wall_s']:.2f}s, {r10['slowest_site_s']:.2f}s (10); overhead "
        f"{r3['overhead']:.1%} / {r10['overhead']:.1%}, {no_models['overhead']:.1%} (3 sites, "
        f"no model registration: round {no_models['round_wall_s']:.2f}s, CPU "
        f"{no_models.get('cpu_s', float('nan')):.2f}s); start to start "
        f"+{r3['cycle_seconds_over_flower']:.2f}s / "
        f"+{r10['cycle_seconds_over_flower']:.2f}s; CPU per round +"
        f"{r3['cpu_seconds_over_flower']['cpu_s']:.2f}s / "
        f"+{r10['cpu_seconds_over_flower']['cpu_s']:.2f}s over Flower's "
        f"{r3['flower']['cpu_s']:.2f}s / {r10['flower']['cpu_s']:.2f}s; "
        f"{args.rounds} rounds, {args.patients} patients/site; "
        f"5-min load average {payload['load_average_at_end'][1]:.1f} at the end "
        f"| `results/{path.name}` |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
