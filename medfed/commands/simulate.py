"""``medfed simulate``: a whole federation on this machine (Flower simulation engine)."""

from __future__ import annotations

import argparse
import logging

from medfed.logs import setup_logging

log = logging.getLogger("medfed")


def simulate(args: argparse.Namespace) -> int:
    """Compose the experiment from Hydra overrides, check the sites, run (the ServerApp
    ends with where the results are and the command that opens them)."""
    from server.config import load_experiment

    # Compose first: a bad override is refused before the simulation stack (Ray, the apps)
    # is imported, and before a run directory exists.
    cfg = load_experiment(args.overrides)

    from medfed.simulation import check_sites, simulate as run_federation
    from server.federation import RUN_LOG, abandon_run_dir, new_run_dir

    check_sites(cfg)
    run_dir = new_run_dir(cfg)
    setup_logging(args.verbose, run_dir / RUN_LOG)
    log.info("run directory: %s", run_dir)
    try:
        run_federation(cfg, run_dir=run_dir)
    except BaseException as err:     # Ctrl-C too: the folder must say what happened
        reason = f"{type(err).__name__}: {_first_line(err)}"
        if abandon_run_dir(run_dir, reason):
            log.info("nothing was written; removed the run directory %s", run_dir)
        else:
            log.info("run directory %s kept, marked FAILED (%s)", run_dir, reason)
        raise
    return 0


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "interrupted"
