"""What of a foundation backbone trains: LoRA / DoRA / IA3 adapters (``peft``), everything,
or the head only; which keys are frozen; and a digest of the frozen base weights.

Whatever the method, the parts the adaptation created (per-channel patch embeddings, channel
embedding, the optional presence embedding, head) train - except for a linear probe, where only
the head does. Frozen weights never change at a site, so they never travel; the coordinator
puts their digest in every job and a site checks it each time it builds the model from its
own copy (client/foundation.py), so every site trains from the same base weights.

DP-SGD: LoRA's ``lora_A``/``lora_B`` are ``nn.Linear`` and covered by the exact per-sample
rule. DoRA's magnitude vector and IA3's scaling vector are parameters of peft's own layer
classes, with their own exact rules in ``client/privacy/adapter_grads.py`` (IA3 as built here,
scaling outputs; feed-forward IA3 or other peft layouts are refused by name, never clipped
wrongly).
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from torch import nn

from .adapt import FoundationBackbone
from .config import METHODS

# Parts of FoundationBackbone that the adaptation itself created.
NEW_PARTS = ("patch_embed", "channel_embed", "presence_embed", "head")


def target_pattern(targets: tuple[str, ...], *, within: str = "encoder") -> str:
    """Regex (peft matches it against full module names) for the named projections inside
    the pretrained encoder only - never our own patch embeddings or head. ``within=""``:
    the same projections with the encoder itself as the root (an exported adapter)."""
    names = "|".join(re.escape(t) for t in targets)
    prefix = rf"{re.escape(within)}\." if within else ""
    return rf"{prefix}(.*\.)?({names})"


def apply_method(model: FoundationBackbone, method: str, *, rank: int = 8, alpha: float = 16.0,
                 targets: tuple[str, ...] = (), dropout: float = 0.0,
                 freeze_patch_embed: bool = False, freeze_lora_a: bool = False
                 ) -> FoundationBackbone:
    """Set what trains in ``model`` (in place) and return it.

    Parameters
    ----------
    method : str
        ``lora`` | ``dora`` | ``ia3`` (adapters on ``targets`` + new parts), ``full``
        (everything but dead weights), ``linear_probe`` (head only).
    targets : tuple of str
        Module-name suffixes to adapt; empty = the family's default attention projections.
    freeze_patch_embed : bool
        Keep the new patch embedding(s) at their pretrained-derived init whatever the method
        (the channel and presence embeddings still train). Frozen weights never travel and
        are in ``frozen_digest``; under DP-SGD the noise then spreads over fewer coordinates
        (the fused embedding is ~2/3 of a rank-8 LoRA model's trainable coordinates).
    freeze_lora_a : bool
        LoRA/DoRA only: every ``lora_A`` stays at its init (``fixed_init_``: drawn from its
        name, the same at every site and the server, which ``frozen_digest`` checks) and only
        ``lora_B`` trains - FFA-LoRA
        (Sun et al., ICLR 2024). With LoRA, averaging the sites' B then averages their
        updates B A exactly (averaging A and B apart does not; DoRA's normalisation is not
        linear in B), and DP-SGD noises half the adapter coordinates. B starts at zero, so the adapted model starts as the base one.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    model = _set_method(model, method, rank=rank, alpha=alpha, targets=targets,
                        dropout=dropout)
    if freeze_patch_embed:
        model.patch_embed.requires_grad_(False)
    if freeze_lora_a:
        if method not in ("lora", "dora"):
            raise ValueError(f"freeze_lora_a needs method lora or dora, not {method!r}")
        for name, p in model.named_parameters():
            if ".lora_A." in name:
                fixed_init_(name, p)
                p.requires_grad_(False)
    return model


@torch.no_grad()
def fixed_init_(name: str, weight: nn.Parameter) -> None:
    """Draw ``weight`` (a ``lora_A``) as peft does (Kaiming-uniform, a = sqrt(5)) from a
    generator seeded by its parameter ``name`` alone: every site and the server build the same
    A whatever their RNG has drawn before (the frozen-base digest checks it), and no seed
    travels. Drawn on the CPU in float32 and copied: the same values on any device; a model
    sized on the meta device (the config check, the site's size limits) has none to draw."""
    if weight.is_meta:
        return
    seed = int.from_bytes(hashlib.sha256(f"medfed.lora_A:{name}".encode()).digest()[:8], "little")
    drawn = torch.empty(weight.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    weight.copy_(drawn)


def _set_method(model: FoundationBackbone, method: str, *, rank: int, alpha: float,
                targets: tuple[str, ...], dropout: float) -> FoundationBackbone:
    """``apply_method`` without ``freeze_patch_embed``."""
    if method == "full":
        return model        # dead weights were frozen when the backbone was built
    targets = tuple(targets) or model.seams.lora_targets
    if method in ("lora", "dora"):
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                            use_dora=method == "dora", target_modules=target_pattern(targets))
        model = inject_adapter_in_model(config, model)      # freezes all but the adapters
    elif method == "ia3":
        from peft import IA3Config, inject_adapter_in_model

        # No feed-forward modules: IA3 scales the outputs of the attention projections.
        config = IA3Config(target_modules=target_pattern(targets), feedforward_modules=[])
        model = inject_adapter_in_model(config, model)
    if method == "linear_probe":
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        return model
    for part in NEW_PARTS:
        if getattr(model, part) is not None:   # fused: no channel_embed; presence optional
            getattr(model, part).requires_grad_(True)
    return model


def adapt_tower(tower: nn.Module, method: str, *, rank: int = 8, alpha: float = 16.0,
                targets: tuple[str, ...] = (), dropout: float = 0.0) -> nn.Module:
    """Set what trains in a pretrained companion tower (CLIP/SigLIP's text tower) the way
    ``apply_method`` does for the vision encoder: adapters on ``targets`` (everything else
    frozen), or everything (``full``). Returns the tower (changed in place)."""
    if method == "full":
        return tower.requires_grad_(True)
    if method not in ("lora", "dora", "ia3"):
        raise ValueError(f"method {method!r} cannot adapt a companion tower; use lora, dora, "
                         "ia3 or full")
    from peft import IA3Config, LoraConfig, inject_adapter_in_model

    pattern = target_pattern(targets, within="")
    config = (IA3Config(target_modules=pattern, feedforward_modules=[]) if method == "ia3"
              else LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                              use_dora=method == "dora", target_modules=pattern))
    return inject_adapter_in_model(config, tower)      # freezes all but the adapters


def trainable_keys(model: nn.Module) -> list[str]:
    """Names of parameters that train (what a site sends back)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def frozen_keys(model: nn.Module) -> list[str]:
    """Names of parameters that never change at a site."""
    return [name for name, p in model.named_parameters() if not p.requires_grad]


def frozen_digest(model: nn.Module) -> str:
    """sha256 (hex) over the frozen parameters in sorted name order: name, dtype, shape and
    raw bytes of each. Equal digests mean bit-identical frozen base weights."""
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(frozen_keys(model)):
        t = params[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


__all__ = ["NEW_PARTS", "adapt_tower", "apply_method", "frozen_digest", "frozen_keys",
           "target_pattern", "trainable_keys"]
