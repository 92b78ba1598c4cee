"""PUBLIC principal directions of the pooled features, a projection before the head
(``project_features``).

Why: under DP-SGD the head's noise is spread over all of its ``pooled x classes`` weights
while its clipped signal lives in the few directions the features vary along. Projecting the
pooled features onto the top ``k`` principal directions of a PUBLIC cohort's features (never
a site's) before the head leaves a head of ``k x classes`` weights: the same noise per
coordinate over ~``pooled / k`` times fewer coordinates (bench/RESULTS.md "DP-LoRA at epsilon
8, session 24"). The directions are a fixed public constant of the base model, like
``centring``'s mean, so privacy is untouched.

They live beside the weights as ``<weights>/feature_projection.safetensors``: one tensor
``directions [K, pooled]``, orthonormal rows in order of public variance, with the
adaptation's signature (``centring.feature_signature``) as metadata; ``project_features=k``
uses the first ``k <= K``. A file made for another adaptation, too few directions, or none,
is refused in one line. In the model it is a FROZEN parameter
(``FoundationBackbone.feature_projection``, ``[k, pooled]``): never trained, never sent, in
the frozen-base digest, exported beside the encoder.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .centring import read_public_constant
from .loading import FEATURE_PROJECTION_FILE, FoundationLoadError

FORMAT = "medfed-feature-projection/1"
KEY = "directions"


def principal_directions(features: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``features [N, pooled]`` (already centred) -> top-``k`` directions ``[k, pooled]``
    (orthonormal rows, most variance first) and the fraction of variance each holds ``[k]``."""
    _, singular, vh = torch.linalg.svd(features.double(), full_matrices=False)
    variance = singular**2
    return vh[:k].float().contiguous(), (variance[:k] / variance.sum()).float()


def save_feature_projection(directory: str | Path, directions: Tensor,
                            signature: dict[str, str]) -> Path:
    """Write ``directions [K, pooled]`` to ``<directory>/feature_projection.safetensors`` with
    ``signature``. Compute them on PUBLIC data only."""
    from safetensors.torch import save_file

    directions = directions.detach().float().cpu().contiguous()
    if directions.dim() != 2 or str(directions.shape[1]) != signature.get("pooled_dim"):
        raise ValueError(f"directions of shape {tuple(directions.shape)}, expected [K, "
                         f"{signature.get('pooled_dim')}] (the signature's pooled_dim)")
    path = Path(directory) / FEATURE_PROJECTION_FILE
    save_file({KEY: directions}, str(path), metadata={"format": FORMAT, **signature})
    return path


def load_feature_projection(directory: str | Path | None, signature: dict[str, str],
                            k: int) -> Tensor:
    """The first ``k`` directions in ``<directory>/feature_projection.safetensors``,
    ``[k, pooled]``.

    Raises
    ------
    FoundationLoadError
        No file, not this format, made for another adaptation, fewer than ``k`` directions,
        or not finite.
    """
    directions = read_public_constant(
        directory, FEATURE_PROJECTION_FILE, "project_features",
        "compute public principal directions for this adaptation (medfed feature-stats "
        "--data PUBLIC_DIR --directions K with the run's overrides) or set project_features=0",
        FORMAT, KEY, signature)
    path = Path(directory) / FEATURE_PROJECTION_FILE
    pooled = int(signature["pooled_dim"])
    if directions.dim() != 2 or directions.shape[1] != pooled or directions.shape[0] < k \
            or not torch.isfinite(directions).all():
        raise FoundationLoadError(f"{path}: directions of shape {tuple(directions.shape)} "
                                  f"(finite: {bool(torch.isfinite(directions).all())}), need "
                                  f"at least {k} finite rows of {pooled}")
    return directions[:k].float().contiguous()


__all__ = ["FORMAT", "load_feature_projection", "principal_directions",
           "save_feature_projection"]
