"""What DP-SGD's exact per-sample clipping covers of a foundation model, per fine-tuning method
(a leaf module: the families' seams, MONAI's and timm's included, all read it).

The site's own check asks the clipper itself before a round is charged
(``client.foundation.check_site_model``); these declarations let the coordinator's config
validation say the same before any site starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# Every family's encoder keeps parameters outside any Linear/LayerNorm under method=full
# (class and position embeddings, register tokens, layer scales): the exact clipper has no
# per-sample rule for them, so DP-SGD covers LoRA and linear probing only. Said at config
# load; the site's own check (``client.foundation.check_site_model``) asks the clipper.
FULL_NOT_COVERED: Mapping[str, str] = MappingProxyType({
    "full": "method=full trains the encoder's class/position embeddings (and layer scales or "
            "register tokens, where it has them), which have no exact per-sample gradient "
            "rule; use method=lora or linear_probe"})


__all__ = ["FULL_NOT_COVERED"]
