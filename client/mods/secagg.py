"""SecAgg+ at the site: answers the protocol's stages and masks the model update it sends.

The server's ``strategies.secagg.SecAggPlus`` drives four stages over train messages; this mod
answers setup, share-keys and unmask itself (no training), and for the masked stage lets the
ClientApp train, then replaces the reply's weights by ``mask(encode(local - global))`` - a
uint32 vector the server can only sum. The round's secrets live in the node's state between
stages and are dropped after unmasking. The site's ``require-secagg`` policy (refuse to send
a plaintext update) is checked by the train handler, which knows the site's settings, and
again on the reply itself by ``require_secagg_mod`` (outermost).
"""

from __future__ import annotations

import logging

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable

from protocol import wire
from protocol.arrays import flat_delta
from protocol.secagg_encoding import Encoding

from ..privacy.ddp import check_unmask, masked_stage_noise
from ..privacy.secagg import SecAggRefused, SiteSecAgg

log = logging.getLogger(__name__)


def _site(context: Context) -> SiteSecAgg:
    if wire.SECAGG_STATE not in context.state:
        raise SecAggRefused("no secure-aggregation round in progress at this site")
    return SiteSecAgg.from_state(dict(context.state[wire.SECAGG_STATE]))


def _save(context: Context, site: SiteSecAgg) -> None:
    context.state[wire.SECAGG_STATE] = ConfigRecord(site.to_state())


def _reply(msg: Message, values: dict) -> Message:
    return Message(content=RecordDict({wire.SECAGG: ConfigRecord(values)}), reply_to=msg)


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    request = msg.content.config_records.get(wire.SECAGG)
    config = msg.content.config_records.get(wire.CONFIG, ConfigRecord())
    if request is not None and request.get(wire.SECAGG_STAGE) is None:
        # a stage-less request is malformed; letting it through trained in plaintext while
        # the job config claimed a masked round
        raise SecAggRefused("a secure-aggregation request without a stage")
    stage = request.get(wire.SECAGG_STAGE) if request else config.get(wire.SECAGG_STAGE)
    if stage is None:       # plaintext round; the train handler applies require-secagg
        return call_next(msg, context)
    if stage == wire.SECAGG_SETUP:
        encoding = Encoding(clip_range=float(request[wire.SECAGG_CLIP_RANGE]),
                            max_sites=int(request[wire.SECAGG_MAX_SITES]),
                            max_weight=int(request[wire.SECAGG_MAX_WEIGHT]))
        site = SiteSecAgg(msg.metadata.dst_node_id, int(request[wire.SECAGG_ROUND]), encoding)
        _save(context, site)
        pk_enc, pk_mask = site.advertise()
        return _reply(msg, {wire.SECAGG_PK_ENC: pk_enc, wire.SECAGG_PK_MASK: pk_mask})
    site = _site(context)
    if stage == wire.SECAGG_SHARE:
        neighbours = {int(j): (e, m) for j, e, m in zip(request[wire.SECAGG_NODES],
                                                         request[wire.SECAGG_PK_ENC],
                                                         request[wire.SECAGG_PK_MASK])}
        cts = site.share_keys(neighbours, int(request[wire.SECAGG_THRESHOLD]))
        _save(context, site)
        return _reply(msg, {wire.SECAGG_NODES: [str(j) for j in cts],
                            wire.SECAGG_CIPHERTEXTS: list(cts.values())})
    if stage == wire.SECAGG_MASKED:
        received = dict(zip((int(j) for j in config[wire.SECAGG_NODES]),
                            config[wire.SECAGG_CIPHERTEXTS]))
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        try:
            delta = flat_delta(msg.content[wire.ARRAYS], reply.content[wire.ARRAYS])
        except ValueError as err:
            raise SecAggRefused(str(err)) from None
        metrics = reply.content[wire.METRICS]
        # site-level DP calibrates the server's noise to equal weights: one vote per site
        weight = 1 if config.get(wire.DP_MECHANISM) == wire.DP_SITE else \
            int(metrics[wire.NUM_EXAMPLES])
        capped = int(weight > site.encoding.max_weight)     # counted, never silent
        if capped:
            log.warning("secagg: %d training examples counted as %d (secagg.max_weight)",
                        weight, site.encoding.max_weight)
        noise, sampler = masked_stage_noise(context, config)    # distributed DP, if asked
        vector, clipped = site.masked_input(received, delta, weight, noise=noise,
                                            sampler=sampler)
        _save(context, site)
        reply.content[wire.ARRAYS] = ArrayRecord({wire.SECAGG_MASKED_ARRAY: Array(vector)})
        reply.content[wire.METRICS] = MetricRecord(dict(metrics) | {
            wire.SECAGG_CLIPPED: clipped, wire.SECAGG_WEIGHT_CAPPED: capped})
        return reply
    if stage == wire.SECAGG_UNMASK:
        check_unmask(context, list(request[wire.SECAGG_SURVIVED]))   # distributed DP's floor
        shares = site.unmask([int(j) for j in request[wire.SECAGG_SURVIVED]],
                             [int(j) for j in request[wire.SECAGG_DROPPED]])
        del context.state[wire.SECAGG_STATE]
        return _reply(msg, {
            wire.SECAGG_SEED_NODES: [str(j) for j in shares["seed"]],
            wire.SECAGG_SEED_SHARES: list(shares["seed"].values()),
            wire.SECAGG_KEY_NODES: [str(j) for j in shares["key"]],
            wire.SECAGG_KEY_SHARES: list(shares["key"].values())})
    raise SecAggRefused(f"unknown secure-aggregation stage {stage!r}")
