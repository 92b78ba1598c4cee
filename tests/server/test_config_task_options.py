"""Every task YAML declares every option its task accepts, so ``task.options.X=...`` works
on each of them alike (a key a YAML left out needed ``+task.options.X``, e.g. chest3's and
ct3's ``sequence_dropout``); options the server fills in from the task (the class count,
class names) stay out, as a YAML value would override them."""

from __future__ import annotations

from dataclasses import fields

import pytest
from omegaconf import OmegaConf

from models import TASKS
from server.config import CONF_DIR, ExperimentConfig, TaskConfig, load_experiment

TASK_YAMLS = sorted((CONF_DIR / "task").glob("*.yaml"))


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
