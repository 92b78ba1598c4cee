"""Where an interrupted run continues: one answer for single- and two-phase runs.

A single-phase run keeps its checkpoints in ``<run_dir>/checkpoints``; a two-phase run
(pretraining, then the task) in ``<run_dir>/pretrain/checkpoints`` and
``<run_dir>/finetune/checkpoints``. Each phase is in one of three states:

- ``fresh``  no checkpoint: it runs from the start (phase 2 after a phase 1 that crashed);
- ``resume`` a checkpoint but no completion mark: it continues after its newest checkpoint,
  in the same MLflow run (the run id is in the checkpoint's manifest);
- ``done``   completed (``checkpoints/final.json``): it is skipped; its final checkpoint and
  registered model version stand in for running it.

A run with nothing to resume (no checkpoint at all) is refused, as is a run directory whose
layout does not match the experiment (single-phase directory for a two-phase experiment, or
the reverse).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import read_final
from .config import ConfigError, ExperimentConfig

FRESH, RESUME, DONE = "fresh", "resume", "done"
PRETRAIN_DIR, FINETUNE_DIR = "pretrain", "finetune"


@dataclass(frozen=True)
class PhaseResume:
    """How one phase continues: its directory (holding ``checkpoints/``) and its state."""

    dir: Path
    state: str           # FRESH | RESUME | DONE


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: the run directory, and per phase how it continues.

    ``task`` is the whole run for a single-phase experiment, phase 2 for a two-phase one;
    ``pretrain`` is phase 1 (None for a single-phase experiment).
    """

    run_dir: Path
    task: PhaseResume
    pretrain: PhaseResume | None = None

    @property
    def complete(self) -> bool:
        """Every phase has completed: nothing is left to run."""
        return all(p is None or p.state == DONE for p in (self.pretrain, self.task))


def _checkpointed(phase_dir: Path) -> bool:
    return any((phase_dir / "checkpoints").glob("round-*"))


def _state(phase_dir: Path) -> str:
    if read_final(phase_dir) is not None:
        return DONE
    return RESUME if _checkpointed(phase_dir) else FRESH


def resumable(run_dir: Path) -> bool:
    """``run_dir`` holds a checkpoint to resume from (of a run or of a two-phase run's phase 1)."""
    return _checkpointed(run_dir) or _checkpointed(run_dir / PRETRAIN_DIR)


def check_resume_dir(run_dir: Path) -> None:
    """Refuse an explicit ``resume=<dir>`` with nothing to resume (config validation)."""
    if not resumable(run_dir):
        raise ConfigError(f"resume={run_dir}: no checkpoints/ in that directory (nor in its "
                          f"{PRETRAIN_DIR}/ phase); nothing to resume")


def find_run_dir(cfg: ExperimentConfig) -> Path:
    """``resume=<dir>``: that directory; ``resume=true`` (or ``latest``): the newest run of
    this experiment under ``runs_dir`` with a checkpoint."""
    if str(cfg.resume).lower() not in ("true", "latest"):
        path = Path(str(cfg.resume))
        check_resume_dir(path)
        return path
    runs = sorted(p for p in Path(cfg.runs_dir).glob(f"{cfg.name}-*") if resumable(p))
    if not runs:
        raise ConfigError(f"resume=true: no run of experiment {cfg.name!r} with a checkpoint "
                          f"under {cfg.runs_dir}")
    return runs[-1]


def resolve_resume(cfg: ExperimentConfig, run_dir: Path | None = None) -> ResumePoint | None:
    """Where ``cfg`` continues (None without ``resume``): in ``run_dir`` if given (already
    resolved by the caller), else in the directory ``resume`` names.

    Raises
    ------
    ConfigError
        Nothing to resume, or the directory's layout does not fit the experiment.
    """
    if not cfg.resume:
        return None
    run_dir = Path(run_dir) if run_dir is not None else find_run_dir(cfg)
    two_phase = cfg.pretrain.objective is not None
    if not two_phase:
        if _checkpointed(run_dir / PRETRAIN_DIR):
            raise ConfigError(f"resume={run_dir}: a two-phase run (pretrain/ and finetune/), "
                              "but this experiment has no pretraining phase")
        task = PhaseResume(run_dir, _state(run_dir))
        if task.state == FRESH:
            raise ConfigError(f"resume={run_dir}: no checkpoint in that run; nothing to resume")
        return ResumePoint(run_dir, task)
    if _checkpointed(run_dir):
        raise ConfigError(f"resume={run_dir}: a single-phase run, but this experiment has a "
                          f"pretraining phase (pretrain.objective={cfg.pretrain.objective})")
    pretrain = PhaseResume(run_dir / PRETRAIN_DIR, _state(run_dir / PRETRAIN_DIR))
    if pretrain.state == FRESH:
        raise ConfigError(f"resume={run_dir}: phase 1 (pretraining) has no checkpoint; "
                          "nothing to resume")
    task = PhaseResume(run_dir / FINETUNE_DIR, _state(run_dir / FINETUNE_DIR))
    if pretrain.state == RESUME and task.state == DONE:
        raise ConfigError(f"resume={run_dir}: phase 2 completed but phase 1 is not marked "
                          "complete; the run directory is inconsistent")
    return ResumePoint(run_dir, task, pretrain)
