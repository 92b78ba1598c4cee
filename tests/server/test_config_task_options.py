"""Every task YAML declares every option its task accepts, so ``task.options.X=...`` works
on each of them alike (a key a YAML left out needed ``+task.options.X``, e.g. chest3's and
ct3's ``sequence_dropout``); options the server fills in from the task (the class count,
class names) stay out, as a YAML value would override them. Likewise every pretraining YAML
declares every option its objective accepts (the bench needed ``++pretrain.options.X``), but
those the phase takes from the task (its label fraction, class names); declaring them
changes no config fingerprint (settings at their defaults are left out of it)."""

from __future__ import annotations

from dataclasses import fields, replace

import pytest
from omegaconf import OmegaConf

from models import TASKS
from server.config import CONF_DIR, ExperimentConfig, TaskConfig, load_experiment
from server.config.schema import PretrainConfig

TASK_YAMLS = sorted((CONF_DIR / "task").glob("*.yaml"))
PRETRAIN_YAMLS = sorted((CONF_DIR / "pretrain").glob("*.yaml"))


def _from_the_task(name: str) -> set[str]:
    """The options ``ExperimentConfig.task_options`` fills in for ``name`` by itself."""
    return set(ExperimentConfig(task=TaskConfig(name=name, options={})).task_options())


@pytest.mark.parametrize("path", TASK_YAMLS, ids=lambda p: p.stem)
def test_every_task_yaml_declares_the_options_its_task_accepts(path):
    task = OmegaConf.load(path)
    accepted = {f.name for f in fields(TASKS.config_class(task.name))} - \
        _from_the_task(task.name)
    missing, extra = sorted(accepted - set(task.options)), sorted(set(task.options) - accepted)
    assert not missing and not extra, f"{path.name}: declare {missing}, remove {extra}"


def test_an_option_is_set_without_a_plus_on_every_task():
    cfg = load_experiment(["task=chest3", "data/layout=chest_xray",
                           "task.options.sequence_dropout=0.1", "task.options.lora_rank=8"])
    assert (cfg.task.options["sequence_dropout"], cfg.task.options["lora_rank"]) == (0.1, 8)


def _from_the_phase(objective: str) -> set[str]:
    """The options ``ExperimentConfig.pretrain_phase`` fills in for ``objective`` by itself
    (from a task that sets every option it could take from one)."""
    task = TaskConfig(options={"label_fraction": 0.5})
    phase = ExperimentConfig(task=task, pretrain=PretrainConfig(objective=objective))
    return set(phase.pretrain_phase().task_options())


@pytest.mark.parametrize("path", PRETRAIN_YAMLS, ids=lambda p: p.stem)
def test_every_pretrain_yaml_declares_the_options_its_objective_accepts(path):
    pretrain = load_experiment([f"pretrain={path.stem}"]).pretrain       # with its defaults list
    if pretrain.objective is None:
        assert not pretrain.options
        return
    accepted = {f.name for f in fields(TASKS.config_class(pretrain.objective))} - \
        _from_the_phase(pretrain.objective)
    assert {"num_classes"} <= _from_the_phase(pretrain.objective)
    missing = sorted(accepted - set(pretrain.options))
    extra = sorted(set(pretrain.options) - accepted)
    assert not missing and not extra, f"{path.name}: declare {missing}, remove {extra}"


def test_the_pretrain_phase_still_takes_the_tasks_label_fraction():
    cfg = load_experiment(["pretrain=mm_dino", "task.options.label_fraction=0.25"])
    assert cfg.pretrain_phase().task_options()["label_fraction"] == 0.25


@pytest.mark.parametrize("path", [p for p in PRETRAIN_YAMLS if p.stem != "none"],
                         ids=lambda p: p.stem)
def test_an_objectives_options_at_their_defaults_leave_the_fingerprint_as_it_was(path):
    """Spelled out or left out, an objective's default changes neither phase's hash; a
    value away from its default does."""
    overrides = [f"pretrain={path.stem}"] + (["task=chest3", "data/layout=chest_xray"]
                                             if "chest" in path.stem else [])
    cfg = load_experiment(overrides)
    defaults = {f.name for f in fields(TASKS.config_class(cfg.pretrain.objective))
                if f.name in cfg.pretrain.options
                and cfg.pretrain.options[f.name] == getattr(
                    TASKS.config_class(cfg.pretrain.objective)(), f.name)}
    assert defaults
    bare = replace(cfg, pretrain=replace(cfg.pretrain, options={
        k: v for k, v in cfg.pretrain.options.items() if k not in defaults}))
    assert bare.fingerprint() == cfg.fingerprint()
    assert bare.pretrain_phase().fingerprint() == cfg.pretrain_phase().fingerprint()
    changed = replace(cfg, pretrain=replace(cfg.pretrain, options={
        **cfg.pretrain.options, sorted(defaults)[0]: "not-the-default"}))
    assert changed.fingerprint() != cfg.fingerprint()
