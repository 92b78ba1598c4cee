"""The deployment guide as a tested script: the command blocks that README.md and
deploy/README.md mark with ``<!-- guide: loopback -->`` are the same sequence, and that sequence
runs as written on loopback in a fresh folder - synthetic hospitals, certificates, ``medfed
server``, the MLflow server step, three ``medfed site`` daemons with the guide's DP budget,
``medfed sites``, ``medfed run --dry-run`` and ``medfed run experiment=dpsgd`` - and its results
are in MLflow.

Substituted, and nothing else: every port (a free loopback port each), the folder (a temp
dir), and ``federation.num_rounds`` of the dry run and the run (the guide's 3 rounds cost
about a minute each here; CI runs 1). Commands the guide leaves running (``&``) are started in the background, each in
its own process group, waited for with bounded waits (what the guide tells the reader to wait
for) and killed at the end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from medfed.simulation import PROJECT_ROOT

from .conftest import child_env, free_port

GUIDES = (PROJECT_ROOT / "README.md", PROJECT_ROOT / "deploy" / "README.md")
MARK = "<!-- guide: loopback -->"
BLOCK = re.compile(re.escape(MARK) + r"\s*\n```bash\n(.*?)```", re.S)
PORT = re.compile(r"(--port |--runtime-port |localhost:|127\.0\.0\.1:)(\d{2,5})\b")
ROUNDS = re.compile(r"\bfederation\.num_rounds=\d+")
CI_ROUNDS = 1
HANG_GUARD = 600          # seconds; a bound on a stuck step, never a timing assertion


def guide_commands(markdown: str) -> list[str]:
    """The marked blocks' commands in order: continuation lines joined, whitespace runs
    collapsed, comment and blank lines dropped."""
    commands = []
    for block in BLOCK.findall(markdown):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split())
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_and_deploy_guide_show_the_same_sequence():
    readme, deploy = (guide_commands(p.read_text()) for p in GUIDES)
    assert readme and readme == deploy
    # what the slow test below relies on: it waits for each of these and checks the results
    assert [c for c in readme if c.endswith("&")] and any("mlflow server" in c for c in readme)
    assert any(c.startswith("medfed run experiment=dpsgd") for c in readme)


# what a command left running needs up before it starts (a foreground command: everything)
NEEDS = {"server": (), "mlflow": (), "site": ("server",)}


def _kind(command: str) -> str:
    for kind, pattern in (("server", r"^medfed server "), ("mlflow", r"\bmlflow server "),
                          ("site", r"^medfed site --")):
        if re.search(pattern, command):
            return kind
    raise AssertionError(f"the guide leaves {command!r} running; this test does not know "
                         "what to wait for")


class Guide:
    """Runs the guide's commands in ``folder``; background ones as children (killed at the
    end by the ``children`` fixture), each waited for before a command that needs it."""

    def __init__(self, children, folder: Path, commands: list[str]):
        self.children, self.folder = children, folder
        self.sites = sum(_kind(c) == "site" for c in commands if c.endswith("&"))
        self.pending: list[tuple[str, str, str]] = []      # (kind, child name, command)
        self.outputs: dict[str, str] = {}

    def run(self, number: int, command: str) -> None:
        name = f"step-{number:02d}"
        if command.endswith("&"):
            kind = _kind(command)
            self.wait(NEEDS[kind].__contains__)     # a site needs the coordinator up, no more
            self.children.start(name, ["bash", "-c", command[:-1].strip()], cwd=self.folder)
            self.pending.append((kind, name, command))
            return
        self.wait(lambda k: True)
        done = subprocess.run(["bash", "-c", command], cwd=self.folder, capture_output=True,
                              text=True, env=child_env(), timeout=HANG_GUARD)
        self.outputs[command] = done.stdout + done.stderr
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    def wait(self, needed) -> None:
        for kind, name, command in [p for p in self.pending if needed(p[0])]:
            if kind == "server":
                self.children.wait_for(name, "public key registered", HANG_GUARD, self.sites)
            elif kind == "site":
                self.children.wait_for(name, "SuperNode ID:", HANG_GUARD)
            else:
                _wait_for_health(self.children, name, int(PORT.search(command).group(2)))
            self.pending.remove((kind, name, command))


def _wait_for_health(children, name: str, port: int) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert children.procs[name].poll() is None, children.log(name)[-3000:]
        assert time.monotonic() < deadline, f"{name}: no /health on {port}"
        time.sleep(0.5)


@pytest.mark.slow
def test_the_guide_runs_as_written_on_loopback(children, tmp_path, monkeypatch):
    commands = guide_commands(GUIDES[0].read_text())
    ports = {p: free_port() for _, p in PORT.findall(" ".join(commands))}
    commands = [PORT.sub(lambda m: m.group(1) + str(ports[m.group(2)]), c) for c in commands]
    commands = [ROUNDS.sub(f"federation.num_rounds={CI_ROUNDS}", c)
                if c.startswith("medfed run ") else c for c in commands]
    # "the environment active": this interpreter's medfed and mlflow, this tree's code
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    folder = tmp_path / "guide"
    folder.mkdir()
    guide = Guide(children, folder, commands)
    for number, command in enumerate(commands):
        guide.run(number, command)

    shown = {c.split(" tracking")[0]: out for c, out in guide.outputs.items()}
    rounds = f"experiment=dpsgd federation.num_rounds={CI_ROUNDS}"
    assert "preflight ok: 3 sites (site-a, site-b, site-c train)" in \
        shown[f"medfed run --dry-run {rounds}"]
    listed = next(out for c, out in guide.outputs.items() if c.startswith("medfed sites "))
    assert all(re.search(rf"{site}\s+online", listed) for site in ("site-a", "site-b", "site-c")), \
        listed
    ran = shown[f"medfed run {rounds}"]
    assert '"status": "finished:completed"' in ran, ran[-4000:]
    mlflow = next(f"http://127.0.0.1:{PORT.search(c).group(2)}" for c in commands
                  if "mlflow server" in c)
    assert f"results: MLflow tracking server {mlflow}" in ran, ran[-4000:]

    from mlflow import MlflowClient

    client = MlflowClient(mlflow)
    versions = client.search_model_versions("name='medfed-classifier'")
    assert sorted(int(v.tags["round"]) for v in versions) == list(range(1, CI_ROUNDS + 1))
    run = client.get_run(versions[0].tags["mlflow_run_id"])
    assert run.data.params["privacy.mechanism"] == "dp-sgd", run.data.params
    for site in ("site-a", "site-b", "site-c"):
        assert any(k.startswith(f"site/{site}/train/") for k in run.data.metrics), \
            sorted(run.data.metrics)
