"""Load a pretrained vision encoder from a LOCAL directory, refusing anything unexpected.

Never a hub: ``local_files_only=True`` on every Hugging Face call, and a directory that does
not exist is refused before transformers could read the name as a hub id. The architecture
comes from the directory's ``config.json`` (``model_type`` -> family) and the weights must fit
it exactly: transformers only warns about missing or unexpected keys, we refuse. Weights are
read only from ``*.safetensors``; a pickle checkpoint (``pytorch_model.bin``, ``.pt``, ``.pth``)
can run code when unpickled, so it is refused with the command that converts it
(``convert_weights`` here, ``medfed convert-weights SRC DST`` on the command line).

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
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

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
# torch's weights_only refusal names the object: "Unsupported global: GLOBAL argparse.Namespace"
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]{0,199})")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SAVE_STATE_DICT = ("save only the state dict (torch.save(model.state_dict(), path)) and "
                    "convert that")
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
            f"(models.foundation.loading.convert_weights; SRC may be a MONAI bundle) and "
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
    if is_timm_config(config):
        loaded = load_timm_vit(directory, config)
    elif model_type in monai_nets.MONAI_CLASSES:
        loaded = _load_monai(directory, config, files)
    else:
        loaded = _load_hf(directory, model_type)
    if expected_family and loaded.family != expected_family:
        raise FoundationLoadError(f"{directory} holds a {loaded.family} encoder, but the "
                                  f"configuration expects {expected_family}")
    loaded.encoder.eval()
    return loaded


def _refuse_mismatch(directory: Path, missing, unexpected, mismatched) -> None:
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected),
                       ("wrong shape", mismatched)):
        keys = sorted(str(k) for k in keys)
        if keys:
            problems.append(f"{what} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                            f" ({len(keys)})")
    if problems:
        raise FoundationLoadError(f"weights in {directory} do not match its {CONFIG_FILE}: "
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


def _load_hf(directory: Path, model_type: str) -> LoadedEncoder:
    import transformers

    class_name, tower, family = HF_MODEL_TYPES[model_type]
    architectures = json.loads((directory / CONFIG_FILE).read_text()).get("architectures") or []
    if model_type == "vit_mae" and MAE_PRETRAINING in architectures:
        class_name, tower = MAE_PRETRAINING, "vit"     # the decoder's weights are there too
    cls = getattr(transformers, class_name)
    if torch.get_default_device().type == "meta":
        # shapes only (a site sizing a job's model before it allocates anything):
        # transformers refuses from_pretrained here; the same model from its config
        model = cls(cls.config_class.from_pretrained(str(directory), local_files_only=True))
    else:
        # ignore_mismatched_sizes=True only so transformers reports the mismatch to us
        # instead of raising a multi-line error; we refuse any mismatch just below (so its
        # own load report - a table that reads as "re-initialised" - and bars stay quiet).
        with _quiet_transformers():
            model, info = cls.from_pretrained(str(directory), local_files_only=True,
                                              use_safetensors=True, output_loading_info=True,
                                              ignore_mismatched_sizes=True)
        mismatched = [m[0] if isinstance(m, tuple) else m
                      for m in info.get("mismatched_keys", ())]
        _refuse_mismatch(directory, info.get("missing_keys", ()),
                         info.get("unexpected_keys", ()), mismatched)
        if info.get("error_msgs"):
            raise FoundationLoadError(f"weights in {directory} failed to load: "
                                      f"{info['error_msgs'][0]}")
    encoder = getattr(model, tower) if tower else model
    companions = {name: getattr(model, name) for name in COMPANIONS.get(class_name, ())}
    return LoadedEncoder(family, encoder, seams_for(family), directory=directory,
                         companions=companions)


def _load_monai(directory: Path, config: dict, files: list[Path]) -> LoadedEncoder:
    model_type = config["model_type"]
    cls = monai_nets.MONAI_CLASSES[model_type][0]
    if not isinstance(config.get("constructor"), dict):
        raise FoundationLoadError(f"{directory / CONFIG_FILE} has no 'constructor' object with "
                                  f"the monai.networks.nets.{cls} arguments")
    args = monai_nets.check_constructor(model_type, config["constructor"], str(directory))
    model = monai_nets.load_network(directory, model_type, args, files)
    return LoadedEncoder(model_type, model, seams_for(model_type, **args),
                         constructor=dict(args), directory=directory)


def save_monai_vit(model: nn.Module, constructor: dict, directory: str | Path) -> Path:
    """Write a MONAI ``ViT`` built with ``ViT(**constructor)`` in the layout ``load_encoder``
    reads (``monai_nets.save_monai``)."""
    return monai_nets.save_monai(model, constructor, directory, model_type=MONAI_MODEL_TYPE)


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
    """Convert a pickle checkpoint to ``DST/model.safetensors`` without running its code.

    ``src`` is a checkpoint file or a directory holding exactly one; JSON files next to it
    (``config.json``, preprocessor configs) are copied, so DST is loadable as it stands.
    ``torch.load(weights_only=True)`` unpickles tensors and plain containers only.
    A checkpoint saved as ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.
    A MONAI bundle directory becomes a bundle again, its ``models/model.pt`` as
    ``models/model.safetensors`` (``bundle.convert_bundle``).
    A ``dst`` that exists and is not an empty directory is refused unless ``force``, which
    writes into it, replacing the weights and configs of the same names.
    """
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.exists() and not force and not (dst.is_dir() and not any(dst.iterdir())):
        raise FoundationLoadError(f"{dst} already exists and is not empty; remove it, choose "
                                  "another DST or pass --force to write into it")
    if src.is_dir() and bundle.is_bundle(src):
        return bundle.convert_bundle(src, dst, _read_pickle_state)
    if src.is_dir():
        candidates = sorted(p for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if len(candidates) != 1:
            raise FoundationLoadError(f"{src} must hold exactly one pickle checkpoint "
                                      f"({', '.join(PICKLE_SUFFIXES)}), found {len(candidates)}")
        file, folder = candidates[0], src
    elif src.is_file():
        file, folder = src, src.parent
    else:
        raise FoundationLoadError(f"{src} does not exist")
    state = _read_pickle_state(file)
    dst.mkdir(parents=True, exist_ok=True)
    for extra in folder.glob("*.json"):
        if extra.parent != dst:
            (dst / extra.name).write_text(extra.read_text())
    # clone: safetensors refuses tensors that share storage (tied weights)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()},
              str(dst / WEIGHTS_FILE), metadata={"format": "pt"})
    log.info("converted %d tensors to safetensors", len(state))
    return dst


__all__ = ["CONVERT_COMMAND", "FEATURE_MEAN_FILE", "FEATURE_PROJECTION_FILE", "FEATURE_SCALE_FILE",
           "FoundationLoadError", "LoadedEncoder", "convert_weights", "family_of", "load_encoder", "save_monai_vit",
           "supported_model_types"]
