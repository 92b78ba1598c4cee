"""Where the server's CPU goes in a steady simulated round, phase by phase (no profiler).

The demo experiment (``experiment=demo``, models registered) on a fresh synthetic federation
of ``--sites`` sites x 40 patients, ``--rounds`` rounds. From the end of round 1 to the end of
the last round, named server functions (below) are timed with the calling thread's CPU clock
(``time.thread_time``; the outermost call of each, so recursion is not counted twice) and
the whole process's CPU with ``time.process_time``; both per round. Labels say the thread:
``R`` the round loop (our wrappers and observers), ``W`` the MLflow writer thread, ``F``
Flower's Ray backend (it pickles each message and the ClientApp into an actor). Indentation
shows nesting; nested figures are inside their parent's.

    python -m bench.server_phases [--sites 3] [--rounds 10] [--work DIR] [--json FILE]

A diagnostic for ``bench.framework_overhead`` (issue 27: the server's CPU per round), not a
goal of its own: it prints, writes ``--json`` if asked, and touches neither ``results/`` nor
``RESULTS.md``. The names are internal: a function that moved is reported as missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

# label -> (module, attribute path): what is timed
PHASES = {
    "W writer.write_round": ("server.registration", "write_round"),
    "W  _log_round": ("server.tracking", "MlflowTracker._log_round"),
    "W   log_batch": ("mlflow", "MlflowClient.log_batch"),
    "W  _register": ("server.tracking", "MlflowTracker._register"),
    "W   initialize_logged_model": ("mlflow", "initialize_logged_model"),
    "W   Model.log": ("mlflow.models", "Model.log"),
    "W    ReusedExport.save_model": ("server.model_export", "ReusedExport.save_model"),
    "W     _scores_like (probe check)": ("server.model_export", "ReusedExport._scores_like"),
    "W     Pt2Template.write": ("server.model_export", "Pt2Template.write"),
    "W     Model.save (MLmodel)": ("mlflow.models", "Model.save"),
    "W   log_outputs": ("mlflow", "MlflowClient.log_outputs"),
    "W   create_version": ("server.versions", "create_version"),
    "W   log_artifacts": ("mlflow", "MlflowClient.log_artifacts"),
    "R configure_train": ("strategies.observed", "ObservedStrategy.configure_train"),
    "R configure_evaluate": ("strategies.observed", "ObservedStrategy.configure_evaluate"),
    "R aggregate_train (all)": ("strategies.observed", "ObservedStrategy.aggregate_train"),
    "R  guard.aggregate_train": ("strategies.guard", "GuardedStrategy.aggregate_train"),
    "R   check_update": ("strategies.guard", "check_update"),
    "R   FedAvg.aggregate_train": ("flwr.serverapp.strategy.fedavg", "FedAvg.aggregate_train"),
    "R  tracker.on_train": ("server.tracking", "MlflowTracker.on_train"),
    "R  console.on_train": ("server.console", "ConsoleTable.on_train"),
    "R aggregate_evaluate (all)": ("strategies.observed", "ObservedStrategy.aggregate_evaluate"),
    "R  tracker.on_round_end": ("server.tracking", "MlflowTracker.on_round_end"),
    "R  checkpointer.on_round_end": ("server.checkpoint", "Checkpointer.on_round_end"),
    "R  console.on_round_end": ("server.console", "ConsoleTable.on_round_end"),
    "F ray process_message": ("flwr.server.superlink.fleet.vce.backend.raybackend",
                              "RayBackend.process_message"),
}


class PhaseClock:
    """Thread CPU of the outermost call of each patched function while ``on``."""

    def __init__(self):
        self.on = False
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.missing: list[str] = []
        self._depth = threading.local()

    def patch(self, label: str, module: str, path: str) -> None:
        import importlib

        owner = importlib.import_module(module)
        *parents, name = path.split(".")
        for part in parents:
            owner = getattr(owner, part, None)
        real = getattr(owner, name, None)
        if real is None:
            self.missing.append(label)
            return

        def timed(*args, **kwargs):
            if not self.on:
                return real(*args, **kwargs)
            depth = getattr(self._depth, label, 0)
            setattr(self._depth, label, depth + 1)
            start = time.thread_time()
            try:
                return real(*args, **kwargs)
            finally:
                setattr(self._depth, label, depth)
                if depth == 0:
                    self.seconds[label] += time.thread_time() - start
                    self.calls[label] += 1
        setattr(owner, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--work", type=Path, default=None, help="default: a temp dir, removed")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (round 1 is not counted)")
    clock = PhaseClock()
    for label, (module, path) in PHASES.items():
        clock.patch(label, module, path)

    from medfed.simulation import simulate
    from medfed.synth.sites import synthesize
    from server.config import load_experiment

    from .framework_overhead import RoundTimes

    work = args.work or Path(tempfile.mkdtemp(prefix="medfed-phases-"))
    try:
        data = work / f"data-{args.sites}"
        if not data.exists():
            synthesize(data, n_sites=args.sites, seed=0, patients=40)
        shutil.rmtree(work / "runs", ignore_errors=True)
        cfg = load_experiment(["experiment=demo", f"data.root={data}",
                               f"runs_dir={work / 'runs'}", f"federation.num_sites={args.sites}",
                               f"federation.num_rounds={args.rounds}", "train.local_epochs=2",
                               "tracking.log_models=true"])
        started: dict[str, float] = {}

        class Gate:                 # counts from the end of round 1 to the end of the last
            def on_train(self, record) -> None:
                pass

            def on_round_end(self, record) -> None:
                if record.round == 1:
                    clock.on, started["cpu"] = True, time.process_time()
                elif record.round == args.rounds:
                    clock.on, started["cpu"] = False, time.process_time() - started["cpu"]

        times = RoundTimes()
        simulate(cfg, observers=(times, Gate()))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    steady = args.rounds - 1
    out = {"sites": args.sites, "rounds": args.rounds,
           "process_cpu_per_round_s": started["cpu"] / steady,
           "phases_s_per_round": {k: clock.seconds[k] / steady for k in PHASES if k in clock.calls},
           "calls_per_round": {k: clock.calls[k] / steady for k in PHASES if k in clock.calls},
           "missing": clock.missing, "load": open("/proc/loadavg").read().split()[:3]}
    print(f"server process CPU per round (rounds 2..{args.rounds}): "
          f"{out['process_cpu_per_round_s']:.3f} s")
    for label in out["phases_s_per_round"]:
        print(f"{label:42s} {out['phases_s_per_round'][label] * 1e3:8.1f} ms/round "
              f"{out['calls_per_round'][label]:6.1f} calls/round")
    if clock.missing:
        print("not found (moved or renamed):", ", ".join(clock.missing))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
