"""The backbone contract: what every model registered in ``models.MODELS`` provides.

The tasks (``task.wrap``), the site's size check (``client.queries``), pretrained-weight
loading (``models.tasks.load_backbone``) and export (``models.serving``) read these members
unconditionally. Two kinds are registered today:

* a **token backbone** (``TokenBackbone``: our ``MultiModalViT``, a pretrained
  ``FoundationBackbone``) encodes a study as tokens; every objective (the head tasks, MAE,
  MM-DINOv2, CLIP) and the site's token caps are built on its ``layout``;
* a **whole network** (``Backbone`` only: ``SwinSegmenter``) maps a study to the task's
  output directly; the site sizes it by its ``input_shape``.

Adding a backbone
-----------------
1. Write an ``nn.Module`` with these members (``TokenBackbone``'s, if objectives should build
   on its tokens) taking a frozen config dataclass, DP-ready where it can be (Opacus: the
   layers the site's per-sample clipper has a rule for).
2. Register its factory where it is defined, ``MODELS.register(name, ConfigClass)(factory)``,
   as ``mmvit`` is at the bottom of ``models/vit.py`` and ``foundation`` / ``foundation_swin``
   in ``models/foundation/__init__.py``, and import that module in ``models/__init__.py``.
3. Give it a tiny case in ``BACKBONES`` of ``tests/client/test_backbones.py``: that contract
   test fails for a registered backbone without one, and checks it trains, round-trips its
   state, is servable and sized by the site, is DP-exact as declared and has these members.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from .vit import TokenLayout


@runtime_checkable
class Backbone(Protocol):
    """What every registered backbone provides.

    Attributes
    ----------
    config : frozen dataclass
        The backbone's validated options (``MODELS.config``).
    head : nn.Module or None
        The class head that ``mode=linear_probe|lora`` keeps trainable and ``train.head_lr``
        treats as the head; None where there is none (a segmentation network's output block
        trains with the rest; a pretraining objective removes a token backbone's).
    """

    config: Any
    head: nn.Module | None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One study's input ``(S, *spatial)``: what an exported model takes per sample."""

    @property
    def public_constants(self) -> tuple[str, ...]:
        """State keys this side reads from its own directory (a foundation model's public
        feature mean): never taken from, nor required in, a pretrained state. ``()``: none."""

    def forward(self, images: Tensor, present: Tensor) -> Tensor:
        """``images [B, S, *spatial]`` (absent channels zeroed), ``present [B, S]`` -> the
        task's output (class logits, or a segmenter's per-voxel logits)."""


@runtime_checkable
class TokenBackbone(Backbone, Protocol):
    """A backbone that encodes a study as tokens, CLS first where it has one."""

    @property
    def layout(self) -> TokenLayout:
        """How its tokens are laid out: what objectives and the site's token caps read."""

    @property
    def register_tokens(self) -> int:
        """Tokens its layers read beyond ``layout``'s (registers, never in the output):
        the site's token caps count them too. 0: none."""

    def attention_mask(self, present: Tensor, n: int | None = None,
                       hidden: Tensor | None = None) -> Tensor:
        """``present [B, S]`` -> ``attend [B, T]``: the tokens others may attend to, with
        ``n`` patches per channel and ``hidden`` tokens (MAE's masked patches) removed."""

    def forward_features(self, images: Tensor, present: Tensor,
                         hidden: Tensor | None = None) -> Tensor:
        """Normalised tokens ``[B, T, D]``; no token attends to ``hidden [B, S*N]`` ones."""

    def pool(self, tokens: Tensor, present: Tensor) -> Tensor:
        """``[B, T, D]`` -> the pooled features the class head takes."""


def _class_members(protocol: type) -> set[str]:
    """The methods and properties ``protocol`` (and the protocols it extends) declares."""
    return {name for base in protocol.__mro__ if getattr(base, "_is_protocol", False)
            and base is not Protocol for name in vars(base) if not name.startswith("_")}


def _instance_members(protocol: type) -> set[str]:
    """The attributes ``protocol`` only annotates: set on each instance (``__init__``)."""
    return {name for base in protocol.__mro__ if getattr(base, "_is_protocol", False)
            and base is not Protocol for name in getattr(base, "__annotations__", {})}


def implements(module: object, protocol: type) -> bool:
    """Whether ``module``'s class defines every method and property of ``protocol``.

    Told from the class, without reading a property: an error inside one (a family's
    register count) surfaces where it is read, never as "not a backbone" (``isinstance``
    on a runtime protocol reads each member and takes such an error for a missing one).
    """
    return all(hasattr(type(module), name) for name in _class_members(protocol))


def token_backbone(model: nn.Module) -> TokenBackbone | None:
    """The token backbone inside ``model`` (itself, or what a task wrapped), or None."""
    return next((m for m in model.modules() if implements(m, TokenBackbone)), None)


def missing_members(module: object, protocol: type) -> list[str]:
    """The members of ``protocol`` that ``module`` lacks, each one read (the contract test):
    properties are evaluated, methods must be callable."""
    missing = []
    for name in sorted(_class_members(protocol) | _instance_members(protocol)):
        try:
            value = getattr(module, name)
        except AttributeError:
            missing.append(name)
            continue
        if name in _class_members(protocol) and callable(getattr(protocol, name)) \
                and not callable(value):
            missing.append(name)
    return missing


__all__ = ["Backbone", "TokenBackbone", "implements", "missing_members", "token_backbone"]
