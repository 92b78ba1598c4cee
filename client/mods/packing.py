"""The site's half of ``protocol.packing``: a deployed coordinator sends the model's tensors
as one byte array (one object for the SuperNode to pull, not one per tensor); this mod
restores them before anything else in the ClientApp looks at the message and packs the
reply's arrays the same way, only when the request came packed (simulation never packs).
A packed record that does not decode exactly is refused (``PackingError``), never guessed."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp.typing import ClientAppCallable

from protocol import wire
from protocol.packing import is_packed, pack, unpack


def packing_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if not msg.has_content() or wire.ARRAYS not in msg.content.array_records \
            or not is_packed(msg.content.array_records[wire.ARRAYS]):
        return call_next(msg, context)
    msg.content[wire.ARRAYS] = unpack(msg.content.array_records[wire.ARRAYS])
    reply = call_next(msg, context)
    if not reply.has_error() and wire.ARRAYS in reply.content.array_records:
        reply.content[wire.ARRAYS] = pack(reply.content.array_records[wire.ARRAYS])
    return reply
