"""Many small sites in one simulation: MedFed's cost per site and round beside plain Flower's.

A tiny model (``experiment=smoke``: mmvit_tiny) and a few patients per site, so that the
framework, not training, is what is measured. One process runs the MedFed simulation, then
the plain Flower app of ``bench/flower_baseline.py`` with the same model, sites and studies
per site. For each: wall time, each round's wall time, and the peak memory of all processes
summed (this process, Ray and its workers; resident set size, sampled every 0.5 s).

``per_site_cost_vs_flower`` = (MedFed's mean round / sites) / (Flower's mean round / sites),
rounds 2..N (round 1 starts Ray's actors and reads the sites' DICOM; reported apart).

    python -m bench.scale [--sites 1000] [--rounds 3] [--patients 4] [--profile out.prof]

``--profile``: cProfile of the server's round loop (its thread, from round 1's training
replies to the end), to see what grows with sites or history.

Because a wall time on a shared machine moves with other processes' load, the same runs are
also counted in CPU seconds (``bench.framework_overhead.HandlerCPU``: the server process per
round plus every site's message handler, rounds 2..N-1): ``cpu_per_site_round_vs_flower``.
"""

from __future__ import annotations

import argparse
import os
import cProfile
import logging
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil

from bench.flower_baseline import SiteSize, run_plain_flower
from bench.framework_overhead import HandlerCPU, cpu_and_cycles
from medfed.simulation import simulate
from medfed.synth.sites import synthesize
from server.config import load_experiment
from strategies.observed import RoundRecord

from .common import update_results_md, write_result

GOAL = 2.0      # per-site cost at most twice Flower's own


class PeakMemory:
    """Peak of the summed resident memory of this process and all its descendants."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak, self.server_peak = every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(self.every):
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:          # a process that just ended
                    pass
            self.peak = max(self.peak, total)
            self.server_peak = max(self.server_peak, me.memory_info().rss)


class Rounds:
    """Each round's wall time and sites; the studies per site; optionally a profile."""

    def __init__(self, profile: Path | None = None):
        self.rounds: list[dict] = []
        self.sizes: dict[str, SiteSize] = {}
        self.profile = profile
        self._profiler: cProfile.Profile | None = None
        self._cpu = 0.0

    def on_train(self, record: RoundRecord) -> None:
        if self.rounds and "cycle_s" not in self.rounds[-1]:   # the previous round, start
            self.rounds[-1]["cycle_s"] = record.started - self.rounds[-1]["started"]  # to start
        if self.profile is not None and self._profiler is None:   # the server's own thread
            self._profiler = cProfile.Profile()
            self._profiler.enable()

    def on_round_end(self, record: RoundRecord) -> None:
        ntrain = {r.site_id: int(r.metrics.get("num-examples", 0)) for r in record.train}
        self.sizes = {r.site_id: SiteSize(ntrain.get(r.site_id, 0),
                                          int(r.metrics.get("num-examples", 0)))
                      for r in record.evaluate}
        cpu, previous = time.process_time(), self._cpu   # this process, end to end of a round
        self._cpu = cpu
        self.rounds.append({"round": record.round, "started": record.started,
                            "wall_s": record.wall_seconds,
                            "sites_trained": len(record.train),
                            "sites_evaluated": len(record.evaluate)}
                           | ({"server_cpu_s": cpu - previous} if self.rounds else {}))

    def stop_profile(self) -> None:
        if self._profiler is not None:
            self._profiler.disable()
            self._profiler.dump_stats(str(self.profile))


def _steady(rounds: list[dict]) -> float:
    later = [r["wall_s"] for r in rounds if r["round"] > 1] or [r["wall_s"] for r in rounds]
    return statistics.mean(later)


def measure(n_sites: int, rounds: int, patients: int, work: Path,
            profile: Path | None = None, flower: bool = True) -> dict:
    data = work / f"data-{n_sites}"
    started = time.perf_counter()
    if not data.exists():
        synthesize(data, n_sites=n_sites, seed=0, patients=patients)
    synth_s = time.perf_counter() - started
    cfg = load_experiment(["experiment=smoke", f"data.root={data}", f"runs_dir={work / 'runs'}",
                           f"federation.num_sites={n_sites}", f"federation.num_rounds={rounds}",
                           "federation.round_timeout=3600"])
    times = Rounds(profile)
    meter = HandlerCPU(work / "handlers-medfed.tsv")
    started = time.perf_counter()
    with PeakMemory() as memory:
        run_dir = simulate(cfg, observers=(times,), client_mods=(meter,))
    times.stop_profile()
    medfed = {"wall_s": time.perf_counter() - started, "rounds": times.rounds,
              "round_wall_s": _steady(times.rounds),
              "peak_rss_all_processes_mb": memory.peak / 2**20,
              "peak_rss_server_process_mb": memory.server_peak / 2**20,
              "run_dir_files": sorted(p.name for p in run_dir.iterdir())} \
        | cpu_and_cycles(times.rounds, meter.per_round())
    medfed["per_site_round_s"] = medfed["round_wall_s"] / n_sites
    out = {"sites": n_sites, "rounds": rounds, "patients_per_site": patients,
           "synthesize_s": synth_s, "medfed": medfed}
    if not flower:
        return out
    sizes = [times.sizes.get(f"site-{i}", SiteSize(0, 0)) for i in range(n_sites)]
    plain_meter = HandlerCPU(work / "handlers-flower.tsv")
    started = time.perf_counter()
    with PeakMemory() as memory:
        plain_rounds = run_plain_flower(cfg, sizes, rounds, mods=(plain_meter,))
    plain = {"wall_s": time.perf_counter() - started, "rounds": plain_rounds,
             "round_wall_s": _steady(plain_rounds),
             "peak_rss_all_processes_mb": memory.peak / 2**20,
             "peak_rss_server_process_mb": memory.server_peak / 2**20} \
        | cpu_and_cycles(plain_rounds, plain_meter.per_round())
    plain["per_site_round_s"] = plain["round_wall_s"] / n_sites
    out["flower"] = plain
    out["studies_per_site"] = {"train_mean": statistics.mean(s.train for s in sizes),
                               "evaluate_mean": statistics.mean(s.evaluate for s in sizes)}
    out["per_site_cost_vs_flower"] = medfed["per_site_round_s"] / plain["per_site_round_s"]
    if "cpu_s" in medfed and "cpu_s" in plain:       # rounds 2..N-1 exist (3 rounds or more)
        out["cpu_per_site_round_vs_flower"] = medfed["cpu_s"] / plain["cpu_s"]
    out["first_round_vs_flower"] = medfed["rounds"][0]["wall_s"] / plain_rounds[0]["wall_s"]
    out["wall_vs_flower"] = medfed["wall_s"] / plain["wall_s"]
    return out


def _cpu_ratio(result: dict) -> str:
    ratio = result.get("cpu_per_site_round_vs_flower")
    if ratio is None:
        return "not measured (fewer than 3 rounds)"
    return (f"{ratio:.2f}x Flower's ({result['medfed']['cpu_s']:.0f}s vs "
            f"{result['flower']['cpu_s']:.0f}s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--profile", type=Path, default=None)
    parser.add_argument("--name", default="scale")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="medfed-scale-") as tmp:
        result = measure(args.sites, args.rounds, args.patients, Path(tmp),
                         profile=args.profile.resolve() if args.profile else None)
    m, f = result["medfed"], result["flower"]
    payload = {"per_site_cost_vs_flower": result["per_site_cost_vs_flower"],
               "goal": GOAL, "goal_met": result["per_site_cost_vs_flower"] <= GOAL,
               "cpu_per_site_round_vs_flower": result.get("cpu_per_site_round_vs_flower"),
               "wall_s": m["wall_s"], "flower_wall_s": f["wall_s"],
               "peak_rss_all_processes_mb": m["peak_rss_all_processes_mb"],
               "flower_peak_rss_all_processes_mb": f["peak_rss_all_processes_mb"],
               "definition": "per-site cost: mean round wall time (rounds 2..N, from sampling "
                             "sites to the end of aggregating evaluations) / sites; MedFed / "
                             "plain Flower (same model, sites, studies per site, in one process "
                             "one after the other); memory: resident set size of this process "
                             "and all its descendants summed, peak, sampled every 0.5 s; cpu: "
                             "server process CPU per round + every site's handler-thread CPU, "
                             "rounds 2..N-1, MedFed / Flower",
               "details": result}
    # other processes' load on this machine while it ran (1, 5, 15 min averages)
    payload["load_average_at_end"] = list(os.getloadavg())
    path = write_result(args.name, payload)
    print(f"{args.sites} sites x {args.rounds} rounds: MedFed {m['wall_s']:.0f}s wall, round "
          f"{m['round_wall_s']:.1f}s, peak {m['peak_rss_all_processes_mb']:.0f} MB (server "
          f"{m['peak_rss_server_process_mb']:.0f} MB); Flower {f['wall_s']:.0f}s, round "
          f"{f['round_wall_s']:.1f}s, peak {f['peak_rss_all_processes_mb']:.0f} MB; per-site cost "
          f"{result['per_site_cost_vs_flower']:.2f}x Flower's (goal <= {GOAL:g}x)")
    if args.name == "scale":
        update_results_md(
            "scale",
            f"| scale | per site and round {result['per_site_cost_vs_flower']:.2f}x plain Flower "
            f"(goal <= {GOAL:g}x: {'met' if payload['goal_met'] else 'not met'}) "
            f"| {args.sites} sites x {args.rounds} rounds, {args.patients} patients/site, "
            f"mmvit_tiny: wall {m['wall_s'] / 60:.1f} min (Flower {f['wall_s'] / 60:.1f} min), "
            f"round {m['round_wall_s']:.1f}s (Flower {f['round_wall_s']:.1f}s; first round "
            f"{m['rounds'][0]['wall_s']:.0f}s vs {f['rounds'][0]['wall_s']:.0f}s), peak memory "
            f"all processes {m['peak_rss_all_processes_mb'] / 1024:.2f} GB (Flower "
            f"{f['peak_rss_all_processes_mb'] / 1024:.2f} GB), server process "
            f"{m['peak_rss_server_process_mb'] / 1024:.2f} GB; CPU per round "
            f"{_cpu_ratio(result)}; 5-min load average "
            f"{payload['load_average_at_end'][1]:.1f} at the end | `results/{path.name}` |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
