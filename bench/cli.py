"""Wall time of ``medfed --help`` and of a refused bad Hydra override, this tree vs the
monolithic ``medfed/cli.py`` it replaced, side by side in one run.

Each figure is the median of ``--repeats`` fresh ``python -m medfed.cli`` processes, the two
variants interleaved so that load from other processes falls on both alike. The baseline is
the old module's source (``git show BASELINE:medfed/cli.py``) loaded as ``medfed._cli_baseline``
in this tree, so both sides import the same dependencies; only the CLI module differs. The goal
is under 1 s for each; the bad override needs Hydra and ``server.config``, so its figure is
whatever importing those costs.

    python -m bench.cli [--repeats 5] [--baseline 53442d7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import BENCH_DIR, update_results_md, write_result

ROOT = BENCH_DIR.parent
# The last commit with the monolithic medfed/cli.py (parser, 12 handlers, two logging setups).
BASELINE = "53442d7"
GOAL_SECONDS = 1.0
COMMANDS = {"help": ["--help"], "bad_override": ["simulate", "strategy=fedavgx"]}
EXPECTED = {"help": (0, "register-site"), "bad_override": (2, "strategy/fedavgx")}

BASELINE_MAIN = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("medfed._cli_baseline", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
sys.exit(module.main(sys.argv[2:]))
"""


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", FLWR_TELEMETRY_ENABLED="0",
                FLWR_DISABLE_UPDATE_CHECK="1", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def timed(cmd: list[str], name: str) -> float:
    """Seconds for one fresh process; refuses a wrong exit code or output (a fast crash)."""
    code, needle = EXPECTED[name]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env())
    seconds = time.perf_counter() - start
    if result.returncode != code or needle not in result.stdout + result.stderr:
        raise RuntimeError(f"{' '.join(cmd[-2:])}: exit {result.returncode}, expected {code} "
                           f"and {needle!r}:\n{result.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", default=BASELINE, help="commit with the old medfed/cli.py")
    args = parser.parse_args()
    source = subprocess.run(["git", "show", f"{args.baseline}:medfed/cli.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    load_before = os.getloadavg()[0]
    samples: dict[str, dict[str, list[float]]] = {"new": {}, "old": {}}
    with tempfile.TemporaryDirectory(prefix="medfed-bench-cli-") as tmp:
        old_module = Path(tmp) / "cli_baseline.py"
        old_module.write_text(source)
        variants = {"new": [sys.executable, "-m", "medfed.cli"],
                    "old": [sys.executable, "-c", BASELINE_MAIN, str(old_module)]}
        floor = [timed_python() for _ in range(args.repeats)]
        for _ in range(args.repeats):
            for name, argv in COMMANDS.items():
                for variant, prefix in variants.items():
                    samples[variant].setdefault(name, []).append(timed([*prefix, *argv], name))
    load_after = os.getloadavg()[0]
    median = {v: {n: statistics.median(s) for n, s in per.items()} for v, per in samples.items()}
    new, old = median["new"], median["old"]
    cores = os.cpu_count() or 1
    loaded = max(load_before, load_after) > 0.5 * cores
    conditions = (f"under load: 1-min load average {load_before:.1f} -> {load_after:.1f} on "
                  f"{cores} cores (other engineers' jobs)" if loaded else
                  f"quiet machine: load {load_before:.1f} -> {load_after:.1f} on {cores} cores")
    payload = {
        "help_seconds": new["help"],
        "bad_override_seconds": new["bad_override"],
        "baseline_help_seconds": old["help"],
        "baseline_bad_override_seconds": old["bad_override"],
        "help_speedup": old["help"] / new["help"],
        "bad_override_speedup": old["bad_override"] / new["bad_override"],
        "python_startup_seconds": statistics.median(floor),
        "goal_seconds": GOAL_SECONDS,
        "help_goal_met": new["help"] < GOAL_SECONDS,
        "bad_override_goal_met": new["bad_override"] < GOAL_SECONDS,
        "baseline": args.baseline,
        "repeats": args.repeats,
        "conditions": conditions,
        "definition": "median wall seconds of a fresh `python -m medfed.cli ARGS` process, "
                      "this tree vs the old medfed/cli.py source loaded in the same tree",
        "samples": samples,
    }
    path = write_result("cli", payload)
    for name in COMMANDS:
        print(f"medfed {' '.join(COMMANDS[name]):28s} {new[name]:6.2f}s  (old cli.py "
              f"{old[name]:6.2f}s, {old[name] / new[name]:5.1f}x; goal < {GOAL_SECONDS:g}s: "
              f"{'met' if new[name] < GOAL_SECONDS else 'NOT met'})")
    print(f"python start-up alone {payload['python_startup_seconds']:.2f}s; {conditions}")
    _ensure_section()
    update_results_md(
        "cli",
        f"| cli | `medfed --help` {new['help']:.2f}s (was {old['help']:.2f}s, "
        f"{payload['help_speedup']:.0f}x; goal < 1 s "
        f"{'met' if payload['help_goal_met'] else 'NOT met'}); bad override "
        f"{new['bad_override']:.2f}s (was {old['bad_override']:.2f}s; goal "
        f"{'met' if payload['bad_override_goal_met'] else 'NOT met'}: the refusal imports "
        f"`server.config`) | median of {args.repeats} fresh processes, old `medfed/cli.py` from "
        f"{args.baseline} side by side; Python start-up {payload['python_startup_seconds']:.2f}s; "
        f"{conditions} | `results/{path.name}` |")
    print(f"wrote {path}")


def timed_python() -> float:
    """Seconds for a bare interpreter: the floor under any CLI figure."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=_env())
    return time.perf_counter() - start


def _ensure_section() -> None:
    """The cli row gets its own table, so it is not appended under another section's notes."""
    path = BENCH_DIR / "RESULTS.md"
    text = path.read_text()
    if "| cli |" not in text:
        path.write_text(text.rstrip("\n") + "\n\n## CLI start-up\n\n`python -m bench.cli`: "
                        "`medfed --help` and a refused bad override, this tree vs the old "
                        "monolithic `medfed/cli.py`, side by side in one run.\n\n"
                        "| benchmark | figure | context | source |\n|---|---|---|---|\n")


if __name__ == "__main__":
    main()
