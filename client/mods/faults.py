"""Fault injection for resilience tests and drills: make this site send a bad update.

Never enabled by configuration; a test, benchmark or an operator's drill adds it to the
ClientApp's mods explicitly. Modes mirror what a broken or hostile site sends:
``scale`` (update multiplied, e.g. by 1e6), ``nan``, ``wrong-shape``, ``drop-key``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from protocol import wire

MODES = ("scale", "nan", "wrong-shape", "drop-key")


def corrupt(arrays: ArrayRecord, mode: str, factor: float = 1e6) -> ArrayRecord:
    """A corrupted copy of ``arrays`` (the first floating-point array is the victim)."""
    if mode not in MODES:
        raise ValueError(f"unknown fault mode {mode!r}; expected one of {MODES}")
    out = {k: a.numpy().copy() for k, a in arrays.items()}
    victim = next(k for k, v in out.items() if v.dtype.kind == "f")
    if mode == "scale":
        out = {k: v * factor if v.dtype.kind == "f" else v for k, v in out.items()}
    elif mode == "nan":
        out[victim].flat[0] = np.nan
    elif mode == "wrong-shape":
        out[victim] = np.concatenate([out[victim].ravel(), [0.0]]).astype(out[victim].dtype)
    else:
        del out[victim]
    return ArrayRecord({k: Array(v) for k, v in out.items()})


def faulty_site(site_id: str, mode: str, factor: float = 1e6) -> Mod:
    """Mod that corrupts the training replies of ``site_id`` only."""
    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        site = reply.content.config_records.get(wire.SITE) if reply.has_content() else None
        if msg.metadata.message_type == MessageType.TRAIN and site is not None and \
                site.get(wire.SITE_ID) == site_id:
            reply.content[wire.ARRAYS] = corrupt(reply.content[wire.ARRAYS], mode, factor)
        return reply

    return mod
