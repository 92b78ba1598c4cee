"""Per-round overhead of the deployment engine vs simulation, same tiny experiment, one run.

Both sides run ``experiment=smoke`` with three synthetic sites and the same number of rounds on
this machine: once with ``medfed simulate`` (Flower's simulation engine on Ray), once as a real
deployment on loopback (``medfed server`` with TLS and SuperNode authentication, three
``medfed site`` daemons, ``medfed run``). The figure is the mean ``round/wall_seconds`` that
the ServerApp logs to MLflow (train + evaluate + model registration), deployment / simulation.

    python -m bench.deploy [--rounds 3]
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

from .common import update_results_md, write_result

MEDFED = [sys.executable, "-m", "medfed.cli"]
SITES = ("a", "b", "c")


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", FLWR_TELEMETRY_ENABLED="0",
                FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_seconds(runs_dir: Path) -> list[float]:
    """``round/wall_seconds`` per round from the (single) run's sqlite MLflow store."""
    (db,) = list(runs_dir.glob("smoke-*/mlflow.db"))
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT step, value FROM metrics WHERE key='round/wall_seconds' "
                           "ORDER BY step").fetchall()
    return [v for _, v in rows]


def simulate(data: Path, runs: Path, rounds: int) -> tuple[list[float], float]:
    start = time.perf_counter()
    subprocess.run([*MEDFED, "simulate", "experiment=smoke", "federation.num_sites=3",
                    f"federation.num_rounds={rounds}", f"data.root={data}",
                    f"runs_dir={runs}"], env=_env(), check=True, stdout=subprocess.DEVNULL)
    return round_seconds(runs), time.perf_counter() - start


def deploy(data: Path, root: Path, rounds: int) -> tuple[list[float], float]:
    from medfed.certs import write_certs

    certs = root / "certs"
    write_certs(certs, server_name="localhost", sites=list(SITES))
    port = _port()
    procs: list[subprocess.Popen] = []

    def start(name: str, args: list[str]) -> subprocess.Popen:
        log = open(root / f"{name}.log", "w")
        procs.append(subprocess.Popen([*MEDFED, *args], env=_env(), stdout=log,
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
                         "--host", "127.0.0.1", "--port", str(port)])
        wait_for("server", "site c: public key")
        for i, site in enumerate(SITES):
            start(site, ["site", "--site-id", site, "--data-dir", str(data / f"site-{i}"),
                         "--superlink", f"localhost:{port}", "--root-cert", str(certs / "ca.pem"),
                         "--auth-key", str(certs / "sites" / site / "auth.key"),
                         "--state-dir", str(root / f"node-{site}"),
                         "--runtime-port", str(_port())])
        for site in SITES:
            wait_for(site, "SuperNode ID:")
        begin = time.perf_counter()
        subprocess.run([*MEDFED, "run", "experiment=smoke", "federation.num_sites=3",
                        f"federation.num_rounds={rounds}", "--superlink", f"localhost:{port}",
                        "--root-cert", str(certs / "ca.pem"), "--flwr-home",
                        str(root / "cli"), "--wait-sites", "3"],
                       env=_env(), check=True, stdout=subprocess.DEVNULL, timeout=1800)
        return round_seconds(root / "state" / "runs"), time.perf_counter() - begin
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=12)
    args = parser.parse_args(argv)
    from medfed.synth.sites import synthesize

    with tempfile.TemporaryDirectory(prefix="medfed-bench-deploy-") as tmp:
        tmp = Path(tmp)
        synthesize(tmp / "data", n_sites=3, seed=3, patients=args.patients)
        sim, sim_total = simulate(tmp / "data", tmp / "sim-runs", args.rounds)
        dep, dep_total = deploy(tmp / "data", tmp / "deploy", args.rounds)
    sim_mean, dep_mean = statistics.mean(sim), statistics.mean(dep)
    ratio = dep_mean / sim_mean
    payload = {"round_overhead_ratio": round(ratio, 2),
               "deployment_round_seconds": [round(x, 2) for x in dep],
               "simulation_round_seconds": [round(x, 2) for x in sim],
               "deployment_total_seconds": round(dep_total, 1),
               "simulation_total_seconds": round(sim_total, 1),
               "experiment": "smoke", "sites": 3, "rounds": args.rounds,
               "patients_per_site": args.patients,
               "note": "round/wall_seconds from the ServerApp's MLflow run (train + evaluate + "
                       "model registration); deployment: TLS + SuperNode auth on loopback, one "
                       "fresh ClientApp process per message (Flower subprocess isolation); "
                       "totals include process start-up (Ray / flwr run)"}
    path = write_result("deploy", payload)
    update_results_md("deploy", (
        f"| deploy | round overhead deployment / simulation: {ratio:.2f}× | mean round "
        f"{dep_mean:.1f}s (deployment: SuperLink+TLS+node auth, 3 SuperNodes on loopback) vs "
        f"{sim_mean:.1f}s (simulation); smoke, 3 sites × {args.patients} patients, "
        f"{args.rounds} rounds | `results/deploy.json` |"))
    print(f"round overhead ratio {ratio:.2f} (deployment {dep_mean:.1f}s, simulation "
          f"{sim_mean:.1f}s per round); wrote {path}")


if __name__ == "__main__":
    main()
