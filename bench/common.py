"""Shared bench helpers: commit id, machine description, results files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=BENCH_DIR).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}"


def write_result(name: str, payload: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    partial = path.with_suffix(".json.partial")     # a kill mid-write keeps the old file
    partial.write_text(json.dumps(payload | {"commit": commit(), "machine": machine()},
                                  indent=2) + "\n")
    partial.replace(path)
    return path


def update_results_md(key: str, row: str) -> None:
    """Replace (or append) the table row whose first cell is ``key`` in bench/RESULTS.md."""
    path = BENCH_DIR / "RESULTS.md"
    lines = path.read_text().splitlines() if path.exists() else []
    prefix = f"| {key} |"
    lines = [row if line.startswith(prefix) else line for line in lines]
    if row not in lines:
        lines.append(row)
    path.write_text("\n".join(lines) + "\n")


def mode_ratio(modes: dict, a: str, b: str, key: str) -> float | None:
    """``modes[a][key] / modes[b][key]``, or None where either is missing (a mode that
    failed) or the denominator is 0."""
    x, y = modes.get(a, {}).get(key), modes.get(b, {}).get(key)
    return x / y if x is not None and y else None
