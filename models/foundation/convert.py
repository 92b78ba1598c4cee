"""Convert a pickle checkpoint to safetensors without running its code (``medfed
convert-weights SRC DST``).

``torch.load(weights_only=True)`` unpickles tensors and plain containers only; a checkpoint
holding any other object is refused, naming it. SRC is one of:

* a checkpoint file: written as ``DST/model.safetensors``, its sibling JSON configs copied;
* a directory holding exactly one checkpoint, or a sharded one (``pytorch_model.bin.index.json``
  naming its shards): its configs, tokenizer files (``vocab.txt``, ``merges.txt``,
  ``tokenizer.model``, ``spiece.model``) and model card are copied (``COPIED_SUFFIXES``) -
  never a pickle or code. Shards become ``model-0000i-of-0000N.safetensors`` +
  ``model.safetensors.index.json`` (the layout transformers writes and reads), one shard
  read at a time;
* a MONAI bundle (``bundle.convert_bundle``): a copy of its configs, ``models/model.pt`` as
  ``models/model.safetensors``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from torch import Tensor

from . import bundle
from .loading import (PICKLE_SUFFIXES, PUBLIC_CONSTANT_FILES, WEIGHTS_FILE, WEIGHTS_INDEX,
                      FoundationLoadError)

log = logging.getLogger(__name__)

PICKLE_INDEX_SUFFIX = ".bin.index.json"        # pytorch_model.bin.index.json: names the shards
SAFETENSORS_INDEX = WEIGHTS_INDEX
# torch's weights_only refusal names the object: "Unsupported global: GLOBAL argparse.Namespace"
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]{0,199})")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SAVE_STATE_DICT = ("save only the state dict (torch.save(model.state_dict(), path)) and "
                    "convert that")


def _read_pickle_state(file: Path) -> dict[str, Tensor]:
    """The tensors of a pickle checkpoint, via ``torch.load(weights_only=True)``."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:       # weights_only refuses arbitrary objects: say so, one line
        raise FoundationLoadError(f"{file.name} is not a plain tensor checkpoint: "
                                  f"{_pickle_refusal(err)}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise FoundationLoadError(f"{file.name} is not a state dict of tensors")
    return state


def _pickle_refusal(err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file: one line, in our own words."""
    # torch's text spans lines, carries ANSI colour codes and recommends weights_only=False,
    # which would run the file's code: take only the refused global's dotted name from it
    text = _ANSI.sub("", str(err))
    found = _REFUSED_GLOBAL.search(text)
    if found:
        name = found.group(1)
        article = "an" if name[0].lower() in "aeiou" else "a"
        return (f"it holds {article} {name} object, which MedFed never unpickles "
                f"(torch.load weights_only=True); {_SAVE_STATE_DICT}")
    if "weights only load failed" in text.lower():
        return ("torch.load(weights_only=True) cannot read it as tensors and plain containers "
                f"(an object MedFed never unpickles, or a damaged file); {_SAVE_STATE_DICT}")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return (f"torch.load could not read it ({type(err).__name__}: "
            f"{first.split('. ')[0][:160]}); download or save the checkpoint again")


def convert_weights(src: str | Path, dst: str | Path, *, force: bool = False) -> Path:
    """Convert the pickle checkpoint ``src`` (a file, a directory, a MONAI bundle: see the
    module) to safetensors in ``dst``, so that DST is loadable as it stands.

    A checkpoint saved as ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped. A
    ``dst`` that exists and is not an empty directory is refused unless ``force``, which
    writes into it, replacing the files of the same names.

    Raises
    ------
    FoundationLoadError
        No checkpoint, several without an index, a shard the index names that is not a file
        of SRC, a tensor in two shards, a checkpoint holding anything but tensors.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and not force and not (dst.is_dir() and not any(dst.iterdir())):
        raise FoundationLoadError(f"{dst} already exists and is not empty; remove it, choose "
                                  "another DST or pass --force to write into it")
    if src.is_dir() and bundle.is_bundle(src):
        return bundle.convert_bundle(src, dst, _read_pickle_state)
    if src.is_dir():
        shards, folder, copied = _shards(src), src, _non_weight_files(src)
    elif src.is_file():
        shards, folder = [src], src.parent
        copied = [p for p in folder.glob("*.json") if not p.name.endswith(PICKLE_INDEX_SUFFIX)]
    else:
        raise FoundationLoadError(f"{src} does not exist")
    if len(shards) == 1:
        state = _read_pickle_state(shards[0])
        dst.mkdir(parents=True, exist_ok=True)
        _save(state, dst / WEIGHTS_FILE)
        count = len(state)
    else:
        count = _convert_shards(shards, dst)
    _drop_other_layout(dst, sharded=len(shards) > 1)
    for path in copied:
        if (dst / path.name).resolve() != path.resolve():
            shutil.copyfile(path, dst / path.name)
    log.info("converted %d tensors from %d file(s) of %s to safetensors", count, len(shards),
             folder.name)
    return dst


def _drop_other_layout(dst: Path, *, sharded: bool) -> None:
    """After ``--force`` into a DST converted before in the other layout: remove what would
    be loaded instead of what was just written (transformers reads ``model.safetensors``
    before an index; an index left beside a new single file would name stale shards)."""
    stale = ([dst / WEIGHTS_FILE] if sharded else
             [dst / SAFETENSORS_INDEX, *dst.glob("model-*-of-*.safetensors")])
    for path in stale:
        if path.is_file():
            log.warning("convert-weights: removed %s of an earlier conversion", path.name)
            path.unlink()


def _shards(src: Path) -> list[Path]:
    """The checkpoint files of directory ``src``: the shards its index names, or its one."""
    indexes = sorted(src.glob("*" + PICKLE_INDEX_SUFFIX))
    if len(indexes) > 1:
        raise FoundationLoadError(f"{src} holds {len(indexes)} shard indexes "
                                  f"(*{PICKLE_INDEX_SUFFIX}); keep one")
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise FoundationLoadError(f"{indexes[0].name} is not a shard index (no valid "
                                      f"weight_map: {type(err).__name__})") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise FoundationLoadError(f"{indexes[0].name} has an empty weight_map")
        names = sorted({str(v) for v in weight_map.values()})
        for name in names:        # a plain file name of this directory, never a path
            if Path(name).name != name or not (src / name).is_file():
                raise FoundationLoadError(f"{indexes[0].name} names shard {name[:80]!r}, "
                                          f"which is not a file in {src}")
        return [src / name for name in names]
    candidates = sorted(p for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if len(candidates) != 1:
        raise FoundationLoadError(f"{src} must hold exactly one pickle checkpoint "
                                  f"({', '.join(PICKLE_SUFFIXES)}) or a sharded one with its "
                                  f"*{PICKLE_INDEX_SUFFIX}, found {len(candidates)} files")
    return candidates


# What a model directory holds beside its weights and is copied: configs, tokenizer files
# (vocab.txt, merges.txt, SentencePiece *.model), the model card. Anything else - another
# pickle format (.pkl, .npy, .joblib), code (.py), other checkpoints - is left behind, logged.
COPIED_SUFFIXES = (".json", ".txt", ".model", ".md")


def _non_weight_files(src: Path) -> list[Path]:
    """The files of ``src`` to copy beside the converted weights (``COPIED_SUFFIXES`` and the
    public feature statistics; never a pickle, a weight index or code)."""
    def copied(p: Path) -> bool:
        if p.name.endswith(PICKLE_INDEX_SUFFIX) or p.name == SAFETENSORS_INDEX:
            return False
        return p.suffix in COPIED_SUFFIXES or p.name in PUBLIC_CONSTANT_FILES

    files = sorted(p for p in src.iterdir() if p.is_file())
    left = [p.name for p in files if not copied(p) and p.suffix not in PICKLE_SUFFIXES
            and p.suffix != ".safetensors"]
    if left:
        log.warning("convert-weights: not copied from %s: %s", src, ", ".join(left[:5]))
    return [p for p in files if copied(p)]


def _convert_shards(shards: list[Path], dst: Path) -> int:
    """Each shard as ``model-0000i-of-0000N.safetensors``, and their index; the tensor count."""
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    written: list[Path] = []
    try:
        for i, shard in enumerate(shards, start=1):
            state = _read_pickle_state(shard)
            twice = sorted(state.keys() & weight_map.keys())
            if twice:
                raise FoundationLoadError(f"{twice[0]} is in two shards ({shard.name} and an "
                                          f"earlier one; {len(twice)} tensors)")
            written.append(dst / f"model-{i:05d}-of-{len(shards):05d}.safetensors")
            _save(state, written[-1])
            weight_map |= dict.fromkeys(state, written[-1].name)
            total += sum(v.numel() * v.element_size() for v in state.values())
            del state                       # before the next shard is read
    except FoundationLoadError:
        for path in written:         # no half-converted checkpoint left behind
            path.unlink(missing_ok=True)
        if created:
            dst.rmdir()
        raise
    (dst / SAFETENSORS_INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2) + "\n")
    return len(weight_map)


def _save(state: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage (tied weights)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})


__all__ = ["PICKLE_INDEX_SUFFIX", "SAFETENSORS_INDEX", "convert_weights"]
