"""``medfed convert-weights``: a pickle-only foundation directory is refused with the command
that fixes it; the command converts it without running code; the result loads."""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

from medfed.cli import main  # noqa: E402
from models.foundation.loading import (CONVERT_COMMAND, FoundationLoadError,  # noqa: E402
                                       load_encoder)


def test_a_pickle_directory_is_refused_then_converted_by_the_cli_then_loads(tmp_path, capsys):
    torch.manual_seed(0)
    model = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
        patch_size=8, mlp_ratio=2))
    src, dst = tmp_path / "dino-bin", tmp_path / "dino"
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    try:
        load_encoder(src)
        raise AssertionError("a pickle-only directory was loaded")
    except FoundationLoadError as err:
        assert CONVERT_COMMAND in str(err) and "pytorch_model.bin" in str(err)

    assert main(["convert-weights", str(src), str(dst)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    loaded = load_encoder(dst).encoder
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_convert_weights_refuses_a_missing_source_in_one_line(tmp_path, capsys):
    assert main(["convert-weights", str(tmp_path / "absent"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medfed: error: ") and "does not exist" in err
    assert err.count("\n") == 1


def test_a_monai_bundle_is_converted_by_the_cli_into_a_loadable_bundle(tmp_path, capsys):
    import json

    from monai.networks.nets import ViT

    args = dict(in_channels=1, img_size=16, patch_size=4, hidden_size=32, mlp_dim=64,
                num_layers=1, num_heads=2, spatial_dims=3)
    torch.manual_seed(0)
    vit = ViT(**args)
    src, dst = tmp_path / "bundle-pt", tmp_path / "bundle"
    (src / "configs").mkdir(parents=True)
    (src / "models").mkdir()
    (src / "configs" / "inference.json").write_text(json.dumps(
        {"network_def": {"_target_": "ViT", **args}, "network": "$@network_def.to('cpu')"}))
    torch.save(vit.state_dict(), src / "models" / "model.pt")
    try:
        load_encoder(src)
        raise AssertionError("a pickle-only bundle was loaded")
    except FoundationLoadError as err:
        assert CONVERT_COMMAND in str(err) and "model.pt" in str(err)

    assert main(["convert-weights", str(src), str(dst)]) == 0
    assert str(dst / "models" / "model.safetensors") in capsys.readouterr().out
    loaded = load_encoder(dst).encoder
    for name, value in vit.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_a_checkpoint_holding_an_object_is_refused_in_one_line_naming_it(tmp_path, capsys):
    """weights_only=True refuses the object; the message names it, never torch's text."""
    import argparse

    src = tmp_path / "checkpoint.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1)}, src)
    assert main(["convert-weights", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\x1b" not in err
    assert err == ("medfed: error: checkpoint.pth is not a plain tensor checkpoint: it holds an "
                   "argparse.Namespace object, which MedFed never unpickles (torch.load "
                   "weights_only=True); save only the state dict (torch.save(model.state_dict(), "
                   "path)) and convert that\n")
    assert not (tmp_path / "out").exists()


def test_an_existing_destination_is_refused_and_left_unchanged_unless_forced(tmp_path, capsys):
    src, dst = tmp_path / "checkpoint.pth", tmp_path / "dino"
    torch.save({"w": torch.ones(2)}, src)
    dst.mkdir()
    (dst / "model.safetensors").write_bytes(b"theirs")
    assert main(["convert-weights", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err == (f"medfed: error: {dst} already exists and is not empty; remove it, choose "
                   "another DST or pass --force to write into it\n")
    assert [p.name for p in dst.iterdir()] == ["model.safetensors"]
    assert (dst / "model.safetensors").read_bytes() == b"theirs"

    assert main(["convert-weights", str(src), str(dst), "--force"]) == 0
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(dst / "model.safetensors"))["w"], torch.ones(2))
    empty = tmp_path / "empty"
    empty.mkdir()                     # an empty directory is not refused
    assert main(["convert-weights", str(src), str(empty)]) == 0
