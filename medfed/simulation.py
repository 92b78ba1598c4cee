"""Run a whole federation on this machine with Flower's simulation engine (Ray).

This is the only place besides the CLI that sees both halves: it wires the ServerApp and
the ClientApp together, one CPU and one torch thread per simulated site.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from client.app import make_client_app
from client.runtime import SiteDataCache, simulation_cache_bytes
from protocol import wire
from server.app import make_server_app
from server.config import ConfigError, ExperimentConfig
from server.federation import new_run_dir

from .logs import ray_console_environment
from .offline import offline_env

log = logging.getLogger("medfed")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def offline_environment(flwr_home: Path | None = None) -> None:
    """No telemetry, no update checks, no hub, one thread per training process."""
    # Ray actors train side by side: one thread each, whatever the caller's setting.
    os.environ.update(offline_env(dict(os.environ), OMP_NUM_THREADS="1"))
    os.environ.setdefault("FLWR_HOME", str(flwr_home or PROJECT_ROOT / ".flwr"))
    for name, value in ray_console_environment().items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")   # our table says what it registered


def check_sites(cfg: ExperimentConfig) -> Path:
    """Fail before anything is written if a simulated site's directory is missing or empty
    (no DICOM files, and no ``manifest.csv`` of a NIfTI/NRRD research export)."""
    from client.data.manifest_site import has_manifest

    root = Path(cfg.data.root)
    if not root.is_dir():
        raise ConfigError(f"data.root={root} does not exist; create sites with "
                          f"`medfed synth --sites {cfg.federation.num_sites} --out {root}`")
    for i in range(cfg.federation.num_sites):
        dicom = root / f"site-{i}" / "dicom"
        if (not dicom.is_dir() or not any(dicom.iterdir())) and \
                not has_manifest(root / f"site-{i}"):
            raise ConfigError(f"site-{i} under data.root={root} is missing or has neither DICOM "
                              f"files (dicom/) nor a research export's manifest.csv "
                              f"(federation.num_sites={cfg.federation.num_sites})")
    external = root / wire.ROLE_EXTERNAL / "dicom"
    if cfg.federation.external_sites and (not external.is_dir() or not any(external.iterdir())) \
            and not has_manifest(external.parent):
        raise ConfigError(f"federation.external_sites=true needs an external site under "
                          f"data.root={root} (external/dicom; `medfed synth --external`)")
    return root.resolve()


def write_site_node_config(cfg: ExperimentConfig, data_root: Path) -> None:
    """Stand in for each simulated site operator's ``--node-config`` (Flower's simulation
    gives nodes no config of their own): ``<site>/node-config.toml``, or none at all."""
    settings = dict(cfg.federation.site_node_config)
    if cfg.model.foundation_dir:        # one machine: every site keeps the same encoders
        settings.setdefault(wire.NODE_FOUNDATION_DIR,
                            str(Path(cfg.model.foundation_dir).resolve()))
    for i in range(cfg.federation.num_sites):
        path = data_root / f"site-{i}" / wire.NODE_CONFIG_FILE
        if not settings:
            path.unlink(missing_ok=True)
            continue
        lines = [f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in sorted(settings.items())]
        path.write_text("# written by medfed simulate from federation.site_node_config\n"
                        + "\n".join(lines) + "\n")
    external = data_root / wire.ROLE_EXTERNAL
    if cfg.federation.external_sites:       # its operator's choice: evaluate, never train
        foundation = settings.get(wire.NODE_FOUNDATION_DIR)
        (external / wire.NODE_CONFIG_FILE).write_text(
            "# written by medfed simulate (federation.external_sites)\n"
            f"{json.dumps(wire.NODE_ROLE)} = {json.dumps(wire.ROLE_EXTERNAL)}\n"
            + (f"{json.dumps(wire.NODE_FOUNDATION_DIR)} = {_toml_value(foundation)}\n"
               if foundation else ""))
    elif external.is_dir():
        (external / wire.NODE_CONFIG_FILE).unlink(missing_ok=True)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def simulate(cfg: ExperimentConfig, *, run_dir: Path | None = None, client_mods=(),
             observers: tuple = ()) -> Path:
    """Run the experiment as a simulated federation; returns the run directory."""
    import importlib

    import torch
    from flwr.simulation import run_simulation

    from .logs import route_dependency_consoles

    # Flower's deprecation of run_simulation and MLflow's "already exists" lines: run log only
    # (MLflow imported here so that its printing can be routed before the ServerApp uses it).
    importlib.import_module("mlflow.utils.logging_utils")
    route_dependency_consoles()
    offline_environment()
    data_root = check_sites(cfg)
    write_site_node_config(cfg, data_root)
    run_dir = run_dir or new_run_dir(cfg)
    torch.set_num_threads(1)
    fed = cfg.federation
    backend = {
        "client_resources": {"num_cpus": fed.cpus_per_site, "num_gpus": fed.gpus_per_site},
        "init_args": {"include_dashboard": False, "num_cpus": max(os.cpu_count() or 1, 1),
                      "logging_level": "ERROR"},
    }
    # The sites' decoded studies, shared by the Ray actors that serve them: a temp folder of
    # this run's, removed when the simulation ends (client.runtime.SiteDataCache).
    sites_cache = SiteDataCache.for_simulation(simulation_cache_bytes())
    try:
        run_simulation(
            server_app=make_server_app(cfg, run_dir, observers),
            client_app=make_client_app(sim_data_root=data_root, sim_train_sites=fed.num_sites,
                                       mods=client_mods, data_cache=sites_cache),
            num_supernodes=fed.num_sites + int(fed.external_sites),
            backend_config=backend,
        )
    finally:
        sites_cache.close()
    return run_dir
