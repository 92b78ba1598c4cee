"""Experiment configuration: Hydra composes ``conf/`` once, on the server, into typed dataclasses.

- ``schema``: one frozen dataclass per config group, the experiment, and its conversion into
  the job spec sites receive (``protocol.job``);
- ``compose``: Hydra composition (``load_experiment``), ``CONF_DIR``;
- ``validation``: cross-field checks (``validate``);
- ``privacy``: the privacy request checked against the rest of the experiment.
"""

from protocol.job import PrivacySettings, TrainSettings

from .compose import CONF_DIR, experiment_names, load_experiment
from .privacy import validate_privacy
from .schema import (ConfigError, DataConfig, ExperimentConfig, FederationConfig, ModelConfig,
                     PretrainConfig, SecAggSettings, StrategyConfig, TaskConfig, TrackingConfig)
from .validation import validate, validate_pretrain, validate_secagg

__all__ = ["CONF_DIR", "ConfigError", "DataConfig", "ExperimentConfig", "FederationConfig",
           "ModelConfig", "PretrainConfig", "PrivacySettings", "SecAggSettings", "StrategyConfig",
           "TaskConfig", "TrackingConfig", "TrainSettings", "experiment_names", "load_experiment",
           "validate", "validate_pretrain", "validate_privacy", "validate_secagg"]
