"""Activation (gradient) checkpointing of chosen blocks: a block keeps only its input in the
forward pass and runs again in the backward pass to get back what its gradient needs, so a
training step holds about one block's activations instead of every block's, for ~1/3 more
compute (``torch.utils.checkpoint``, non-reentrant).

DP-SGD's exact per-sample clipper (``client.privacy.persample``) records each layer's input in
its forward hook, once a pass: the second run of a block is announced (``recomputing()``),
and the clipper records nothing then. The gradient that reaches a layer is the same either
way; only where its input comes from differs.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_state = threading.local()     # the recompute runs on the thread that runs backward


def recomputing() -> bool:
    """True while a checkpointed block runs again in the backward pass."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _announced():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    plain = type(self).forward
    if not (self.training and torch.is_grad_enabled()):
        return plain(self, *args, **kwargs)
    runs = []

    def run(*a, **k):
        if runs:                       # the backward pass's second run
            with _announced():
                return plain(self, *a, **k)
        runs.append(True)
        return plain(self, *a, **k)
    return checkpoint(run, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Checkpoint each block while training with gradients (evaluation and ``no_grad`` run it
    plainly). The block's module, parameters and state-dict keys stay as they are; a
    ``deepcopy`` of the model keeps the setting. Returns how many blocks."""
    n = 0
    for block in blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)
        n += 1
    return n


@contextlib.contextmanager
def counting_saved_activations(model: nn.Module):
    """Inside the block, count the bytes autograd keeps from the forward pass for the backward
    pass, beyond ``model``'s own parameters and buffers (which a Linear saves too, but which
    exist anyway): each storage once. Yields a dict whose ``"bytes"`` grows inside the block
    and whose ``"storages"`` holds the storages counted (by data pointer); a checkpointed
    block's insides are not kept, so they do not count."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen: set[int] = set()
    out = {"bytes": 0, "storages": seen}

    def pack(t):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in own and key not in seen:
            seen.add(key)
            out["bytes"] += storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out


def is_checkpointed(block: nn.Module) -> bool:
    forward = block.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _checkpointed_forward


__all__ = ["checkpoint_blocks", "counting_saved_activations", "is_checkpointed",
           "recomputing"]
