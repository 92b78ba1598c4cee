"""Per-round server checkpoints and resume.

After every completed round the server writes ``<run_dir>/checkpoints/round-NNNN/``:

- ``arrays.npz``    global model weights after the round;
- ``strategy.npz``  strategy state (FedAdam/Yogi/Adagrad moments, FedAvgM momentum, ...);
- ``rng.npz``       Python, NumPy and torch RNG states of the server process;
- ``manifest.json`` round, config hash, MLflow run id and a sha256 of each file.

A directory is written under a temporary name and renamed when complete, so a crash mid-write
leaves the previous checkpoint as the latest. No pickle anywhere: loading a checkpoint cannot
execute code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy

from strategies.observed import RoundRecord

log = logging.getLogger("medfed.server")

# Attributes of Flower strategies that carry state across rounds.
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector", "current_arrays")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one written by a different configuration."""


def innermost(strategy: Strategy) -> Strategy:
    """Follow ``.strategy`` through wrappers to the aggregating strategy."""
    while hasattr(strategy, "strategy"):
        strategy = strategy.strategy
    return strategy


def strategy_state(strategy: Strategy) -> dict[str, np.ndarray]:
    """Flatten known state attributes into named arrays (``attr|kind|key``)."""
    inner, out = innermost(strategy), {}
    for attr in STATE_ATTRIBUTES:
        value = getattr(inner, attr, None)
        if value is None:
            continue
        if isinstance(value, ArrayRecord):
            out |= {f"{attr}|record|{k}": a.numpy() for k, a in value.items()}
        elif isinstance(value, dict):
            out |= {f"{attr}|dict|{k}": np.asarray(v) for k, v in value.items()}
        elif isinstance(value, list):
            out |= {f"{attr}|list|{i:06d}": np.asarray(v) for i, v in enumerate(value)}
        else:
            raise CheckpointError(f"cannot checkpoint {attr} of type {type(value).__name__}")
    return out


def load_strategy_state(strategy: Strategy, state: dict[str, np.ndarray]) -> None:
    inner = innermost(strategy)
    grouped: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, value in state.items():
        attr, kind, key = name.split("|", 2)
        grouped.setdefault((attr, kind), {})[key] = value
    for (attr, kind), values in grouped.items():
        if kind == "record":
            restored = ArrayRecord({k: Array(v) for k, v in values.items()})
        elif kind == "dict":
            restored = dict(values)
        else:
            restored = [values[k] for k in sorted(values)]
        setattr(inner, attr, restored)


def _rng_state() -> dict[str, np.ndarray]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python_mt": np.array(mt, dtype=np.uint64), "python_meta": np.array(
                [version, 0 if gauss is None else 1], dtype=np.int64),
            "python_gauss": np.array([gauss or 0.0]),
            "numpy_keys": keys, "numpy_meta": np.array([pos, has_gauss]),
            "numpy_cached": np.array([cached]), "torch": torch.get_rng_state().numpy()}


def _set_rng_state(s: dict[str, np.ndarray]) -> None:
    version, has_gauss = (int(x) for x in s["python_meta"])
    random.setstate((version, tuple(int(x) for x in s["python_mt"]),
                     float(s["python_gauss"][0]) if has_gauss else None))
    np.random.set_state(("MT19937", s["numpy_keys"], int(s["numpy_meta"][0]),
                         int(s["numpy_meta"][1]), float(s["numpy_cached"][0])))
    torch.set_rng_state(torch.from_numpy(s["torch"].copy()))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Checkpoint:
    round: int
    arrays: ArrayRecord
    strategy_state: dict[str, np.ndarray]
    rng: dict[str, np.ndarray]
    manifest: dict

    def restore(self, strategy: Strategy) -> None:
        """Put strategy state and the server's RNGs back where they were after ``round``."""
        load_strategy_state(strategy, self.strategy_state)
        _set_rng_state(self.rng)


class Checkpointer:
    """Round observer writing a checkpoint at the end of every round."""

    def __init__(self, run_dir: Path, strategy: Strategy, *, config_hash: str, mlflow_run_id: str,
                 keep: int = 3):
        self.dir = Path(run_dir) / "checkpoints"
        self.strategy = strategy
        self.config_hash = config_hash
        self.mlflow_run_id = mlflow_run_id
        self.keep = keep
        self._arrays: ArrayRecord | None = None

    def on_train(self, record: RoundRecord) -> None:
        if record.arrays is not None:
            self._arrays = record.arrays

    def on_round_end(self, record: RoundRecord) -> None:
        if self._arrays is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"round-{record.round:04d}"
        tmp = self.dir / f".round-{record.round:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.savez(tmp / "arrays.npz", **{k: a.numpy() for k, a in self._arrays.items()})
        np.savez(tmp / "strategy.npz", **strategy_state(self.strategy))
        np.savez(tmp / "rng.npz", **_rng_state())
        manifest = {"round": record.round, "config_hash": self.config_hash,
                    "mlflow_run_id": self.mlflow_run_id, "created": time.time(),
                    "sites": sorted(r.site_id for r in record.train),
                    "files": {p.name: _sha256(p) for p in sorted(tmp.iterdir())}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(self.dir.glob("round-*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path, config_hash: str) -> Checkpoint:
    """The newest complete checkpoint in ``run_dir``, verified against its manifest."""
    candidates = sorted((Path(run_dir) / "checkpoints").glob("round-*"))
    if not candidates:
        raise CheckpointError(f"no checkpoint in {run_dir}; nothing to resume")
    path = candidates[-1]
    manifest = json.loads((path / "manifest.json").read_text())
    for name, digest in manifest["files"].items():
        if _sha256(path / name) != digest:
            raise CheckpointError(f"checkpoint {path.name} is corrupt: {name} does not match "
                                  "its manifest")
    if manifest["config_hash"] != config_hash:
        raise CheckpointError(f"checkpoint {path.name} was written by a different configuration "
                              f"({manifest['config_hash']} != {config_hash}); resume with the "
                              "same overrides as the original run")

    def load(name):
        with np.load(path / name, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    arrays = ArrayRecord({k: Array(v) for k, v in load("arrays.npz").items()})
    return Checkpoint(manifest["round"], arrays, load("strategy.npz"), load("rng.npz"), manifest)


def latest_weights(run_dir: Path) -> dict[str, np.ndarray]:
    """Global weights of the newest checkpoint (no config check: for tools and tests)."""
    candidates = sorted((Path(run_dir) / "checkpoints").glob("round-*"))
    if not candidates:
        raise CheckpointError(f"no checkpoint in {run_dir}")
    with np.load(candidates[-1] / "arrays.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
