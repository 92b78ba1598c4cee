"""Backbone weights in and out of a local directory, in the Hugging Face ``save_pretrained``
layout: ``config.json`` + ``model.safetensors`` (``pytorch_model.bin`` is read too).

Never a hub: a directory is all there is. A model version exported from MLflow and a
backbone to start from are the same format, so ``model.pretrained=DIR`` takes either.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor

from .vit import MultiModalViT, ViTConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"
MODEL_TYPE = "medfed-mmvit"
# Fields that change the backbone's weights; a pretrained backbone must agree on all of them.
ARCHITECTURE = ("spatial_dims", "img_size", "patch_size", "num_sequences", "dim", "depth",
                "heads", "mlp_ratio", "sequence_fusion", "input_center")


class PretrainedError(ValueError):
    """The directory does not hold weights this backbone can start from; says why."""


def save_pretrained(backbone: MultiModalViT, directory: str | Path, *,
                    extra: dict | None = None) -> Path:
    """Write ``backbone`` (a plain ViT; merge adapters first) and its config to ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPE, "model_name": "mmvit",
              "config": dataclasses.asdict(backbone.config)} | dict(extra or {})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


def load_pretrained(directory: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """``(config.json contents, backbone state dict)`` from a local directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PretrainedError(f"pretrained weights directory {directory} does not exist")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise PretrainedError(f"{directory} has no {CONFIG_FILE} (expected the save_pretrained "
                              "layout: config.json + model.safetensors)")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise PretrainedError(f"{config_path} is not valid JSON: {err}") from None
    if config.get("model_type") != MODEL_TYPE or not isinstance(config.get("config"), dict):
        raise PretrainedError(f"{config_path} does not describe a MedFed backbone "
                              f"(model_type {config.get('model_type')!r}, expected {MODEL_TYPE!r})")
    if (directory / WEIGHTS_FILE).is_file():
        from safetensors.torch import load_file

        state = load_file(str(directory / WEIGHTS_FILE))
    elif (directory / TORCH_WEIGHTS_FILE).is_file():
        state = torch.load(directory / TORCH_WEIGHTS_FILE, map_location="cpu", weights_only=True)
    else:
        raise PretrainedError(f"{directory} has neither {WEIGHTS_FILE} nor {TORCH_WEIGHTS_FILE}")
    return config, state


def check_compatible(saved: dict, options: dict) -> None:
    """Refuse a backbone whose architecture differs from the configured model's."""
    ours = dataclasses.asdict(ViTConfig(**options))
    # A field newer than the saved config (e.g. sequence_fusion) had its default when it was saved.
    theirs = dataclasses.asdict(ViTConfig()) | saved.get("config", {})
    different = {k: (theirs.get(k), ours[k]) for k in ARCHITECTURE if theirs.get(k) != ours[k]}
    if different:
        raise PretrainedError("pretrained backbone does not match model.options: " + ", ".join(
            f"{k} {a!r} (saved) != {b!r} (configured)" for k, (a, b) in different.items()))
