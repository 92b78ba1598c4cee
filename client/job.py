"""Decode what the server asked for into typed objects, validating at the boundary.

Models and tasks are looked up by name in closed registries; an unknown name or option is
refused with the list of valid ones (a site never imports a path that came over the wire).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flwr.app import ConfigRecord

from models import MODELS, TASKS
from strategies import wire

from .engine import TrainConfig


class JobError(ValueError):
    """The server's request is malformed or names something this site does not offer."""


@dataclass(frozen=True)
class Job:
    model_name: str
    model_options: dict
    task_name: str
    task_options: dict
    class_names: tuple[str, ...]
    image_size: int
    train: TrainConfig
    server_round: int
    local_params: tuple[str, ...] = ()      # FedBN-style patterns kept at this site
    personalize: bool = False

    def build_model(self):
        return MODELS.build(self.model_name, self.model_options)

    def build_task(self):
        return TASKS.build(self.task_name, self.task_options)


def decode_job(config: ConfigRecord, *, site_seed: int) -> Job:
    """``ConfigRecord`` -> ``Job``; every missing or ill-typed key is named in the error."""
    def get(key, kind):
        if key not in config:
            raise JobError(f"server config lacks {key!r} (is the server running MedFed?)")
        value = config[key]
        if kind is float and isinstance(value, int):
            value = float(value)
        if not isinstance(value, kind):
            raise JobError(f"server config {key!r} should be {kind.__name__}, "
                           f"got {type(value).__name__}")
        return value

    try:
        model_options = json.loads(get(wire.MODEL_OPTIONS, str))
        task_options = json.loads(get(wire.TASK_OPTIONS, str))
    except json.JSONDecodeError as err:
        raise JobError(f"model/task options are not valid JSON: {err}") from None
    server_round = int(config.get(wire.SERVER_ROUND, 0))
    try:
        job = Job(
            model_name=get(wire.MODEL_NAME, str), model_options=model_options,
            task_name=get(wire.TASK_NAME, str), task_options=task_options,
            class_names=tuple(get(wire.CLASS_NAMES, list)),
            image_size=get(wire.IMAGE_SIZE, int),
            train=TrainConfig(local_epochs=get(wire.LOCAL_EPOCHS, int),
                              batch_size=get(wire.BATCH_SIZE, int), lr=get(wire.LR, float),
                              weight_decay=get(wire.WEIGHT_DECAY, float),
                              proximal_mu=float(config.get(wire.PROXIMAL_MU, 0.0)),
                              seed=get(wire.SEED, int) * 100_003 + site_seed * 1009 + server_round),
            server_round=server_round,
            local_params=tuple(str(p) for p in config.get(wire.LOCAL_PARAMS, [])),
            personalize=bool(config.get(wire.PERSONALIZE, False)),
        )
        MODELS.config(job.model_name, job.model_options)     # validate names and options now
        TASKS.config(job.task_name, job.task_options)
    except (KeyError, TypeError, ValueError) as err:
        raise JobError(str(err).strip('"')) from None
    return job
