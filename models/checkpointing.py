"""Activation (gradient) checkpointing of chosen blocks: a block keeps only its input in the
forward pass and runs again in the backward pass to get back what its gradient needs, so a
training step holds about one block's activations instead of every block's, for one more
forward pass of each block (``torch.utils.checkpoint``, non-reentrant; 1.26-1.50x the step
time in ``bench/activation_memory.py``).

DP-SGD's exact per-sample clipper (``client.privacy.persample``) records each layer's input in
its forward hook, once a pass: the second run of a block is announced (``recomputing()``),
and the clipper records nothing then. The gradient that reaches a layer is the same either
way; only where its input comes from differs.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Module state, on purpose: no torch API says "this forward is a checkpoint's recomputation",
# and the clipper's hooks are called by torch, not by us. Per thread: the recomputation runs
# on whichever thread runs the backward pass, and the flag is set and read inside it.
_state = threading.local()


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

    def run(*a):            # the block's own keyword arguments never reach checkpoint()
        if runs:                       # the backward pass's second run
            with _announced():
                return plain(self, *a, **kwargs)
        runs.append(True)
        return plain(self, *a, **kwargs)
    return checkpoint(run, *args, use_reentrant=False)


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> int:
    """Checkpoint each block while training with gradients (evaluation and ``no_grad`` run it
    plainly). The block's module, parameters and state-dict keys stay as they are; a
    ``deepcopy`` of the model keeps the setting. Returns how many blocks."""
    n = 0
    for block in blocks:
        # a partial of a module-level function: deepcopy and pickle rebind it to the copy
        block.forward = functools.partial(_checkpointed_forward, block)
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
    """Whether ``checkpoint_blocks`` wrapped this block (bound to this very block)."""
    forward = block.__dict__.get("forward")
    return (getattr(forward, "func", None) is _checkpointed_forward
            and forward.args[:1] == (block,))


__all__ = ["checkpoint_blocks", "counting_saved_activations", "is_checkpointed",
           "recomputing"]
