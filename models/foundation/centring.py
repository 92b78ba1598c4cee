"""A PUBLIC mean of the pooled features, subtracted before the head (``centre_features``).

Why: the pooled features of a pretrained encoder share a large common component (session 21,
bench/RESULTS.md "DP-LoRA at epsilon 8": norm ~15 against a per-study spread of ~3), so the
head's per-sample gradient is dominated by it and DP-SGD's clipping spends its budget on a
direction every study agrees on. Subtracting a mean computed on PUBLIC data (never a site's)
removes it without touching privacy: the mean is a fixed, public constant of the base model.

The mean lives beside the weights as ``<weights>/feature_mean.safetensors`` (one tensor
``mean`` ``[pooled]``), with metadata naming the adaptation it was computed for (channel
tokens, channels, image and patch size, spatial dims, pooled width): pooled features depend on
all of them, so a mean made for another adaptation is refused, in one line. In the model it
is a FROZEN parameter (``FoundationBackbone.feature_mean``): never trained, never sent (only
trainable state travels for a site-owned base), and part of the frozen-base digest, so every
site must hold the same file as the coordinator.

``scale_features`` (with ``centre_features``) then divides the centred features by a PUBLIC
per-dimension spread, ``<weights>/feature_scale.safetensors`` (one tensor ``scale``
``[pooled]``, every value > 0, the same signature): the features' dimensions differ in spread
by orders of magnitude, and DP-SGD adds the same noise to every weight of the head, so the
weights of the narrow dimensions (which need large values) drown first. Standardised on public
data, every dimension reaches the head on one scale (bench/RESULTS.md "DP at epsilon 8 with
public standardisation, session 26"). Frozen, never sent, in the base digest, like the mean.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .loading import FEATURE_MEAN_FILE, FEATURE_SCALE_FILE, FoundationLoadError

FORMAT = "medfed-feature-mean/1"
KEY = "mean"
SCALE_FORMAT = "medfed-feature-scale/1"
SCALE_KEY = "scale"


def feature_signature(*, channel_tokens: str, num_channels: int, image_size: int,
                      patch_size: int, spatial_dims: int, pooled_dim: int,
                      patch_init: str = "mean") -> dict[str, str]:
    """What pooled features depend on, as safetensors metadata (strings)."""
    return {"channel_tokens": channel_tokens, "num_channels": str(num_channels),
            "image_size": str(image_size), "patch_size": str(patch_size),
            "spatial_dims": str(spatial_dims), "pooled_dim": str(pooled_dim),
            "patch_init": patch_init}


def public_stats(features: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(mean, scale, floored)`` of PUBLIC pooled features ``[N, pooled]``: the mean
    (``centre_features``) and each dimension's spread around it (``scale_features``), floored at
    1e-3 of the median spread so a dimension without public spread is not blown up; ``floored``
    counts the dimensions the floor raised (returned, not hidden)."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"public statistics need at least 2 studies' pooled features, got "
                         f"shape {tuple(features.shape)}")
    mean = features.mean(0)
    std = (features - mean).double().pow(2).mean(0).sqrt()
    floor = 1e-3 * float(std.median())
    return mean, std.clamp(min=floor).float(), int((std < floor).sum())


# Signature keys added later, and the value every file written before them was made with.
SIGNATURE_DEFAULTS = {"patch_init": "mean"}


def describe_signature(signature: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(signature.items()))


def save_feature_mean(directory: str | Path, mean: Tensor, signature: dict[str, str]) -> Path:
    """Write ``mean [pooled]`` to ``<directory>/feature_mean.safetensors`` with ``signature``
    (``feature_signature``). Compute it on PUBLIC data only."""
    return _save_vector(directory, FEATURE_MEAN_FILE, FORMAT, KEY, mean, signature)


def save_feature_scale(directory: str | Path, scale: Tensor, signature: dict[str, str]) -> Path:
    """Write ``scale [pooled]`` (every value > 0) to ``<directory>/feature_scale.safetensors``
    with ``signature``. Compute it on PUBLIC data only, around the public mean."""
    return _save_vector(directory, FEATURE_SCALE_FILE, SCALE_FORMAT, SCALE_KEY, scale, signature,
                        positive=True)


def _save_vector(directory: str | Path, name: str, fmt: str, key: str, vector: Tensor,
                 signature: dict[str, str], *, positive: bool = False) -> Path:
    from safetensors.torch import save_file

    vector = vector.detach().float().cpu().reshape(-1).contiguous()
    if str(vector.numel()) != signature.get("pooled_dim"):
        raise ValueError(f"{key} has {vector.numel()} values, the signature says pooled_dim="
                         f"{signature.get('pooled_dim')}")
    if positive and not (torch.isfinite(vector).all() and (vector > 0).all()):
        raise ValueError(f"every value of the {key} must be finite and > 0 (floor a dimension "
                         "without public spread instead of dividing by zero)")
    path = Path(directory) / name
    save_file({key: vector}, str(path), metadata={"format": fmt, **signature})
    return path


def read_public_constant(directory: str | Path | None, name: str, option: str, how: str,
                         fmt: str, key: str, signature: dict[str, str]) -> Tensor:
    """The one tensor ``key`` of ``<directory>/<name>``, a public constant of the base model
    (this module's mean, ``projection.py``'s directions) in format ``fmt``, made for the
    adaptation ``signature``. ``option`` and ``how`` (what makes the file, how to turn the
    option off) word the refusals.

    Raises
    ------
    FoundationLoadError
        No directory or no file, not a safetensors file, not this format or not one tensor
        ``key``, made for another adaptation - each in one line.
    """
    from safetensors import safe_open

    if directory is None:
        raise FoundationLoadError(f"{option} needs the encoder's directory (its {name}); "
                                  "this encoder was not loaded from one")
    path = Path(directory) / name
    if not path.is_file():
        raise FoundationLoadError(f"{option} is on but {path} does not exist; {how}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, keys = f.metadata() or {}, list(f.keys())
            value = f.get_tensor(key) if keys == [key] else None
    except Exception as err:         # a truncated or foreign file: say so, one line
        raise FoundationLoadError(f"{path} is not a safetensors file: "
                                  f"{str(err).splitlines()[0] if str(err) else err!r}") from None
    if meta.get("format") != fmt or value is None:
        raise FoundationLoadError(f"{path}: expected format {fmt!r} with one tensor "
                                  f"{key!r}, got format {meta.get('format')!r}, keys {keys}")
    recorded = {k: meta.get(k, SIGNATURE_DEFAULTS.get(k)) for k in signature}
    if recorded != signature:
        shown = describe_signature({k: str(v) for k, v in recorded.items()})
        raise FoundationLoadError(f"{path} was computed for another adaptation ({shown}) "
                                  f"than this model's ({describe_signature(signature)}); "
                                  "compute it again for this one")
    return value


def load_feature_mean(directory: str | Path | None, signature: dict[str, str]) -> Tensor:
    """The mean in ``<directory>/feature_mean.safetensors``, ``[pooled]``.

    Raises
    ------
    FoundationLoadError
        No file, not this format, made for another adaptation, the wrong shape, or a value
        that is not finite.
    """
    return _load_vector(directory, FEATURE_MEAN_FILE, "centre_features", "mean", FORMAT, KEY,
                        signature)


def load_feature_scale(directory: str | Path | None, signature: dict[str, str]) -> Tensor:
    """The per-dimension spread in ``<directory>/feature_scale.safetensors``, ``[pooled]``.

    Raises
    ------
    FoundationLoadError
        No file, not this format, made for another adaptation, the wrong shape, or a value
        that is not finite and > 0.
    """
    return _load_vector(directory, FEATURE_SCALE_FILE, "scale_features", "scale", SCALE_FORMAT,
                        SCALE_KEY, signature, positive=True)


def _load_vector(directory: str | Path | None, name: str, option: str, what: str, fmt: str,
                 key: str, signature: dict[str, str], *, positive: bool = False) -> Tensor:
    """``read_public_constant`` of a ``[pooled]`` vector of finite values (``positive``: > 0
    too); ``what`` names it in the refusals."""
    vector = read_public_constant(
        directory, name, option,
        f"compute the public feature {what} for this adaptation (medfed feature-stats "
        f"--data PUBLIC_DIR with the run's overrides) or set {option}=false",
        fmt, key, signature)
    valid = torch.isfinite(vector).all() and (not positive or (vector > 0).all())
    if tuple(vector.shape) != (int(signature["pooled_dim"]),) or not valid:
        raise FoundationLoadError(f"{Path(directory) / name}: {what} of shape "
                                  f"{tuple(vector.shape)}, expected "
                                  f"({signature['pooled_dim']},) finite values"
                                  + (" > 0" if positive else ""))
    return vector.float()


__all__ = ["FORMAT", "SCALE_FORMAT", "describe_signature", "feature_signature",
           "load_feature_mean", "load_feature_scale", "read_public_constant",
           "save_feature_mean", "save_feature_scale"]
