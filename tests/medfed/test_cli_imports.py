"""``medfed --help`` and argument errors answer without importing the heavy stack.

Structural checks in a fresh interpreter (which modules got imported), not timings; the wall
times are measured by ``bench/cli.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medfed.cli import Handler, build_parser

ROOT = Path(__file__).resolve().parents[2]

# What a command pays ~10 s for on the 2-core box; none of it may load before parsing is done.
HEAVY = ("torch", "flwr", "mlflow", "hydra", "omegaconf", "ray", "pydicom", "monai",
         "transformers", "opacus", "numpy",
         "server", "client", "models", "strategies", "protocol")

PROBE = """
import json, sys
argv = json.loads(sys.argv[1])
import medfed.cli
code = None
if argv is not None:
    try:
        code = medfed.cli.main(argv)
    except SystemExit as exit:          # argparse: --help exits 0, a bad argument exits 2
        code = exit.code
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def _probe(argv: list[str] | None) -> tuple[int | None, list[str], str]:
    """Run ``medfed.cli.main(argv)`` (or only the import) in a fresh interpreter."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv), json.dumps(HEAVY)],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    report = json.loads(result.stderr.strip().splitlines()[-1])
    return report["code"], report["heavy"], result.stdout + result.stderr


def test_importing_the_cli_imports_nothing_heavy():
    _, heavy, _ = _probe(None)
    assert heavy == []


@pytest.mark.parametrize("argv, code, needle", [
    (["--help"], 0, "register-site"),
    (["simulate", "--help"], 0, "experiment=demo"),
    (["deploy"], 2, "invalid choice"),                              # no such command
    (["certs", "--out", "x"], 2, "--server-name"),                  # a required flag missing
    (["site", "--site-id", "a", "--data-dir", "d", "--superlink", "x:1", "--root-cert", "c",
      "--auth-key", "k", "--role", "observer"], 2, "invalid choice"),
    (["audit", "--site-dir", "s", "--epsilon", "4", "--no-noise"], 2, "not allowed with"),
])
def test_help_and_argument_errors_import_nothing_heavy(argv, code, needle):
    got, heavy, output = _probe(argv)
    assert got == code and needle in output
    assert heavy == [], f"medfed {' '.join(argv)} imported {heavy}"


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_names_a_handler_that_exists():
    commands = _commands()
    assert len(commands) == 18   # + "site keygen", "app digest", convert-weights, predict, sites,
    #                              feature-stats
    for name, parser in commands.items():
        handler = parser.get_default("func")
        assert isinstance(handler, Handler), name
        module = importlib.import_module(f"medfed.commands.{handler.module}")
        assert callable(getattr(module, handler.function)), name
