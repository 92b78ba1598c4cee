"""A refused override says, in one line, what is wrong and what to type instead; composing
(and its refusals) needs no torch, Flower or MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from server.config import CONF_DIR, ConfigError, load_experiment

ROOT = Path(__file__).resolve().parents[2]


def _refusal(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as info:
        load_experiment(overrides)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_unknown_group_option_lists_the_groups_options():
    message = _refusal(["strategy=fedavgx"])
    options = sorted(p.stem for p in (CONF_DIR / "strategy").glob("*.yaml"))
    assert "strategy=fedavgx" in message and "no option 'fedavgx'" in message
    assert ", ".join(options) in message
    assert "Fix: strategy=<one of these>" in message
    assert "conf/strategy/fedavgx.yaml" in message


@pytest.mark.parametrize("override, key, expected", [
    ("federation.num_rounds=three", "federation.num_rounds", "int"),
    ("train.lr=fast", "train.lr", "float"),
    ("strategy.max_update_norm=big", "strategy.max_update_norm", "float or null"),
    ("strategy.local_params=3", "strategy.local_params", "list of str"),
    ("secagg.enabled=maybe", "secagg.enabled", "bool"),
])
def test_ill_typed_value_names_the_key_and_the_schema_type(override, key, expected):
    message = _refusal([override])
    assert f"{key} expects {expected}, got" in message
    assert f"Fix: {key}=<{expected}>" in message
    assert "Error merging override" not in message


def test_a_layout_file_given_as_a_group_option_is_answered_with_how_to_use_it(tmp_path):
    """``data/layout=FILE`` (a user's own layout YAML, as ``medfed ingest --layout FILE``
    takes it) is not an option name: the line says where the file goes, and that route
    composes."""
    own = tmp_path / "my_chest.yaml"
    own.write_text((CONF_DIR / "data" / "layout" / "chest_xray.yaml").read_text().replace(
        "name: chest_xray", "name: my_chest"))
    message = _refusal([f"data/layout={own}"])
    assert message.endswith(f"add hydra.searchpath=[file://{tmp_path}] with it in "
                            f"{tmp_path}/data/layout/) and use data/layout=my_chest")
    (tmp_path / "data" / "layout").mkdir(parents=True)
    own.rename(tmp_path / "data" / "layout" / own.name)
    cfg = load_experiment([f"hydra.searchpath=[file://{tmp_path}]", "data/layout=my_chest",
                           "task=chest3"])
    assert cfg.job_spec("r").layout.name == "my_chest"


@pytest.mark.parametrize("override", ["federation.rounds=3", "+federation.rounds=3"])
def test_unknown_key_lists_the_groups_keys(override):
    message = _refusal([override])
    assert "federation has no key 'rounds'" in message
    assert "valid keys: num_sites, num_rounds, round_timeout" in message
    assert "FederationConfig" in message


def test_an_option_the_groups_yaml_does_not_list_is_answered_with_hydras_plus_fix():
    """A free-form options map (``model.options``) takes keys its YAML does not list only
    with ``+``; the one line says so (Hydra's own fix, kept from its multi-line error)."""
    message = _refusal(["model=foundation", "model.options.presence_embedding=true"])
    assert message == ("Could not override 'model.options.presence_embedding'. To append to "
                       "your config use +model.options.presence_embedding=true")


def test_unknown_top_level_name_lists_groups_and_keys():
    message = _refusal(["stratgy=fedavg"])
    assert "no key 'stratgy'" in message
    assert "config groups: data, data/layout, experiment, federation" in message and "strategy" in message


def test_the_first_bad_override_is_explained_not_a_good_one():
    message = _refusal(["strategy=fedprox", "federation.num_sites=two", "model=nope"])
    assert message.startswith("federation.num_sites=two: federation.num_sites expects int")


def test_composition_imports_no_torch_flower_or_mlflow():
    """What ``medfed simulate`` does first: compose (and refuse) before any heavy import."""
    probe = ("import json, sys\n"
             "from server.config import ConfigError, load_experiment\n"
             "try:\n"
             "    load_experiment(['strategy=fedavgx'])\n"
             "except ConfigError:\n"
             "    pass\n"
             "print(json.dumps(sorted(m for m in ('torch', 'flwr', 'mlflow', 'ray', 'opacus')\n"
             "                        if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
