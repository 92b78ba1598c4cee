"""Per-round server checkpoints and resume.

After every completed round the server writes ``<run_dir>/checkpoints/round-NNNN/``:

- ``arrays.npz``    global model weights after the round;
- ``strategy.npz``  strategy state, one namespace per link of the wrapper chain
                    (``strategies/state.py``): site-level DP accountants, FedAdam/Yogi/Adagrad
                    moments, FedAvgM momentum, ...;
- ``rng.npz``       Python, NumPy and torch RNG states of the server process;
- ``manifest.json`` round, config hash, MLflow run id and a sha256 of each file.

When a phase has completed, ``checkpoints/final.json`` records its last round and registered
model version, so a resumed run can skip it (``server/resume.py``).

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
from strategies.state import AGGREGATOR, FLOWER_STATE_ATTRIBUTES, chain_state, load_chain_state

log = logging.getLogger("medfed.server")

FINAL = "final.json"     # in checkpoints/: the phase completed (see mark_final)


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one written by a different configuration."""


def _namespaced(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Checkpoints written before wrappers owned their state hold only the aggregator's
    attributes, unprefixed (``m_t|dict|key``); they belong to the aggregator."""
    legacy = [k for k in state if k.split("|", 1)[0] in FLOWER_STATE_ATTRIBUTES]
    if legacy:
        log.warning("checkpoint predates per-wrapper strategy state: restoring the aggregator's "
                    "state only")
    return {(f"{AGGREGATOR}/{k}" if k in legacy else k): v for k, v in state.items()}


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


def arrays_digest(arrays: ArrayRecord) -> str:
    """sha256 of a model's weights (names, dtypes, shapes, bytes; in name order): the same
    for a checkpoint and for the model version registered from it."""
    return values_digest({k: a.numpy() for k, a in arrays.items()})


def values_digest(values: dict[str, np.ndarray]) -> str:
    """:func:`arrays_digest` of weights already decoded."""
    h = hashlib.sha256()
    for key in sorted(values):
        a = np.ascontiguousarray(values[key])
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.data if a.size else b"")     # the buffer itself: no copy (tobytes)
    return h.hexdigest()


def round_digest(record: RoundRecord) -> str:
    """:func:`arrays_digest` of the round's global model, computed once a round whichever
    observer asks first (the tracker's version tag, the checkpoint's manifest): ~5 ms of
    the round loop's CPU each time for the demo model; from the arrays as the round decoded
    them once (:meth:`RoundRecord.values`)."""
    if not record.arrays_sha256 and record.arrays is not None:
        record.arrays_sha256 = values_digest(record.values())
    return record.arrays_sha256


@dataclass
class Checkpoint:
    round: int
    arrays: ArrayRecord
    strategy_state: dict[str, np.ndarray]
    rng: dict[str, np.ndarray]
    manifest: dict

    def restore(self, strategy: Strategy) -> None:
        """Put strategy state and the server's RNGs back where they were after ``round``."""
        try:
            load_chain_state(strategy, _namespaced(self.strategy_state))
        except ValueError as err:
            raise CheckpointError(f"checkpoint of round {self.round} does not fit this "
                                  f"strategy: {err}") from None
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
        if record.arrays is self._arrays:       # decoded once a round, for every observer
            values, digest = record.values(), round_digest(record)
        else:           # a round that aggregated nothing: the last model, decoded once here
            values = {k: a.numpy() for k, a in self._arrays.items()}
            digest = values_digest(values)
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"round-{record.round:04d}"
        tmp = self.dir / f".round-{record.round:04d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.savez(tmp / "arrays.npz", **values)
        np.savez(tmp / "strategy.npz", **chain_state(self.strategy))
        np.savez(tmp / "rng.npz", **_rng_state())
        manifest = {"round": record.round, "config_hash": self.config_hash,
                    "mlflow_run_id": self.mlflow_run_id, "created": time.time(),
                    "sites": sorted(r.site_id for r in record.train),
                    "arrays_sha256": digest,
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


def round_arrays(run_dir: Path, rnd: int) -> ArrayRecord:
    """The global weights of round ``rnd``'s checkpoint, verified against its manifest."""
    path = Path(run_dir) / "checkpoints" / f"round-{rnd:04d}"
    if not (path / "manifest.json").is_file():
        raise CheckpointError(f"no checkpoint of round {rnd} in {run_dir}")
    manifest = json.loads((path / "manifest.json").read_text())
    if _sha256(path / "arrays.npz") != manifest["files"]["arrays.npz"]:
        raise CheckpointError(f"checkpoint {path.name} is corrupt: arrays.npz does not match "
                              "its manifest")
    with np.load(path / "arrays.npz", allow_pickle=False) as data:
        return ArrayRecord({k: Array(data[k]) for k in data.files})


def latest_weights(run_dir: Path) -> dict[str, np.ndarray]:
    """Global weights of the newest checkpoint (no config check: for tools and tests)."""
    candidates = sorted((Path(run_dir) / "checkpoints").glob("round-*"))
    if not candidates:
        raise CheckpointError(f"no checkpoint in {run_dir}")
    with np.load(candidates[-1] / "arrays.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def mark_final(run_dir: Path, *, rounds: int, registered_version: str | None,
               config_hash: str) -> None:
    """Record that the phase in ``run_dir`` completed all ``rounds`` (written after its last
    checkpoint; its absence means the phase was interrupted)."""
    path = Path(run_dir) / "checkpoints" / FINAL
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rounds": rounds, "registered_version": registered_version,
                               "config_hash": config_hash}, indent=2))
    tmp.replace(path)


def read_final(run_dir: Path) -> dict | None:
    """What ``mark_final`` recorded for ``run_dir``, or None if the phase did not complete."""
    path = Path(run_dir) / "checkpoints" / FINAL
    return json.loads(path.read_text()) if path.is_file() else None
