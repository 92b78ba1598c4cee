"""Load a pretrained vision encoder from a LOCAL directory, refusing anything unexpected.

Never a hub: ``local_files_only=True`` on every Hugging Face call, and a directory that does
not exist is refused before transformers could read the name as a hub id. The architecture
comes from the directory's ``config.json`` (``model_type`` -> family) and the weights must fit
it exactly: transformers only warns about missing or unexpected keys, we refuse. On the meta
device (config load, ``check_weights_fit``; a site sizing a job) the same check runs on the
safetensors headers (names and shapes, no tensor data read): a config.json edited away from its
weights is refused there, not first when the weights load. Weights are read only from
``*.safetensors``; a pickle checkpoint (``pytorch_model.bin``, ``.pt``, ``.pth``) can run code
when unpickled, so it is refused with the command that converts it (``convert.convert_weights``,
``medfed convert-weights SRC DST`` on the command line).

MONAI networks have no ``save_pretrained``: their directory is our own small format
(``monai_nets.save_monai``: ``config.json`` = ``{"model_type": "monai_vit", "constructor":
{...}}`` + ``model.safetensors``) or a MONAI bundle (``bundle.py``: ``configs/inference.json``'s
``network_def`` + ``models/model.safetensors``), read without running anything. A timm ViT's
directory is timm's hub layout (``config.json`` with an ``architecture``, no ``model_type``),
read without timm by ``timm_family``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import bundle, monai_nets
from .families import FamilySeams, seams_for
from .timm_family import load_timm_vit
from .timm_vit import TIMM_FAMILY, is_timm_config, parse_config as parse_timm_config

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# A public mean of the pooled features (centring.py), beside the weights: never a weight file.
FEATURE_MEAN_FILE = "feature_mean.safetensors"
# A public per-dimension spread of the pooled features (centring.py): never a weight file.
FEATURE_SCALE_FILE = "feature_scale.safetensors"
# Public principal directions of the pooled features (projection.py): never a weight file.
FEATURE_PROJECTION_FILE = "feature_projection.safetensors"
PUBLIC_CONSTANT_FILES = (FEATURE_MEAN_FILE, FEATURE_SCALE_FILE, FEATURE_PROJECTION_FILE)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CONVERT_COMMAND = "medfed convert-weights SRC DST"
MONAI_MODEL_TYPE = monai_nets.VIT_TYPE
WEIGHTS_INDEX = "model.safetensors.index.json"      # a sharded checkpoint's shard names
# model_type in config.json -> (transformers class, attribute holding the vision encoder or
# "" for the model itself, family)
HF_MODEL_TYPES: dict[str, tuple[str, str, str]] = {
    "dinov2": ("Dinov2Model", "", "dinov2"),
    "dinov2_with_registers": ("Dinov2WithRegistersModel", "", "dinov2_with_registers"),
    "dinov3_vit": ("DINOv3ViTModel", "", "dinov3"),
    "vit": ("ViTModel", "", "vit"),
    "vit_mae": ("ViTMAEModel", "", "vit_mae"),
    "clip_vision_model": ("CLIPVisionModel", "", "clip"),
    "clip": ("CLIPModel", "vision_model", "clip"),
    "siglip_vision_model": ("SiglipVisionModel", "", "siglip"),
    "siglip": ("SiglipModel", "vision_model", "siglip"),
    "sam_vision_model": ("SamVisionModel", "vision_encoder", "sam"),
    "sam": ("SamModel", "vision_encoder", "sam"),
}
# A ViTMAE directory saved from ViTMAEForPreTraining also holds the MAE decoder.
MAE_PRETRAINING = "ViTMAEForPreTraining"
# Attribute of the full model -> companion name, per family (see LoadedEncoder.companions).
COMPANIONS: dict[str, tuple[str, ...]] = {
    "CLIPModel": ("text_model", "text_projection", "visual_projection", "logit_scale"),
    "SiglipModel": ("text_model", "logit_scale", "logit_bias"),
    MAE_PRETRAINING: ("decoder",),
}
# The constructor arguments of monai.networks.nets.ViT a checkpoint may set.
MONAI_ARGS = monai_nets.MONAI_CLASSES[MONAI_MODEL_TYPE][1]


class FoundationLoadError(ValueError):
    """The directory does not hold an encoder we can load exactly; the message says why."""


@dataclass
class LoadedEncoder:
    family: str                 # a key of families.FAMILIES
    encoder: nn.Module          # the vision encoder only (a CLIP/SigLIP/SAM tower)
    seams: FamilySeams
    # MONAI's ViT keeps its constructor arguments nowhere else; export writes them back out.
    constructor: dict | None = None
    directory: Path | None = None   # where it was loaded from (this side's own directory)
    # Pretrained parts beside the vision encoder that only a pretraining objective uses
    # (COMPANIONS): a CLIP/SigLIP text tower, MAE's decoder. Not submodules of the encoder,
    # so supervised fine-tuning never holds, digests or sends them.
    companions: dict[str, nn.Module | nn.Parameter] = field(default_factory=dict)


def supported_model_types() -> list[str]:
    return sorted([*HF_MODEL_TYPES, *monai_nets.MONAI_CLASSES]) + [
        f"{TIMM_FAMILY} (an 'architecture')"]


def read_config(directory: str | Path) -> dict:
    """``config.json`` of a weights directory, with one-line errors."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FoundationLoadError(f"foundation weights directory {directory} does not exist "
                                  "(it must be a local directory; hub ids are never fetched)")
    path = directory / CONFIG_FILE
    if not path.is_file() and bundle.is_bundle(directory):
        return bundle.read_bundle_config(directory)
    if not path.is_file():
        raise FoundationLoadError(f"{directory} has no {CONFIG_FILE}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise FoundationLoadError(f"{path} is not valid JSON: {err}") from None
    if is_timm_config(config):
        try:
            parse_timm_config(config)       # refuse an unrepresentable architecture here
        except (TypeError, ValueError) as err:
            raise FoundationLoadError(f"{path}: {err}") from None
        return config
    model_type = config.get("model_type")
    if model_type not in HF_MODEL_TYPES and model_type not in monai_nets.MONAI_CLASSES:
        raise FoundationLoadError(f"unsupported model_type {model_type!r} in {path}; supported: "
                                  f"{', '.join(supported_model_types())}")
    return config


def family_of(directory: str | Path) -> str:
    """The encoder family a weights directory holds, from its ``config.json``."""
    config = read_config(directory)
    if is_timm_config(config):
        return TIMM_FAMILY
    model_type = config["model_type"]
    return model_type if model_type in monai_nets.MONAI_CLASSES else HF_MODEL_TYPES[model_type][2]


def check_weight_files(directory: Path) -> list[Path]:
    """The ``*.safetensors`` files (a bundle's in ``models/``); refuse pickle-only
    directories with the conversion command."""
    if bundle.is_bundle(directory):
        directory = bundle.weights_dir(directory)
        if not directory.is_dir():
            raise FoundationLoadError(f"MONAI bundle has no {bundle.MODELS_DIR}/ directory")
    safe = sorted(p for p in directory.glob("*.safetensors")
                  if p.name not in PUBLIC_CONSTANT_FILES)
    if safe:
        return safe
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise FoundationLoadError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}), which are refused "
            f"because unpickling can run code; convert them with `{CONVERT_COMMAND}` "
            f"(models.foundation.convert.convert_weights; SRC may be a MONAI bundle) and "
            "point to DST")
    raise FoundationLoadError(f"{directory} has no *.safetensors weights")


def load_encoder(directory: str | Path, *, expected_family: str = "") -> LoadedEncoder:
    """Load the vision encoder in ``directory`` exactly (every key present, no extra key,
    every shape as the config says), in evaluation mode.

    Parameters
    ----------
    directory : str or Path
        A local ``save_pretrained`` directory (or ``save_monai_vit`` for MONAI).
    expected_family : str
        If set, the directory must hold this family.

    Raises
    ------
    FoundationLoadError
        Missing directory/config, unsupported class, pickle weights, weights not matching
        the config.
    """
    directory = Path(directory)
    config = read_config(directory)
    files = check_weight_files(directory)
    model_type = config.get("model_type")
    if model_type in monai_nets.NOT_A_BACKBONE:
        raise FoundationLoadError(f"{directory}: {monai_nets.NOT_A_BACKBONE[model_type]}")
    loaded = _load_family(directory, config, files)
    if expected_family and loaded.family != expected_family:
        raise FoundationLoadError(f"{directory} holds a {loaded.family} encoder, but the "
                                  f"configuration expects {expected_family}")
    loaded.encoder.eval()
    return loaded


def check_weights_fit(directory: str | Path) -> None:
    """Refuse, in one line, a directory whose weight files do not fit its config: the
    family's own loader on the meta device, which compares the names and shapes in the
    safetensors headers with the model the config builds. No tensor data is read (config
    load calls this; ``load_encoder`` applies the same rule when it loads them)."""
    directory = Path(directory)
    config = read_config(directory)
    files = check_weight_files(directory)
    with torch.device("meta"):
        if config.get("model_type") in monai_nets.MONAI_CLASSES:    # SwinUNETR too
            monai_nets.load_network(directory, config["model_type"],
                                    _monai_args(directory, config), files)
        else:
            _load_family(directory, config, files)


def _load_family(directory: Path, config: dict, files: list[Path]) -> LoadedEncoder:
    if is_timm_config(config):
        return load_timm_vit(directory, config)
    if config["model_type"] in monai_nets.MONAI_CLASSES:
        return _load_monai(directory, config, files)
    return _load_hf(directory, config["model_type"], files)


def weight_shapes(files: Sequence[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors headers of ``files`` (no tensor data read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        except Exception as err:       # safetensors' own error type: its reason, one line
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise FoundationLoadError(f"{path} is not a readable safetensors file: "
                                      f"{reason}") from None
    return shapes


def check_state_shapes(directory: Path, model: nn.Module, files: Sequence[Path]) -> None:
    """Refuse (one line) unless the headers of ``files`` hold exactly ``model``'s state-dict
    names, each with its shape: the check of every loader that maps no keys (MONAI, timm)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = weight_shapes(files)
    mismatched = [(k, found[k], expected[k]) for k in expected.keys() & found.keys()
                  if found[k] != expected[k]]
    _refuse_mismatch(directory, expected.keys() - found.keys(), found.keys() - expected.keys(),
                     mismatched)


def _refuse_mismatch(directory: Path, missing, unexpected,
                     mismatched: Sequence[tuple[str, Sequence[int], Sequence[int]]]) -> None:
    """One line for every way the weights differ from the config's model; ``mismatched``
    holds ``(name, shape in the file, shape the config gives)``."""
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        keys = sorted(str(k) for k in keys)
        if keys:
            problems.append(f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                            f" ({len(keys)})")
    source = bundle.NETWORK_KEY if bundle.is_bundle(directory) else CONFIG_FILE
    if mismatched:
        name, file_shape, config_shape = sorted(mismatched, key=lambda m: str(m[0]))[0]
        problems.append(f"wrong shape {name}: {source} gives {list(config_shape)}, the "
                        f"file holds {list(file_shape)} ({len(mismatched)} tensors)")
    if problems:
        raise FoundationLoadError(f"weights in {directory} do not match its {source}: "
                                  + "; ".join(problems))


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' own load output off (its load report, warnings and progress bars):
    every missing, unexpected or mismatched key is refused here in one line instead."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _hf_weight_files(directory: Path, files: list[Path]) -> list[Path]:
    """The safetensors files transformers' own load reads: ``model.safetensors`` when there,
    else the shards its index names, else every one (another file beside them, such as an
    open_clip copy, is not the model's)."""
    if (directory / WEIGHTS_FILE).is_file():
        return [directory / WEIGHTS_FILE]
    if (directory / WEIGHTS_INDEX).is_file():
        try:
            names = set(json.loads((directory / WEIGHTS_INDEX).read_text())["weight_map"]
                        .values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise FoundationLoadError(f"{directory / WEIGHTS_INDEX} is not a weight "
                                      "index") from None
        by_name = {p.name: p for p in files}
        if not names or not names <= by_name.keys():
            raise FoundationLoadError(f"{directory / WEIGHTS_INDEX} names shards that are "
                                      f"not safetensors files of {directory}")
        return [by_name[n] for n in sorted(names)]
    return files


def _load_hf(directory: Path, model_type: str, files: list[Path]) -> LoadedEncoder:
    import transformers

    class_name, tower, family = HF_MODEL_TYPES[model_type]
    architectures = json.loads((directory / CONFIG_FILE).read_text()).get("architectures") or []
    if model_type == "vit_mae" and MAE_PRETRAINING in architectures:
        class_name, tower = MAE_PRETRAINING, "vit"     # the decoder's weights are there too
    cls = getattr(transformers, class_name)
    # ignore_mismatched_sizes=True only so transformers reports the mismatch to us instead
    # of raising a multi-line error; we refuse any mismatch just below (so its own load
    # report - a table that reads as "re-initialised" - and bars stay quiet).
    try:
        config = cls.config_class.from_pretrained(str(directory), local_files_only=True)
    except (ValueError, TypeError, KeyError) as err:   # transformers' own config checks
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FoundationLoadError(f"{directory / CONFIG_FILE}: transformers refuses it "
                                  f"({reason[:200]})") from None
    report = {"config": config, "output_loading_info": True, "ignore_mismatched_sizes": True}
    with _quiet_transformers():
        if torch.get_default_device().type == "meta":
            # shapes only (config load, a site sizing a job): transformers' own key mapping
            # and shape check, fed meta tensors shaped as the files' headers say
            state = {k: torch.empty(shape, device="meta")
                     for k, shape in weight_shapes(_hf_weight_files(directory, files)).items()}
            model, info = cls.from_pretrained(None, state_dict=state, device_map="meta",
                                              **report)
        else:
            model, info = cls.from_pretrained(str(directory), local_files_only=True,
                                              use_safetensors=True, **report)
    mismatched = [m if isinstance(m, tuple) and len(m) == 3 else (m, "?", "?")
                  for m in info.get("mismatched_keys", ())]
    _refuse_mismatch(directory, info.get("missing_keys", ()), info.get("unexpected_keys", ()),
                     mismatched)
    if info.get("error_msgs"):
        raise FoundationLoadError(f"weights in {directory} failed to load: "
                                  f"{info['error_msgs'][0]}")
    encoder = getattr(model, tower) if tower else model
    companions = {name: getattr(model, name) for name in COMPANIONS.get(class_name, ())}
    return LoadedEncoder(family, encoder, seams_for(family), directory=directory,
                         companions=companions)


def _monai_args(directory: Path, config: dict) -> dict:
    cls = monai_nets.MONAI_CLASSES[config["model_type"]][0]
    if not isinstance(config.get("constructor"), dict):
        raise FoundationLoadError(f"{directory / CONFIG_FILE} has no 'constructor' object with "
                                  f"the monai.networks.nets.{cls} arguments")
    return monai_nets.check_constructor(config["model_type"], config["constructor"],
                                        str(directory))


def _load_monai(directory: Path, config: dict, files: list[Path]) -> LoadedEncoder:
    model_type = config["model_type"]
    args = _monai_args(directory, config)
    model = monai_nets.load_network(directory, model_type, args, files)
    return LoadedEncoder(model_type, model, seams_for(model_type, **args),
                         constructor=dict(args), directory=directory)


def save_monai_vit(model: nn.Module, constructor: dict, directory: str | Path) -> Path:
    """Write a MONAI ``ViT`` built with ``ViT(**constructor)`` in the layout ``load_encoder``
    reads (``monai_nets.save_monai``)."""
    return monai_nets.save_monai(model, constructor, directory, model_type=MONAI_MODEL_TYPE)


__all__ = ["CONVERT_COMMAND", "FEATURE_MEAN_FILE", "FEATURE_PROJECTION_FILE", "FEATURE_SCALE_FILE",
           "FoundationLoadError", "LoadedEncoder", "check_state_shapes", "check_weights_fit",
           "family_of", "load_encoder", "save_monai_vit", "supported_model_types",
           "weight_shapes"]
