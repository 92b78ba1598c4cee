"""The phase runner: build the initial model and strategy, run the rounds, record everything."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result, Strategy

from models import MODELS
from strategies import wire
from strategies.observed import ObservedStrategy, RoundObserver
from strategies.pooling import aggregate_evaluate_records

from .config import ExperimentConfig
from .console import ConsoleTable
from .tracking import MlflowTracker

log = logging.getLogger("medfed.server")


def build_strategy(cfg: ExperimentConfig) -> Strategy:
    s = cfg.strategy
    return FedAvg(
        fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
        min_train_nodes=s.min_train_sites, min_evaluate_nodes=s.min_evaluate_sites,
        min_available_nodes=s.min_available_sites, weighted_by_key=wire.NUM_EXAMPLES,
        arrayrecord_key=wire.ARRAYS, configrecord_key=wire.CONFIG,
        evaluate_metrics_aggr_fn=aggregate_evaluate_records,
    )


def job_config(cfg: ExperimentConfig) -> ConfigRecord:
    """What every site needs to build the model and task and to train (no site specifics)."""
    return ConfigRecord({
        wire.MODEL_NAME: cfg.model.name,
        wire.MODEL_OPTIONS: json.dumps(cfg.model_options(), sort_keys=True),
        wire.TASK_NAME: cfg.task.name,
        wire.TASK_OPTIONS: json.dumps(cfg.task_options(), sort_keys=True),
        wire.CLASS_NAMES: list(cfg.task.class_names),
        wire.IMAGE_SIZE: cfg.task.image_size,
        wire.LOCAL_EPOCHS: cfg.train.local_epochs,
        wire.BATCH_SIZE: cfg.train.batch_size,
        wire.LR: float(cfg.train.lr),
        wire.WEIGHT_DECAY: float(cfg.train.weight_decay),
        wire.SEED: cfg.seed,
    })


def new_run_dir(cfg: ExperimentConfig) -> Path:
    run_dir = Path(cfg.runs_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def run_federation(grid: Grid, cfg: ExperimentConfig, run_dir: Path,
                   observers: tuple[RoundObserver, ...] = ()) -> Result:
    """Run ``cfg.federation.num_rounds`` rounds of federated training and evaluation."""
    torch.manual_seed(cfg.seed)
    model = MODELS.build(cfg.model.name, cfg.model_options())
    console = ConsoleTable()
    tracker = MlflowTracker(cfg, run_dir)
    strategy = ObservedStrategy(build_strategy(cfg), [console, tracker, *observers])
    log.info("experiment %s: %d sites, %d rounds, run dir %s, MLflow run %s",
             cfg.name, cfg.federation.num_sites, cfg.federation.num_rounds, run_dir, tracker.run_id)
    try:
        result = strategy.start(
            grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=cfg.federation.num_rounds, timeout=cfg.federation.round_timeout,
            train_config=job_config(cfg), evaluate_config=job_config(cfg),
        )
    except BaseException:
        tracker.finish(console.summary(), status="FAILED")
        raise
    summary = console.summary()
    tracker.finish(summary)
    log.info("summary (pooled over sites):\n%s", summary)
    log.info("MLflow: %d model versions of %r in %s (run %s)", len(tracker.versions),
             cfg.tracking.registered_model, tracker.uri, tracker.run_id)
    return result
