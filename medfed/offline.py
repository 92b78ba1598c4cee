"""The environment every MedFed process runs in: offline, no telemetry, one thread.

One definition for the simulation (``medfed simulate``), the deployment daemons
(``medfed server`` / ``site`` / ``run``) and their tests.
"""

from __future__ import annotations

# Always set: no hub, no telemetry, no update checks.
OFFLINE = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
# Defaults an operator may override: one OpenMP thread per training process (2 cores were
# 45-180x slower oversubscribed), quiet MLflow progress bars.
DEFAULTS = {
    "OMP_NUM_THREADS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def offline_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    """``base`` (e.g. ``os.environ``) with the offline settings and defaults applied."""
    return {**DEFAULTS, **base, **OFFLINE, **extra}
