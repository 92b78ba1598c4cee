"""Experiment configuration: Hydra composes ``conf/`` once, on the server, into typed dataclasses.

- ``schema``: one frozen dataclass per config group, the experiment, and its conversion into
  the job spec sites receive (``protocol.job``);
- ``compose``: Hydra composition (``load_experiment``), ``CONF_DIR``;
- ``validation``: cross-field checks (``validate``);
- ``privacy``: the privacy request checked against the rest of the experiment;
- ``buildable``: each phase's model and task built as the sites build them (meta device),
  phase 2 from phase 1's backbone as the coordinator hands it over, and made servable as the
  exporter does (``validation`` calls it last).

``schema`` and ``compose`` import no torch, Flower or MLflow, so a config mistake is refused in
well under a second; ``validation`` and ``privacy`` need the model and strategy registries and
are imported on first use of their names (PEP 562 ``__getattr__``).
"""

from importlib import import_module

from protocol.job import PrivacySettings, TrainSettings

from .compose import CONF_DIR, experiment_names, load_experiment
from .schema import (ConfigError, DataConfig, ExperimentConfig, FederationConfig, ModelConfig,
                     PretrainConfig, SecAggSettings, StrategyConfig, TaskConfig, TrackingConfig)

# name -> submodule that defines it; these pull in torch/Flower through the registries.
_LAZY = {"validate": "validation", "validate_pretrain": "validation",
         "validate_secagg": "validation", "validate_privacy": "privacy"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CONF_DIR", "ConfigError", "DataConfig", "ExperimentConfig", "FederationConfig",
           "ModelConfig", "PretrainConfig", "PrivacySettings", "SecAggSettings", "StrategyConfig",
           "TaskConfig", "TrackingConfig", "TrainSettings", "experiment_names", "load_experiment",
           "validate", "validate_pretrain", "validate_privacy", "validate_secagg"]
