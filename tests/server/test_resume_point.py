"""resolve_resume on fake run directories: one answer for single- and two-phase runs, and
the phase runner following it (phase 1 interrupted: resume it, then run phase 2 fresh)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from server import federation
from server.checkpoint import mark_final
from server.config import ConfigError, load_experiment
from server.resume import DONE, FRESH, RESUME, resolve_resume

TWO_PHASE = ["experiment=smoke", "pretrain=mm_dino", "pretrain.num_rounds=2"]


def _checkpoint(phase_dir: Path, round_: int = 1) -> None:
    (phase_dir / "checkpoints" / f"round-{round_:04d}").mkdir(parents=True)


def _done(phase_dir: Path) -> None:
    _checkpoint(phase_dir, 2)
    mark_final(phase_dir, rounds=2, registered_version="1", config_hash="h")


def _cfg(run_dir: Path, two_phase: bool = True):
    return load_experiment([*(TWO_PHASE if two_phase else ["experiment=smoke"]),
                            f"resume={run_dir}"])


def test_an_explicit_two_phase_run_dir_is_accepted_by_config_validation(tmp_path):
    _checkpoint(tmp_path / "pretrain")
    assert Path(_cfg(tmp_path).resume) == tmp_path
    with pytest.raises(ConfigError, match="no checkpoints"):
        _cfg(tmp_path / "elsewhere")


@pytest.mark.parametrize("layout, pretrain, task", [
    ({"pretrain": "interrupted"}, RESUME, FRESH),            # phase 1 crashed
    ({"pretrain": "done", "finetune": "interrupted"}, DONE, RESUME),   # phase 2 crashed
    ({"pretrain": "done"}, DONE, FRESH),                     # before phase 2's first round
    ({"pretrain": "done", "finetune": "done"}, DONE, DONE),  # nothing left
    # written before phases were marked complete: phase 1 re-enters (nothing to do) first
    ({"pretrain": "interrupted", "finetune": "interrupted"}, RESUME, RESUME),
])
def test_two_phase_runs_resume_the_phase_that_was_interrupted(tmp_path, layout, pretrain, task):
    for phase, state in layout.items():
        (_done if state == "done" else _checkpoint)(tmp_path / phase)
    point = resolve_resume(_cfg(tmp_path))
    assert point.run_dir == tmp_path
    assert (point.pretrain.dir, point.pretrain.state) == (tmp_path / "pretrain", pretrain)
    assert (point.task.dir, point.task.state) == (tmp_path / "finetune", task)
    assert point.complete == (pretrain == task == DONE)


def test_single_phase_runs_resume_in_the_run_dir(tmp_path):
    _checkpoint(tmp_path)
    point = resolve_resume(_cfg(tmp_path, two_phase=False))
    assert point.pretrain is None and (point.task.dir, point.task.state) == (tmp_path, RESUME)
    mark_final(tmp_path, rounds=1, registered_version=None, config_hash="h")
    assert resolve_resume(_cfg(tmp_path, two_phase=False)).complete


def test_resume_true_finds_the_newest_two_phase_run_of_the_experiment(tmp_path):
    for name in ("smoke-20240101-000000", "smoke-20240102-000000"):
        _checkpoint(tmp_path / name / "pretrain")
    (tmp_path / "smoke-20240103-000000").mkdir()                  # crashed before round 1
    cfg = load_experiment([*TWO_PHASE, f"runs_dir={tmp_path}", "resume=true"])
    assert resolve_resume(cfg).run_dir == tmp_path / "smoke-20240102-000000"
    assert federation.new_run_dir(cfg) == tmp_path / "smoke-20240102-000000"
    assert resolve_resume(load_experiment(TWO_PHASE)) is None     # no resume asked


def test_a_run_dir_of_the_other_kind_is_refused(tmp_path):
    single, two = tmp_path / "single", tmp_path / "two"
    _checkpoint(single)
    _checkpoint(two / "pretrain")
    with pytest.raises(ConfigError, match="single-phase run, but this experiment has a "
                                          "pretraining phase"):
        resolve_resume(_cfg(single))
    with pytest.raises(ConfigError, match="two-phase run"):
        resolve_resume(_cfg(two, two_phase=False))


def test_phase_1_interrupted_resumes_phase_1_then_runs_phase_2_fresh(tmp_path, monkeypatch):
    """BUG 3: phase 2 used to look for a checkpoint in the empty finetune/ and fail."""
    _checkpoint(tmp_path / "pretrain")
    calls = []

    def run_federation(grid, cfg, run_dir, observers=(), *, resume=False, **kwargs):
        # the real one restores from run_dir's newest checkpoint when resume is set
        calls.append((run_dir.name, resume))
        if resume:
            assert any((run_dir / "checkpoints").glob("round-*")), f"nothing in {run_dir}"
        weights = {"backbone.w": np.zeros(2, np.float32), "head.w": np.zeros(1, np.float32)}
        return federation.PhaseOutcome(ArrayRecord({k: Array(v) for k, v in weights.items()}),
                                       "1")

    monkeypatch.setattr(federation, "run_federation", run_federation)
    federation.run_experiment(None, _cfg(tmp_path), tmp_path)
    assert calls == [("pretrain", True), ("finetune", False)]


def test_phase_2_interrupted_skips_phase_1_with_its_final_checkpoint(tmp_path, monkeypatch):
    first = load_experiment(TWO_PHASE).pretrain_phase()     # resume is not in the hash
    pre, fine = tmp_path / "pretrain", tmp_path / "finetune"
    # a real final checkpoint of phase 1 (its weights become phase 2's backbone)
    from server.checkpoint import Checkpointer
    from strategies.observed import RoundRecord
    from tests.strategies.rounds import fedavg

    weights = {"backbone.w": np.full(2, 7.0, np.float32), "head.w": np.zeros(1, np.float32)}
    writer = Checkpointer(pre, fedavg(), config_hash=first.fingerprint(), mlflow_run_id="r")
    record = RoundRecord(2, arrays=ArrayRecord({k: Array(v) for k, v in weights.items()}))
    writer.on_train(record)
    writer.on_round_end(record)
    mark_final(pre, rounds=2, registered_version="4", config_hash=first.fingerprint())
    _checkpoint(fine)
    calls = []

    def run_federation(grid, cfg, run_dir, observers=(), *, resume=False, backbone=None,
                       lineage=None, **kwargs):
        calls.append((run_dir.name, resume, backbone, lineage))
        return federation.PhaseOutcome(ArrayRecord(), "9")

    monkeypatch.setattr(federation, "run_federation", run_federation)
    federation.run_experiment(None, _cfg(tmp_path), tmp_path)
    [(name, resume, backbone, lineage)] = calls                  # phase 1 did not run again
    assert (name, resume) == ("finetune", True)
    np.testing.assert_array_equal(backbone["w"].numpy(), weights["backbone.w"])
    assert lineage["parent.version"] == "4"
