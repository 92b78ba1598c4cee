"""What the exact per-sample clipper (:mod:`client.privacy.persample`) admits, checked on the
model before a step and on each layer's rows during the forward pass.

Exact clipping holds only if every trainable parameter sits in a layer with a per-sample rule,
no parameter is shared between layers (its per-sample norm would need cross terms between the
uses), and every layer's rows are the batch's samples. Anything else would let part of a
sample's gradient escape clipping without a sound, so it is refused by name, saying what is
supported. The one declared exception is a module that folds further items into the batch
dimension batch-major (``FoldsBatch``, Swin's window attention): its token-wise Linear layers
see ``B*k`` rows, regrouped per sample by the clipper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from torch import nn


class UnsupportedLayerError(ValueError):
    """The model holds trainable parameters in a module type without a per-sample rule."""


@runtime_checkable
class FoldsBatch(Protocol):
    """A module whose forward folds further items into the leading dimension of the inputs of
    the token-wise layers under ``batch_major_folds`` (module types), batch-major: sample i's
    items are rows ``i*k .. (i+1)*k-1``."""

    batch_major_folds: tuple[type[nn.Module], ...]


def admitted_layers(model: nn.Module, rule_missing: Callable[[nn.Module], str | None],
                    supported: str) -> list[tuple[str, nn.Module, bool]]:
    """``(name, module, folds)`` of every module holding trainable parameters, in
    ``named_modules`` order; ``folds``: it lies under a type a ``FoldsBatch`` module declares.

    Raises
    ------
    UnsupportedLayerError
        Listing every module without a rule (``rule_missing`` says why) and every parameter
        shared by two of them, then what is ``supported``.
    """
    folded = _folded_modules(model)
    admitted, unsupported = [], []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        missing = rule_missing(module)
        if missing is None:
            admitted.append((name, module, id(module) in folded))
        else:
            unsupported.append(f"{name or '<root>'} ({missing})")
    owners: dict[int, str] = {}
    for _, module, _ in admitted:
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            if id(p) in owners:         # tied weights: per-sample norms would need cross terms
                unsupported.append(f"a parameter shared by {owners[id(p)]} and "
                                   f"{type(module).__name__}")
            owners[id(p)] = type(module).__name__
    if unsupported:
        raise UnsupportedLayerError(
            "no exact per-sample gradient rule for trainable parameters in: "
            + ", ".join(unsupported) + f"; supported: {supported}")
    return admitted


def checked_batch(name: str, module: nn.Module, folds: bool, lead: int, batch: int,
                  views: int = 1, *, tokenwise: bool | None = None) -> int:
    """The step's batch size (samples), after checking that a layer's ``lead`` rows are its
    samples' ``views`` consecutive rows each (or, declared, batch-major folds of those, for a
    ``tokenwise`` layer: one whose rule sums its rows per sample, a Linear by default);
    ``batch`` 0: not known yet, this layer decides."""
    if not batch:               # the model's root was not called: its first layer decides,
        if folds:               # unless that layer's rows may be folds (B x windows)
            raise UnsupportedLayerError(
                f"{name} ({type(module).__name__}) may fold the batch but the "
                "batch size is unknown (the model was not called with a tensor): its rows "
                "cannot be grouped per sample")
        if lead % views:
            raise ValueError(f"{name} sees {lead} rows, not whole groups of {views} views "
                             "per sample")
        return lead // views
    rows = batch * views
    if lead == rows:
        return batch
    if tokenwise is None:
        tokenwise = isinstance(module, nn.Linear)
    if folds and tokenwise and lead % rows == 0:
        return batch
    raise UnsupportedLayerError(
        f"{name} ({type(module).__name__}) sees a leading dimension of {lead}, "
        f"not the batch of {rows}: its rows are not samples, so their gradients "
        "cannot be clipped per sample (folds must be declared batch-major, FoldsBatch)")


def _folded_modules(model: nn.Module) -> set[int]:
    """ids of the modules under a type some ``FoldsBatch`` module in ``model`` declares."""
    types = tuple(t for m in model.modules() if isinstance(m, FoldsBatch)
                  for t in m.batch_major_folds)
    if not types:
        return set()
    return {id(sub) for m in model.modules() if isinstance(m, types) for sub in m.modules()}
