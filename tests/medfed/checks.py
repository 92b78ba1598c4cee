"""Checks shared by the synthetic-site and layout simulation tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import mlflow


def tree_digest(root: Path) -> str:
    """SHA-256 of each file's relative path and bytes, in path order."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def assert_deterministic_in_seed(synthesize: Callable[..., object], tmp_path: Path, *, seed: int,
                                 **kwargs) -> None:
    """Same seed, same bytes (file names and DICOM UIDs included); the next seed, other bytes."""
    for name, s in (("a", seed), ("b", seed), ("c", seed + 1)):
        synthesize(tmp_path / name, seed=s, **kwargs)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")


def assert_sites_trained(run_dir: Path, n_sites: int = 3, rounds: int = 2) -> None:
    """The run finished, every site (``site-0`` ..) reported train/val/test metrics, the
    federation was tested, and each of ``rounds`` rounds logged a training loss."""
    sites = [f"site-{i}" for i in range(n_sites)]
    client = mlflow.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("medfed").experiment_id])[0]
    assert run.info.status == "FINISHED"
    metrics = run.data.metrics
    for site in sites:
        assert f"site/{site}/train/train_loss" in metrics, site
        assert f"site/{site}/val/n" in metrics and f"site/{site}/test/n" in metrics, site
    assert "test/mcc" in metrics and metrics["test/n"] > 0
    history = client.get_metric_history(run.info.run_id, "train/train_loss")
    assert sorted(m.step for m in history) == list(range(1, rounds + 1))    # every round trained
