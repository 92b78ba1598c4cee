"""Hydra composition: ``conf/`` composed once, on the server, into a validated, frozen
:class:`~server.config.schema.ExperimentConfig`.

One schema per group; unknown keys fail at compose time (Hydra struct mode). A refused
override is explained in one line naming the fix (:mod:`server.config.explain`). This module
imports no torch, Flower or MLflow: the registry-backed checks (``validation``) are imported
only once composition succeeded, so ``medfed simulate strategy=typo`` is refused at once.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from protocol.job import PrivacySettings, TrainSettings

from .explain import explain_override
from .schema import (ConfigError, DataConfig, ExperimentConfig, FederationConfig, ModelConfig,
                     PretrainConfig, SecAggSettings, StrategyConfig, TaskConfig, TrackingConfig)

# The repository's conf/ (this file is server/config/compose.py).
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def schema_node() -> DictConfig:
    """Typed, struct-mode schema; frozen dataclasses are read-only to OmegaConf, so unfreeze
    the node (the typed result is rebuilt as frozen dataclasses by ``_freeze``)."""
    def unfreeze(node):
        OmegaConf.set_readonly(node, False)
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                unfreeze(child)
        return node

    return unfreeze(OmegaConf.structured(ExperimentConfig))


ConfigStore.instance().store(name="schema", node=schema_node())


def load_experiment(overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides into a validated ExperimentConfig.

    Raises
    ------
    ConfigError
        On an unknown group option (listing the group's options), an ill-typed value (naming
        the key and its schema type), an unknown key (listing the group's keys); on a value a
        group's dataclass refuses (e.g. ``privacy.epsilon=0``); on what ``validate`` refuses.
    """
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = compose(config_name="config", overrides=list(overrides))
        cfg = OmegaConf.to_object(raw)
    except Exception as err:  # noqa: BLE001 - Hydra/OmegaConf raise many types; all mean "bad config"
        # Our own diagnosis of the overrides first (one line, names the fix); Hydra's first
        # line when none of them is at fault (e.g. a broken YAML file under conf/).
        reason = explain_override(list(overrides), CONF_DIR, schema_node())
        if reason is None:
            lines = str(err).strip().splitlines() or [type(err).__name__]
            # Hydra's own fix for an option its YAML does not list ("To append ... use +")
            reason = " ".join([lines[0], *(x for x in lines if x.startswith("To append"))])
        raise ConfigError(reason) from None
    finally:
        GlobalHydra.instance().clear()
    from .validation import validate    # imports the registries (torch, Flower): only now
    return validate(_freeze(cfg))


def _freeze(cfg: ExperimentConfig) -> ExperimentConfig:
    """OmegaConf builds dataclasses field by field; rebuild so lists/dicts are plain types."""
    plain = json.loads(json.dumps(asdict(cfg)))
    return ExperimentConfig(
        name=plain["name"], seed=plain["seed"], runs_dir=plain["runs_dir"],
        resume=None if plain["resume"] is None else str(plain["resume"]),
        model=ModelConfig(**plain["model"]), task=TaskConfig(**plain["task"]),
        train=TrainSettings(**plain["train"]), strategy=StrategyConfig(**plain["strategy"]),
        federation=FederationConfig(**plain["federation"]), data=DataConfig(**plain["data"]),
        tracking=TrackingConfig(**plain["tracking"]), privacy=PrivacySettings(**plain["privacy"]),
        secagg=SecAggSettings(**plain["secagg"]), pretrain=PretrainConfig(**plain["pretrain"]),
    )


def experiment_names() -> list[str]:
    """The experiments in ``conf/experiment/`` (``experiment=<name>``)."""
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
