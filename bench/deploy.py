"""Per-round overhead of the deployment engine vs simulation, same tiny experiment, one run.

Both sides run ``experiment=smoke`` with three synthetic sites and the same number of rounds on
this machine, plain and with SecAgg+ (``secagg.enabled=true``): with ``medfed simulate``
(Flower's simulation engine on Ray), and as a real deployment on loopback (``medfed server``
with TLS and SuperNode authentication, three ``medfed site`` daemons approving this release,
``medfed run`` twice on the same federation). The figure is ``round/wall_seconds`` that the
ServerApp logs to MLflow (train + evaluate + model registration), deployment / simulation:
``round_overhead_ratio`` over the rounds after the first (both engines warm), the first round
reported apart (Ray's start-up on one side, the first read of the site's data on the other).
The deployment is measured twice, each on a federation of its own: with the coordinator's
Flower state in sqlite (``medfed server``'s default; the headline figures) and in memory
(``--link-state memory``; the ``*_memory_state`` figures).

    python -m bench.deploy [--rounds 4]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from protocol.hoptrace import ENV as HOP_TRACE

from . import deploy_timeline
from .common import update_results_md, write_result

MEDFED = [sys.executable, "-m", "medfed.cli"]
REPO = str(Path(__file__).resolve().parents[1])
SITES = ("a", "b", "c")


def _env(trace: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop(HOP_TRACE, None)
    # every process (the coordinator's SuperLink runs in its state folder) imports the tree
    # being measured, not whichever MedFed the environment has installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (REPO, env.get("PYTHONPATH"))))
    return env | ({HOP_TRACE: str(trace)} if trace else {})


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_seconds(runs_dir: Path, before: set[Path] = frozenset()) -> list[float]:
    """``round/wall_seconds`` per round from the run's sqlite MLflow store (the one run
    directory that is not in ``before``)."""
    (db,) = [p for p in runs_dir.glob("smoke-*/mlflow.db") if p.parent not in before]
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT step, value FROM metrics WHERE key='round/wall_seconds' "
                           "ORDER BY step").fetchall()
    return [v for _, v in rows]


VARIANTS = {"plain": [], "secagg": ["secagg.enabled=true"]}
# the coordinator's link state (``medfed server --link-state``) -> suffix of its figures:
# the default (sqlite) gives the headline ratios, the in-memory state the ``_memory_state`` ones
LINK_STATES = {"sqlite": "", "memory": "_memory_state"}


def simulate(data: Path, runs: Path, rounds: int, extra: list[str]) -> tuple[list[float], float]:
    """One simulated run; tried a second time if it fails (on a loaded machine Ray's actors
    can start after the preflight's policy timeout, which refuses the run)."""
    for attempt in (1, 2):
        start = time.perf_counter()
        done = subprocess.run([*MEDFED, "simulate", "experiment=smoke", "federation.num_sites=3",
                               f"federation.num_rounds={rounds}", f"data.root={data}",
                               f"runs_dir={runs}/{attempt}", *extra], env=_env(),
                              stdout=subprocess.DEVNULL)
        if done.returncode == 0:
            return round_seconds(runs / str(attempt)), time.perf_counter() - start
        print(f"simulation {' '.join(extra) or 'plain'} failed (attempt {attempt})",
              file=sys.stderr)
    done.check_returncode()
    raise AssertionError("unreachable")


def deploy(data: Path, root: Path, rounds: int, link_state: str = "sqlite",
           trace: Path | None = None) -> dict[str, tuple[list[float], float]]:
    """Both variants, one after the other, on one federation (sites stay up between runs);
    the coordinator keeps Flower's state in ``link_state`` (``medfed server --link-state``).
    With ``trace``, every process appends its hops there (``protocol.hoptrace``) and the
    results carry each variant's time window under ``"<variant>_window"``."""
    from medfed.certs import write_certs
    from medfed.deploy.allowlist import digest_of

    approved = digest_of(Path(__file__).resolve().parents[1])   # the FAB `medfed run` submits

    certs = root / "certs"
    write_certs(certs, server_name="localhost", sites=list(SITES))
    port = _port()
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = open(root / f"{name}.log", "w")
        procs.append(subprocess.Popen([*MEDFED, *args], env=_env(trace), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    def wait_for(name: str, text: str, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while text not in (root / f"{name}.log").read_text():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: no {text!r} within {timeout} s")
            time.sleep(0.5)

    try:
        start("server", ["server", "--certs", str(certs), "--state-dir", str(root / "state"),
                         "--host", "127.0.0.1", "--port", str(port),
                         "--link-state", link_state])
        wait_for("server", "site c: public key")
        # the registration list each hospital gets out of band (malicious-secure SecAgg+)
        peers = root / "secagg-peers.pub"
        peers.write_text("".join((certs / "sites" / s / "auth.pub").read_text() for s in SITES))
        for i, site in enumerate(SITES):
            start(site, ["site", "--site-id", site, "--data-dir", str(data / f"site-{i}"),
                         "--superlink", f"localhost:{port}", "--root-cert", str(certs / "ca.pem"),
                         "--auth-key", str(certs / "sites" / site / "auth.key"),
                         "--state-dir", str(root / f"node-{site}"),
                         "--runtime-port", str(_port()), "--allow-app", approved,
                         "--secagg-peers", str(peers),
                         "--min-eval-split-size", "1"])    # synthetic sites of a few studies
        for site in SITES:
            wait_for(site, "SuperNode ID:")
        results, windows = {}, {}
        runs = root / "state" / "runs"
        for variant, extra in VARIANTS.items():
            before = set(runs.glob("smoke-*")) if runs.exists() else set()
            begin, wall = time.perf_counter(), time.time()
            subprocess.run([*MEDFED, "run", "experiment=smoke", "federation.num_sites=3",
                            f"federation.num_rounds={rounds}", *extra,
                            "--superlink", f"localhost:{port}",
                            "--root-cert", str(certs / "ca.pem"), "--flwr-home",
                            str(root / "cli"), "--wait-sites", "3"],
                           env=_env(), check=True, stdout=open(root / f"run-{variant}.log", "w"),
                           stderr=subprocess.STDOUT, timeout=1800)
            results[variant] = (round_seconds(runs, before), time.perf_counter() - begin)
            windows[variant] = (wall, time.time())
        return results | ({f"{v}_window": w for v, w in windows.items()} if trace else {})
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _mean(xs: list[float]) -> float:
    return statistics.mean(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--patients", type=int, default=12)
    parser.add_argument("--trace", type=Path, metavar="DIR",
                        help="trace every hop of the deployed messages (protocol.hoptrace) into "
                             "DIR/trace-<state>.jsonl and add the per-hop timeline to the "
                             "results (timeline key)")
    args = parser.parse_args(argv)
    from medfed.synth.sites import synthesize

    load_before = os.getloadavg()
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
        for old in args.trace.glob("trace-*.jsonl"):
            old.unlink()
    with tempfile.TemporaryDirectory(prefix="medfed-bench-deploy-") as tmp:
        tmp = Path(tmp)
        synthesize(tmp / "data", n_sites=3, seed=3, patients=args.patients)
        sim = {v: simulate(tmp / "data", tmp / f"sim-{v}", args.rounds, extra)
               for v, extra in VARIANTS.items()}
        deps = {state: deploy(tmp / "data", tmp / f"deploy-{state}", args.rounds, state,
                              trace=args.trace / f"trace-{state}.jsonl" if args.trace else None)
                for state in LINK_STATES}
        timelines = {}
        if args.trace:
            for state in LINK_STATES:
                lines = deploy_timeline.load(args.trace / f"trace-{state}.jsonl")
                for variant in VARIANTS:
                    lo, hi = deps[state][f"{variant}_window"]
                    window = [x for x in lines if lo <= x["t"] <= hi]
                    timelines[f"{variant}_{state}"] = {
                        "hops": deploy_timeline.summarize(window),
                        "superlink_requests": deploy_timeline.superlink_requests(window)}
                    print(f"--- {variant}, link state {state}\n"
                          + deploy_timeline.format_table(timelines[f"{variant}_{state}"]["hops"]))
    load_after = os.getloadavg()
    payload: dict = {}
    for state, dep in deps.items():
        for variant in VARIANTS:
            (d, d_total), (s_, s_total) = dep[variant], sim[variant]
            suffix = ("" if variant == "plain" else f"_{variant}") + LINK_STATES[state]
            payload[f"round_overhead_ratio{suffix}"] = round(_mean(d[1:]) / _mean(s_[1:]), 2)
            payload[f"first_round_ratio{suffix}"] = round(d[0] / s_[0], 2)
            payload[f"all_rounds_ratio{suffix}"] = round(_mean(d) / _mean(s_), 2)
            payload[f"deployment_round_seconds{suffix}"] = [round(x, 2) for x in d]
            payload[f"deployment_total_seconds{suffix}"] = round(d_total, 1)
            if not LINK_STATES[state]:
                payload[f"simulation_round_seconds{suffix}"] = [round(x, 2) for x in s_]
                payload[f"simulation_total_seconds{suffix}"] = round(s_total, 1)
    if timelines:
        payload["timeline"] = timelines
    payload |= {
        "goal": "round_overhead_ratio <= 1.5, round_overhead_ratio_secagg <= 2.0",
        "experiment": "smoke", "sites": 3, "rounds": args.rounds,
        "patients_per_site": args.patients,
        "load_average_1min_before_after": [round(load_before[0], 1), round(load_after[0], 1)],
        "note": "round/wall_seconds from the ServerApp's MLflow run (train + evaluate + model "
                "registration). round_overhead_ratio: mean of rounds 2..n, deployment / "
                "simulation; first_round_ratio apart (simulation: Ray start-up and imports; "
                "deployment: first read of the sites' data, the runners are started with the "
                "sites); all_rounds_ratio: every round, as this figure was first measured. "
                "Deployment: TLS + SuperNode auth on loopback, one long-lived runner per site "
                "(medfed.deploy.runner --serve), SuperNode idle poll 0.5 s (medfed site "
                "--poll-interval) and its wait for the runner's reply 0.05 s (Flower: 0.5 s), "
                "launcher claim poll 0.2 s, the ServerApp's reply poll from one ask to "
                "the next (server.prompt_grid; Flower's HttpGrid: 3 s after each pull), a "
                "model's tensors as one byte array per message (protocol.packing), missing "
                "message objects retried after 0.05-0.5 s (Flower: 1, 2, 4 s) at the "
                "SuperNode, the runner and the ServerApp. "
                "The secagg variant runs on "
                "the same federation right after the plain one. Totals include process "
                "start-up (Ray / flwr run). Session 16: for 3 s after a reply a site polls "
                "every 0.1 s (SuperNode) / 0.05 s (launcher claim) (medfed.deploy.follow), the "
                "ServerApp's reply poll is 0.1 s; every figure is measured twice, with the "
                "coordinator's Flower state in sqlite (medfed server default, headline keys) "
                "and in memory (medfed server --link-state memory, *_memory_state keys), one "
                "federation each, against the same simulated runs."}
    path = write_result("deploy", payload)
    plain_d, plain_s = deps["sqlite"]["plain"][0], sim["plain"][0]
    sec_d, sec_s = deps["sqlite"]["secagg"][0], sim["secagg"][0]
    mem_d, mem_sec_d = deps["memory"]["plain"][0], deps["memory"]["secagg"][0]
    update_results_md("deploy", (
        f"| deploy | round overhead deployment / simulation (rounds 2–{args.rounds}): "
        f"{payload['round_overhead_ratio']:.2f}× plain, "
        f"{payload['round_overhead_ratio_secagg']:.2f}× SecAgg+ | mean round "
        f"{_mean(plain_d[1:]):.1f}s vs {_mean(plain_s[1:]):.1f}s plain, "
        f"{_mean(sec_d[1:]):.1f}s vs {_mean(sec_s[1:]):.1f}s SecAgg+ (deployment: "
        f"SuperLink+TLS+node auth, 3 SuperNodes on loopback, one long-lived runner per site); "
        f"with `--link-state memory`: "
        f"{payload['round_overhead_ratio_memory_state']:.2f}× plain, "
        f"{payload['round_overhead_ratio_secagg_memory_state']:.2f}× SecAgg+ (mean round "
        f"{_mean(mem_d[1:]):.1f}s, {_mean(mem_sec_d[1:]):.1f}s); "
        f"first round {plain_d[0]:.1f}s vs {plain_s[0]:.1f}s; smoke, 3 sites × "
        f"{args.patients} patients, {args.rounds} rounds | `results/deploy.json` |"))
    print(f"round overhead ratio {payload['round_overhead_ratio']:.2f} plain, "
          f"{payload['round_overhead_ratio_secagg']:.2f} secagg (in-memory link state: "
          f"{payload['round_overhead_ratio_memory_state']:.2f}, "
          f"{payload['round_overhead_ratio_secagg_memory_state']:.2f}); wrote {path}")


if __name__ == "__main__":
    main()
