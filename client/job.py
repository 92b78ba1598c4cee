"""Decode what the server asked for into typed objects, validating at the boundary.

Models and tasks are looked up by name in closed registries; an unknown name or option is
refused with the list of valid ones (a site never imports a path that came over the wire).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from flwr.app import ConfigRecord

from models import MODELS, TASKS
from models.tasks import batch_coupling, build, private_state
from protocol import wire
from protocol.accounting import check_accountant

from .engine import TrainConfig


class JobError(ValueError):
    """The server's request is malformed or names something this site does not offer."""


@dataclass(frozen=True)
class PrivacyRequest:
    """What the server asks for; the site's policy decides whether to accept it."""
    mechanism: str = wire.DP_NONE
    target_epsilon: float = 0.0      # dp-sgd: calibrate sigma to reach this over the run
    noise_multiplier: float = 0.0    # > 0: the server's sigma (site-dp: the server adds it)
    max_grad_norm: float = 1.0       # dp-sgd per-sample clipping bound
    sample_rate: float = 0.0         # dp-sgd Poisson rate; 0 -> batch_size / n
    clipping_norm: float = 0.0       # site-dp: bound on the site's update norm
    planned_rounds: int = 1
    accountant: str = "rdp"
    run_id: str = ""

    def __post_init__(self):
        if self.mechanism not in wire.DP_MECHANISMS:
            raise ValueError(f"unknown privacy mechanism {self.mechanism!r}; "
                             f"this site offers {list(wire.DP_MECHANISMS)}")
        check_accountant(self.accountant)
        if self.mechanism == wire.DP_SITE and not (self.noise_multiplier > 0
                                                    and self.clipping_norm > 0):
            raise ValueError("site-dp needs a noise multiplier and a clipping norm > 0")
        if self.mechanism == wire.DP_SGD and not (self.target_epsilon > 0
                                                   or self.noise_multiplier > 0):
            raise ValueError("dp-sgd needs a target epsilon or a noise multiplier > 0")
        if self.mechanism != wire.DP_NONE and (self.planned_rounds < 1 or not self.run_id):
            raise ValueError("a private run must name its run id and planned rounds >= 1")


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
    privacy: PrivacyRequest = PrivacyRequest()

    def build(self):
        """``(model, task)``: the backbone wrapped by the task (heads, adapters, freezing)."""
        return build(self.model_name, self.model_options, self.task_name, self.task_options)


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
            privacy=PrivacyRequest(
                mechanism=str(config.get(wire.DP_MECHANISM, wire.DP_NONE)),
                target_epsilon=float(config.get(wire.DP_TARGET_EPSILON, 0.0)),
                noise_multiplier=float(config.get(wire.DP_NOISE_MULTIPLIER, 0.0)),
                max_grad_norm=float(config.get(wire.DP_MAX_GRAD_NORM, 1.0)),
                sample_rate=float(config.get(wire.DP_SAMPLE_RATE, 0.0)),
                clipping_norm=float(config.get(wire.DP_CLIPPING_NORM, 0.0)),
                planned_rounds=int(config.get(wire.DP_PLANNED_ROUNDS, 1)),
                accountant=str(config.get(wire.DP_ACCOUNTANT, "rdp")),
                run_id=str(config.get(wire.RUN_ID, ""))),
        )
        MODELS.config(job.model_name, job.model_options)     # validate names and options now
        TASKS.config(job.task_name, job.task_options)
        coupling = batch_coupling(job.task_name, job.task_options)
        if job.privacy.mechanism == wire.DP_SGD and coupling:
            raise JobError(f"DP-SGD refused for task {job.task_name!r}: {coupling}; "
                           "per-sample clipping cannot bound one sample's influence - "
                           "use site-level DP (privacy=sitedp) for this objective")
        state = private_state(job.task_name, job.task_options)
        if job.privacy.mechanism == wire.DP_SGD and state:
            raise JobError(f"DP-SGD refused: {state}")
    except (KeyError, TypeError, ValueError) as err:
        raise JobError(str(err).strip('"')) from None
    return job
