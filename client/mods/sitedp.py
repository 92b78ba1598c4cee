"""Site-level DP, the site's half: clip this site's whole model update before it leaves.

Flower's ``fixedclipping_mod`` does the clipping (``||local - global|| <= clipping_norm``); the
server's ``DifferentialPrivacyClientSideFixedClipping`` adds Gaussian noise to the sum. This
mod applies it exactly when the server asked for site-level DP, so one ClientApp serves every
mechanism; whether the site accepts the request at all is the site policy's decision
(``client.privacy.policy``), taken inside the train handler before any training.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from protocol import wire


def site_dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    config = msg.content.config_records.get(wire.CONFIG) if msg.has_content() else None
    if (msg.metadata.message_type == MessageType.TRAIN and config is not None
            and config.get(wire.DP_MECHANISM) == wire.DP_SITE):
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)
