"""A foundation directory whose config.json does not fit its weight files is refused at config
load, in one line naming the directory and the first tensor that does not fit - from the
safetensors headers (no tensor data read), for every family's loader - not first at the
coordinator's preflight, when the weights load."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR

from models.foundation.monai_nets import SWIN_UNETR_TYPE, save_monai
from server.config import ConfigError, load_experiment

from ..models.test_foundation import MONAI_TINY, _save
from ..models.test_foundation_monai import SWIN, VIT3D, _vit, _vit_bundle
from ..models.test_foundation_timm import FIXTURES as TIMM_FIXTURES

COMMON = ["model=foundation", "task.image_size=32"]
CT3 = ["experiment=ct3", "model=foundation", "~model.options.input_center"]
SWIN_RUN = ["model=foundation_swin", "task=lesion_seg"]


def _edit(path: Path, change) -> None:
    """``change(config)`` written back to the JSON file at ``path``."""
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _hf(family: str):
    return lambda root: _save(family, root)


def _timm(root: Path) -> None:
    shutil.copytree(TIMM_FIXTURES / "vit_tiny", root)


def _monai(root: Path) -> None:
    torch.manual_seed(0)
    save_monai(_vit(MONAI_TINY), MONAI_TINY, root)


def _bundle(root: Path) -> None:
    _vit_bundle(root, _vit(VIT3D))


def _swin(root: Path) -> None:
    torch.manual_seed(0)
    save_monai(SwinUNETR(**SWIN), SWIN, root, model_type=SWIN_UNETR_TYPE)


CASES = {   # name: (writer, overrides, file edited, edit, refusal)
    "vit": (_hf("vit"), COMMON, "config.json",
            lambda c: c.update(intermediate_size=48),
            r"wrong shape \S+: config.json gives \[48\], the file holds \[64\] \(6 tensors\)"),
    "dinov2": (_hf("dinov2"), COMMON, "config.json",
               lambda c: c.update(num_hidden_layers=3), r"missing \S+ .*\(\d+\)"),
    "clip": (_hf("clip"), COMMON, "config.json",
             lambda c: c["vision_config"].update(intermediate_size=48),
             r"wrong shape vision\S+: config.json gives \[48\]"),
    "timm": (_timm, COMMON, "config.json",
             lambda c: c["model_args"].update(embed_dim=48, num_heads=3),
             r"wrong shape blocks.0.attn.proj.bias: config.json gives \[48\], the file holds "
             r"\[\d+\]"),
    "monai": (_monai, COMMON, "config.json",
              lambda c: c["constructor"].update(num_layers=3), r"missing blocks.2\S+ .*\(\d+\)"),
    "bundle": (_bundle, CT3, "configs/inference.json",
               lambda c: c["network_def"].update(mlp_dim=48),
               r"wrong shape blocks.0.mlp.linear1.bias: network_def gives \[48\], the file "
               r"holds \[64\]"),
    "swin": (_swin, SWIN_RUN, "config.json",
             lambda c: c["constructor"].update(feature_size=24), r"wrong shape \S+: config.json "
             r"gives \[\d+(, \d+)*\], the file holds \[\d+(, \d+)*\]"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_config_edited_away_from_its_weights_is_refused_at_config_load(tmp_path, name):
    write, overrides, edited, edit, refusal = CASES[name]
    encoders = tmp_path / "encoders"
    write(encoders / "good")
    shutil.copytree(encoders / "good", encoders / "edited")
    _edit(encoders / "edited" / edited, edit)
    base = [*overrides, f"model.foundation_dir={encoders}", f"runs_dir={tmp_path / 'runs'}"]
    assert load_experiment(base + ["model.options.weights=good"]).model.options["weights"] \
        == "good"
    with pytest.raises(ConfigError) as err:
        load_experiment(base + ["model.options.weights=edited"])
    message = str(err.value)
    assert "\n" not in message
    # said where the weights name is checked, naming the coordinator's own directory
    source = "network_def" if name == "bundle" else "config.json"
    assert message.startswith(f"model.options.weights: weights in {encoders / 'edited'} do "
                              f"not match its {source}: "), message
    assert re.search(refusal, message), message


def test_a_config_json_transformers_itself_refuses_is_one_line(tmp_path):
    """DINOv2's backbone fields name stages the edited depth no longer has: transformers'
    own ValueError, said in one line at config load, not as a traceback."""
    _save("dinov2", tmp_path / "dinov2")
    _edit(tmp_path / "dinov2" / "config.json", lambda c: c.update(num_hidden_layers=1))
    with pytest.raises(ConfigError, match=r"config.json: transformers refuses it \(out_features "
                                          r"must be a subset") as err:
        load_experiment([*COMMON, "model.options.weights=dinov2",
                         f"model.foundation_dir={tmp_path}", f"runs_dir={tmp_path / 'runs'}"])
    assert "\n" not in str(err.value)


def test_only_the_files_transformers_loads_are_checked(tmp_path):
    """A hub download may hold another checkpoint beside ``model.safetensors`` (e.g. an
    open_clip copy): transformers loads ``model.safetensors`` alone, and so does the check -
    the directory loads. A sharded one is checked through the shards its index names."""
    from safetensors.torch import load_file, save_file

    encoders = tmp_path / "encoders"
    _save("vit", encoders / "vit")
    base = [*COMMON, f"model.foundation_dir={encoders}", f"runs_dir={tmp_path / 'runs'}"]
    save_file({"visual.other": torch.zeros(3)}, str(encoders / "vit" / "open_clip.safetensors"))
    load_experiment(base + ["model.options.weights=vit"])
    # sharded: the index's shards are the weights, a stray file beside them is not
    state = load_file(str(encoders / "vit" / "model.safetensors"))
    (encoders / "vit" / "model.safetensors").unlink()
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(encoders / "vit" / name))
    index = {"weight_map": {k: name for name, part in halves.items() for k in part}}
    (encoders / "vit" / "model.safetensors.index.json").write_text(json.dumps(index))
    load_experiment(base + ["model.options.weights=vit"])
    index["weight_map"] = {k: v for k, v in index["weight_map"].items()
                           if v.startswith("model-00001")}        # one shard dropped
    (encoders / "vit" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"missing \S+"):
        load_experiment(base + ["model.options.weights=vit"])
