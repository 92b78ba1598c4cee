"""Flower ServerApp: load the experiment, check it against the sites, hand over to the phase
runner."""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from protocol import wire

from .config import ExperimentConfig, load_experiment
from .federation import new_run_dir, run_experiment
from .preflight import PreflightError, run_preflight
from .prompt_grid import prompt_grid
from .stream_log import stream_logging

log = logging.getLogger("medfed.server")


def make_server_app(cfg: ExperimentConfig | None = None, run_dir: Path | None = None,
                    observers: tuple = ()) -> ServerApp:
    """ServerApp for a pre-composed experiment (``medfed simulate``) or, with no arguments,
    one that composes it from the run config (``flwr run . --run-config "overrides='...'"``).

    The preflight (``server/preflight.py``) runs first: a run it refuses creates no run
    folder and no MLflow run. With run config ``preflight-only = "true"`` (``medfed run
    --dry-run``) it is all that runs."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        grid = prompt_grid(grid)     # deployed: replies collected every 0.1 s (REPLY_POLL), not every 3 s
        experiment = cfg
        if experiment is None:
            overrides = str(context.run_config.get(wire.RUN_OVERRIDES, "")).split()
            name = str(context.run_config.get(wire.RUN_EXPERIMENT, "demo"))
            experiment = load_experiment([f"experiment={name}", *overrides])
            # A deployed ServerApp process, whose output Flower streams to `medfed run`: its
            # lines marked, so that `medfed run` shows them and hides Flower's own dump.
            stream_logging()
        try:
            report = run_preflight(grid, experiment)
        except PreflightError as err:     # one line each: `medfed run --dry-run` shows them
            for problem in err.problems:
                log.error("%s%s", wire.PREFLIGHT_PROBLEM, problem)
            raise
        log.info("%s", report.summary())
        if str(context.run_config.get(wire.RUN_PREFLIGHT_ONLY, "false")).lower() == "true":
            return
        run_experiment(grid, experiment, run_dir or new_run_dir(experiment), observers,
                       sites=report.sites)

    return app


app = make_server_app()
