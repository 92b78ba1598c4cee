"""What DP-SGD's exact per-sample clipping covers of a foundation model, per fine-tuning method
(a leaf module: the families' seams, MONAI's and timm's included, all read it).

The site's own check asks the clipper itself before a round is charged
(``client.foundation.check_site_model``); these declarations let the coordinator's config
validation say the same before any site starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

# Every family's encoder keeps parameters outside any Linear/LayerNorm under method=full
# (class and position embeddings, register tokens, layer scales): the exact clipper has no
# per-sample rule for them, so DP-SGD covers LoRA and linear probing only. Said at config
# load; the site's own check (``client.foundation.check_site_model``) asks the clipper.
FULL_NOT_COVERED: Mapping[str, str] = MappingProxyType({
    "full": "method=full trains the encoder's class/position embeddings (and layer scales or "
            "register tokens, where it has them), which have no exact per-sample gradient "
            "rule; use method=lora or linear_probe"})



def family_dp_refusal(seams: Any, method: str) -> str | None:
    """Why DP-SGD is refused for a family, or for ``method`` on it, or None.

    Parameters
    ----------
    seams : FamilySeams class or instance
        Read for its class-level ``dp_unsupported`` (the whole family) and
        ``dp_refused_methods`` (method -> reason) declarations.
    method : str
        The fine-tuning method (``full``, ``lora``, ``linear_probe``, ...).

    Returns
    -------
    str or None
        The family-wide reason if there is one, else the method's, else None. The model
        (``FoundationBackbone.dp_unsupported``) and the coordinator's config validation both
        ask here, so the two cannot disagree.
    """
    return seams.dp_unsupported or seams.dp_refused_methods.get(method)


__all__ = ["FULL_NOT_COVERED", "family_dp_refusal"]
