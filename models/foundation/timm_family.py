"""The timm family: ``TimmViT``'s seams (``families.FamilySeams``), and reading / writing a
timm ViT directory in timm's hub layout (``config.json`` + ``model.safetensors``).

Loaded strictly: the architecture comes from config.json (``timm_vit.parse_config``), and every
key and shape of the weights must be the ones it gives; the export writes the same config.json
and timm's key names back, so ``timm.create_model("local-dir:DIR", pretrained=True)`` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from .timm_vit import TIMM_FAMILY, TimmViT, parse_config, resample_positions
from .coverage import FULL_NOT_COVERED


class TimmViTSeams:
    """``families.FamilySeams`` of ``TimmViT``. Registers are the encoder's own business:
    ``encode`` inserts them after the class token and drops them from its output, so the
    backbone sees ``[CLS] + patches`` as for every other family. With ``fc_norm`` (average
    pooling) timm normalises only the pooled vector; a LayerNorm is per token, so it is
    applied to every token here (as CLIP's ``post_layernorm`` in ``CLIPSeams``)."""

    name = TIMM_FAMILY
    lora_targets = ("qkv",)
    dp_unsupported = None
    dp_refused_methods = FULL_NOT_COVERED
    masks_tokens = True

    def __init__(self, has_cls: bool = True):
        self._has_cls = has_cls       # instance-level, like MONAI's: read from the config

    @property
    def has_cls(self) -> bool:
        return self._has_cls

    def patch_size(self, encoder):
        return encoder.config.patch_size

    def hidden_size(self, encoder):
        return encoder.config.embed_dim

    def patch_kernel(self, encoder):
        conv = encoder.patch_embed.proj
        return conv.weight, conv.bias

    def cls_token(self, encoder):
        return encoder.cls_token

    def _split_positions(self, encoder) -> tuple[Tensor | None, Tensor]:
        """``(prefix positions [1, P, D] or None, patch positions [1, G*G, D])``."""
        if encoder.config.no_embed_class:
            return None, encoder.pos_embed
        p = encoder.config.num_prefix_tokens
        return encoder.pos_embed[:, :p], encoder.pos_embed[:, p:]

    def position_embedding(self, encoder, grid):
        prefix, patches = self._split_positions(encoder)
        pos = resample_positions(patches, grid)
        if not self._has_cls:
            return None, pos
        return (torch.zeros_like(pos[:, :1]) if prefix is None else prefix[:, :1]), pos

    def blocks(self, encoder):
        return list(encoder.blocks)

    def registers(self, encoder):
        return int(encoder.config.reg_tokens)

    def encode(self, encoder, tokens, attend, num_channels, grid):
        cls, regs = int(self._has_cls), encoder.config.reg_tokens
        if regs:                                       # [B, cls + R + S*N, D]
            prefix, _ = self._split_positions(encoder)
            reg = encoder.reg_token if prefix is None else encoder.reg_token + prefix[:, cls:]
            tokens = torch.cat([tokens[:, :cls], reg.to(tokens.dtype).expand(len(tokens), -1, -1),
                                tokens[:, cls:]], dim=1)
            attend = torch.cat([attend[:, :cls], attend.new_ones(len(attend), regs),
                                attend[:, cls:]], dim=1)
        x = encoder.norm_pre(tokens)
        for block in encoder.blocks:
            x = block(x, attend)       # positional: per-sample hooks see plain calls
        x = encoder.fc_norm(encoder.norm(x))
        return torch.cat([x[:, :cls], x[:, cls + regs:]], dim=1) if regs else x

    def unused(self, encoder):
        return [encoder.patch_embed.proj] + ([encoder.head] if isinstance(encoder.head, nn.Linear)
                                             else [])

    def batch_major_folds(self, encoder):
        return ()        # one row per sample in every layer


def load_timm_vit(directory: Path, config: dict):
    """``loading.LoadedEncoder`` of the timm ViT in ``directory`` (strict: every key, every
    shape); ``constructor`` keeps config.json for the export."""
    from safetensors.torch import load_file

    from .loading import (CONFIG_FILE, FoundationLoadError, LoadedEncoder, check_state_shapes,
                          check_weight_files)

    try:
        cfg = parse_config(config)
    except ValueError as err:
        raise FoundationLoadError(f"{directory / CONFIG_FILE}: {err}") from None
    files = check_weight_files(directory)
    with torch.device("meta"):           # every tensor is replaced by the checkpoint's
        model = TimmViT(cfg)
    check_state_shapes(directory, model, files)         # headers only: before any data
    if torch.get_default_device().type != "meta":   # meta: config load, a site sizing a job
        state: dict[str, Tensor] = {}
        for path in files:
            state |= load_file(str(path))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True,
                              assign=True)
    return LoadedEncoder(TIMM_FAMILY, model, TimmViTSeams(has_cls=cfg.class_token),
                         constructor=dict(config), directory=directory)


def save_timm_vit(model: TimmViT, config: dict, directory: str | Path) -> Path:
    """Write ``model`` in timm's hub layout: ``config`` (the loaded config.json) and
    ``model.safetensors`` with timm's key names - ``timm.create_model("local-dir:...")``
    and ``load_timm_vit`` both read it."""
    from safetensors.torch import save_file

    from .loading import CONFIG_FILE, WEIGHTS_FILE

    if parse_config(config) != model.config:
        raise ValueError("config.json does not describe this timm model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


__all__ = ["TimmViTSeams", "load_timm_vit", "save_timm_vit"]
