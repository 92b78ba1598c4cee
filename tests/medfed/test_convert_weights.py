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


# ---------------------------------------------------------------- sharded, tokenizer files

def _dinov2() -> transformers.Dinov2Model:
    torch.manual_seed(0)
    return transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, mlp_ratio=2))


def _sharded(model, src, shards: int = 2, index_names=None) -> list[str]:
    """``model`` as transformers' sharded pickle layout: pytorch_model-0000i-of-0000N.bin +
    pytorch_model.bin.index.json (``index_names`` overrides the shard names it gives)."""
    import json

    model.config.save_pretrained(src)
    state = model.state_dict()
    keys = sorted(state)
    names = [f"pytorch_model-{i:05d}-of-{shards:05d}.bin" for i in range(1, shards + 1)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: state[k] for k in keys[i::shards]}
        torch.save(part, src / name)
        weight_map |= dict.fromkeys(part, (index_names or names)[i])
    (src / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return names


def test_a_sharded_bin_checkpoint_converts_to_safetensors_shards_that_load(tmp_path, capsys):
    from server.config import load_experiment

    model = _dinov2()
    src, dst = tmp_path / "dino-bin", tmp_path / "encoders" / "dino"
    _sharded(model, src)
    assert main(["convert-weights", str(src), str(dst)]) == 0
    assert str(dst / "model.safetensors.index.json") in capsys.readouterr().out
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]                 # no pickle, no pickle index
    # the user's path: config load (headers checked), then the weights as a site loads them
    load_experiment(["model=foundation", "model.options.weights=dino", "task.image_size=32",
                     f"model.foundation_dir={dst.parent}", f"runs_dir={tmp_path / 'runs'}"])
    loaded = load_encoder(dst).encoder.state_dict()
    assert loaded.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded[name], value), name


def test_configs_and_tokenizer_files_are_copied_never_a_pickle_or_code(tmp_path):
    """A CLIP download's tokenizer files (vocab/merges, a SentencePiece model) come along."""
    from safetensors.torch import load_file

    from tests.models.test_foundation import _save

    src, dst = tmp_path / "clip-bin", tmp_path / "clip"
    _save("clip", src)
    torch.save(load_file(str(src / "model.safetensors")), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    extra = {"vocab.json": b'{"a</w>": 0}', "merges.txt": b"#version: 0.2\na b\n",
             "tokenizer.model": bytes(range(256)), "spiece.model": b"\x00\x01sp",
             "vocab.txt": b"[PAD]\n[CLS]\n", "special_tokens_map.json": b"{}",
             "README.md": b"# model card\n"}
    for name, data in extra.items():
        (src / name).write_bytes(data)
    (src / "checkpoints").mkdir()                      # a folder is not a file to copy
    left = {"extra.pkl": b"\x80\x04N.", "arrays.npy": b"\x93NUMPY", "modeling.py": b"x = 1\n"}
    for name, data in left.items():                    # other pickles, code: left behind
        (src / name).write_bytes(data)
    assert main(["convert-weights", str(src), str(dst)]) == 0
    for name, data in extra.items():
        assert (dst / name).read_bytes() == data, name
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        [*extra, "config.json", "model.safetensors"])
    assert load_encoder(dst).family == "clip"


def test_a_shard_index_must_name_files_of_the_directory_and_one_is_needed(tmp_path, capsys):
    outside = tmp_path / "outside.bin"
    torch.save({"w": torch.zeros(1)}, outside)
    src = tmp_path / "src"
    names = _sharded(_dinov2(), src, index_names=["../outside.bin",
                                                  "pytorch_model-00002-of-00002.bin"])
    assert main(["convert-weights", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names shard '../outside.bin', which is not a file" in err
    assert not (tmp_path / "out").exists()
    (src / "pytorch_model.bin.index.json").unlink()     # two pickles, no index
    assert main(["convert-weights", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "must hold exactly one pickle checkpoint" in err and f"found {len(names)}" in err


def test_a_shard_holding_an_object_is_refused_and_leaves_nothing_behind(tmp_path, capsys):
    import argparse

    src, dst = tmp_path / "src", tmp_path / "out"
    names = _sharded(_dinov2(), src)
    torch.save({"w": torch.zeros(1), "args": argparse.Namespace(lr=1)}, src / names[-1])
    assert main(["convert-weights", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{names[-1]} is not a plain tensor checkpoint" in err
    assert not dst.exists()                  # the first shard's safetensors removed again


def test_forced_conversion_in_the_other_layout_leaves_nothing_stale(tmp_path):
    """--force into a DST converted before as one file: transformers would read the old
    model.safetensors before the new shards' index, so the old file goes; and back."""
    old, new = _dinov2(), _dinov2()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(1.0)
    single, sharded, dst = tmp_path / "single", tmp_path / "sharded", tmp_path / "dino"
    single.mkdir()
    sharded.mkdir()
    old.config.save_pretrained(single)
    torch.save(old.state_dict(), single / "pytorch_model.bin")
    _sharded(new, sharded)
    for src, model in ((single, old), (sharded, new), (single, old)):
        assert main(["convert-weights", str(src), str(dst), "--force"]) == 0
        loaded = load_encoder(dst).encoder.state_dict()
        for name, value in model.state_dict().items():
            assert torch.equal(loaded[name], value), name
