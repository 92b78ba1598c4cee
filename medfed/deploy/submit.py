"""Submit an experiment to a running coordinator: ``medfed run experiment=... [overrides]``.

The overrides are composed and validated here first (an unknown key fails in seconds, before
anything is sent), a tracking server named on the command line must answer, then ``flwr run``
submits the app (``[tool.flwr.app]`` in pyproject.toml) over TLS with run config
``experiment`` and ``overrides``; the ServerApp composes the same config on the coordinator and
runs its preflight (``server/preflight.py``) before round 1. Progress is streamed; the run's
final status decides the exit code.

``--dry-run`` submits the same app with run config ``preflight-only``: its ServerApp runs the
preflight (tracking store, every connected site's declared policy) and stops before anything
trains or is written; the sites answer one policy query each. Only the preflight's lines are
shown: one per problem (exit 2) or ``preflight ok: ...`` (exit 0), after one per warning (what
it cannot refuse: a DP plan above the epsilon a site has left, a site that did not answer).

Of a real run's stream ``medfed run`` shows what ``medfed simulate`` shows (the per-round
table, site failures by site id, the summary and where the results are); Flower's own lines
only with ``--verbose`` (``stream.py``).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from protocol import wire

from .coordinator import CONNECTION, flwr_cli, write_connection
from .preflight import DeployError, check_superlink, require_file
from .process import ANSI, flower_bin, flower_env
from .stream import StreamFilter

log = logging.getLogger("medfed.deploy")
STREAM_LOG = logging.getLogger("medfed.run")     # the deployed ServerApp's lines, re-logged

RUN_STARTED = re.compile(r"Successfully started run (\d+)")
# the ServerApp's preflight verdict, problems and warnings (their prefixes: protocol.wire)
PREFLIGHT_LINE = re.compile("((?:" + "|".join(map(re.escape, (
    wire.PREFLIGHT_OK, wire.PREFLIGHT_PROBLEM, wire.PREFLIGHT_WARNING))) + ").*)$")


@dataclass(frozen=True)
class RunRequest:
    overrides: list[str]
    superlink: str
    root_cert: Path
    app_dir: Path
    flwr_home: Path
    wait_sites: int = 0               # wait until this many sites are online before submitting
    wait_timeout: float = 300.0
    extra_run_config: dict[str, str] = field(default_factory=dict)
    dry_run: bool = False             # the preflight only (run config preflight-only)
    verbose: bool = False             # also show Flower's own lines of the stream


def split_overrides(overrides: list[str]) -> tuple[str, str]:
    """(experiment name, the other overrides as one string) for the run config."""
    experiment, rest = "demo", []
    for item in overrides:
        if item.startswith("experiment="):
            experiment = item.split("=", 1)[1]
        else:
            rest.append(item)
    joined = " ".join(rest)
    if "'" in joined or "'" in experiment:
        raise DeployError("overrides cannot contain single quotes (they travel as a TOML "
                          "literal string)")
    return experiment, joined


def validate(overrides: list[str]):
    """Compose the experiment as the ServerApp will: bad overrides fail here, in seconds."""
    from server.config import load_experiment

    return load_experiment(overrides if any(o.startswith("experiment=") for o in overrides)
                           else ["experiment=demo", *overrides])


def check_tracking(cfg, overrides: list[str]) -> None:
    """A tracking store named on the command line (``tracking=...``, ``tracking.uri=...``)
    must answer before the run is submitted (``medfed run`` runs on the coordinator's machine;
    the ServerApp checks again, first thing)."""
    from server.tracking_store import check_tracking_store

    if any(o.lstrip("+~").startswith("tracking") for o in overrides):
        if problem := check_tracking_store(cfg.tracking.uri):
            raise DeployError(problem)


def online_sites(flwr_home: Path) -> int:
    answer = flwr_cli(["supernode", "list", CONNECTION], flwr_home)
    return sum(1 for n in answer.get("nodes", []) if n.get("status") == "online")


def wait_for_sites(request: RunRequest) -> None:
    deadline = time.monotonic() + request.wait_timeout
    while (online := online_sites(request.flwr_home)) < request.wait_sites:
        if time.monotonic() >= deadline:
            raise DeployError(f"only {online} of {request.wait_sites} sites online after "
                              f"{request.wait_timeout:g} s (--wait-sites)")
        time.sleep(1.0)
    log.info("%d sites online", online)


def run_status(run_id: str, flwr_home: Path) -> dict:
    answer = flwr_cli(["ls", CONNECTION, "--run-id", run_id], flwr_home)
    runs = answer.get("runs") or [{}]
    return runs[0]


def submit(request: RunRequest, *, echo=print) -> int:
    """Submit, stream the ServerApp's log, return 0 when the run completed."""
    require_file(request.app_dir / "pyproject.toml", "app (pyproject.toml)")
    check_tracking(validate(request.overrides), request.overrides)
    check_superlink(request.superlink, request.root_cert)
    write_connection(request.flwr_home, request.superlink, request.root_cert)
    if request.wait_sites:
        wait_for_sites(request)
    experiment, overrides = split_overrides(request.overrides)
    config = {wire.RUN_EXPERIMENT: experiment, wire.RUN_OVERRIDES: overrides,
              **request.extra_run_config,
              **({wire.RUN_PREFLIGHT_ONLY: "true"} if request.dry_run else {})}
    run_config = " ".join(f"{k}='{v}'" for k, v in config.items())
    cmd = [flower_bin("flwr"), "run", str(request.app_dir), CONNECTION, "--stream",
           "--run-config", run_config]
    log.info("%s experiment %s (%s) to %s", "preflight of" if request.dry_run else "submitting",
             experiment, overrides or "no overrides", request.superlink)
    run_id, preflight = None, []
    view = StreamFilter(verbose=request.verbose)
    proc = subprocess.Popen(cmd, env=flower_env(request.flwr_home), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = ANSI.sub("", raw.rstrip())
        if (m := PREFLIGHT_LINE.search(line)) and m.group(1) not in preflight:   # either copy
            preflight.append(m.group(1))
            if request.dry_run:
                echo(m.group(1))
        if (m := RUN_STARTED.search(line)) and run_id is None:
            run_id = m.group(1)
            if not request.dry_run:
                log.info("run %s started; its log follows%s", run_id,
                         "" if request.verbose else " (Flower's own lines with --verbose)")
        if (shown := view(raw)) is not None and not request.dry_run:
            STREAM_LOG.log(*shown)
    code = proc.wait()
    if run_id is None:
        for text in view.hidden:          # Flower's reason (unless --verbose showed it)
            echo(text)
        raise DeployError(f"`flwr run` did not start a run (exit {code}); see the output above")
    status = run_status(run_id, request.flwr_home)
    state = str(status.get("status", "unknown"))
    if request.dry_run:
        return dry_run_outcome(run_id, state, preflight, str(status.get("status-details", "")),
                               echo=echo)
    echo(json.dumps({"run-id": run_id, "status": state,
                     "elapsed-seconds": status.get("elapsed")}))
    if state != "finished:completed":
        raise RuntimeError(f"run {run_id} ended as {state}: "
                           f"{status.get('status-details', '')}")
    return 0


def dry_run_outcome(run_id: str, state: str, preflight: list[str], details: str = "", *,
                    echo=print) -> int:
    """0: the preflight passed; 2: it named problems (printed, one a line). The stream of a
    run that ends within seconds may stop before the ServerApp's last lines: the problems are
    then read from the run's status details (the ``PreflightError`` it ended with)."""
    from server.preflight import PROBLEM_SEPARATOR, REFUSED

    problems = [line for line in preflight if line.startswith(wire.PREFLIGHT_PROBLEM)]
    if not problems and REFUSED in details:
        problems = [f"{wire.PREFLIGHT_PROBLEM}{p.strip()}"
                    for p in details.split(REFUSED, 1)[1].split(PROBLEM_SEPARATOR)]
        for line in problems:
            echo(line)
    if problems:
        return 2
    if state == "finished:completed":
        if not any(line.startswith(wire.PREFLIGHT_OK) for line in preflight):
            echo(f"preflight ok (run {run_id}; the sites it asked are in the coordinator's log)")
        return 0
    raise RuntimeError(f"the preflight run {run_id} ended as {state} without a preflight "
                       f"result: {details or 'see the coordinator log'}")
