"""The site's ``require-secagg`` policy, enforced on what actually leaves the site.

The train handler checks the policy against what the *server's config* says the round is; a
malicious coordinator controls that config, so it could claim a masked round while the secure
aggregation mod sees no stage and lets the reply through in plaintext. This mod, installed
outermost in the ClientApp, looks at the reply itself: under ``require-secagg`` a train reply may
carry no array except the one uint32 masked vector of SecAgg+ (stage replies carry none).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
from flwr.app import ArrayRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod

from protocol import wire

from ..privacy.policy import PrivacyRefused, flag

log = logging.getLogger(__name__)


def is_masked(record: ArrayRecord, name: str) -> bool:
    """True when ``record`` is exactly SecAgg+'s masked vector: one 1-D uint32 array."""
    if name != wire.ARRAYS or list(record.keys()) != [wire.SECAGG_MASKED_ARRAY]:
        return False
    # decoded from the bytes that go out, not from the Array's declared dtype/shape fields
    array = record[wire.SECAGG_MASKED_ARRAY].numpy()
    return array.ndim == 1 and array.dtype == np.uint32


def plaintext_records(reply: Message) -> list[str]:
    """Names of the reply's array records that are not a masked vector."""
    return [name for name, record in reply.content.array_records.items()
            if not is_masked(record, name)]


def require_secagg_mod(settings: Callable[[Context], Mapping]) -> Mod:
    """Mod refusing any train reply that is not masked when the site requires SecAgg.

    Parameters
    ----------
    settings : callable
        ``context -> node settings`` (node config, with simulation's per-site file beneath);
        read from the site's own configuration, never from the message.
    """
    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or not reply.has_content():
            return reply
        if not flag(settings(context).get(wire.NODE_REQUIRE_SECAGG, False)):
            return reply
        leaked = plaintext_records(reply)
        if leaked:
            log.error("require-secagg: withheld a train reply with unmasked array records %s",
                      leaked)
            raise PrivacyRefused(f"this site requires secure aggregation (node config "
                                 f"{wire.NODE_REQUIRE_SECAGG}); refusing a plaintext update")
        return reply

    return mod
