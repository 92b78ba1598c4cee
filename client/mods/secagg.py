"""SecAgg+ at the site: answers the protocol's stages and masks the model update it sends.

The server's ``strategies.secagg.SecAggPlus`` drives five stages over train messages; this mod
answers setup, share-keys, consistency and unmask itself (no training), and for the masked
stage lets the ClientApp train (only once it holds at least ``t`` neighbours' shares), then replaces the reply's weights by ``mask(encode(local - global))`` - a
uint32 vector the server can only sum. The round's secrets live in the node's state between
stages and are dropped after unmasking. The site's ``require-secagg`` policy (refuse to send
a plaintext update) is checked by the train handler, which knows the site's settings, and
again on the reply itself by ``require_secagg_mod`` (outermost).

What the site trusts comes from its operator's node config, never from the server: its
identity key (``secagg-identity-key``, normally its ``auth.key``), the federation's registration
list (``secagg-peers``), and its floors (``secagg-min-neighbours``, ``secagg-min-contributors``);
it answers the semi-honest protocol only with ``secagg-allow-semi-honest``. A simulated
partition derives its identity (the same code path; not the threat model).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import NamedTuple

from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord,
                      RecordDict)
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable

from protocol import wire
from protocol.arrays import flat_delta
from protocol.secagg_encoding import Encoding
from protocol.secagg_identity import (IdentityError, Registry, RunSession, load_identity_key,
                                        simulation_key, simulation_registry)
from protocol.secagg_protocol import Advert

from ..privacy.ddp import check_unmask, masked_stage_noise
from ..privacy.secagg import SecAggPolicy, SecAggRefused, SiteIdentity, SiteSecAgg

log = logging.getLogger(__name__)

_NUM_PARTITIONS = "num-partitions"      # set by Flower's simulation engine


# What a masked reply still says in plaintext: the site's epsilon and delta after the round
# and the round's noise multiplier (what the coordinator records of each site's spend), site-
# level DP's unit weight, and the site's compute time. Its example count rides inside the
# masked vector; training loss/accuracy, step counts and the DP sample rate (statistics of this
# site's data, which the sum is there to hide among the others', or, at q = B/n, its size)
# are not sent: the ledger keeps them at the site.
MASKED_REPLY_KEYS = frozenset({wire.DP_EPSILON, wire.DP_DELTA, wire.DP_UNIT_WEIGHT,
                               wire.DP_NOISE_MULTIPLIER, wire.TRAIN_SECONDS})


def masked_reply_metrics(metrics) -> dict:
    """The train reply's metrics a site sends beside its masked update (``MASKED_REPLY_KEYS``);
    everything else the training handler reported stays at the site."""
    return {k: v for k, v in metrics.items() if k in MASKED_REPLY_KEYS}


def site_identity(node: dict) -> SiteIdentity | None:
    """This site's identity key and the registration list, from the operator's node config;
    a simulated partition's derived ones (``protocol.secagg_identity.simulation_key``); None
    when neither is configured (then only the semi-honest protocol could run)."""
    if wire.NODE_SECAGG_IDENTITY in node or wire.NODE_SECAGG_PEERS in node:
        site = str(node.get(wire.NODE_SITE_ID, ""))
        try:
            key = load_identity_key(Path(str(node[wire.NODE_SECAGG_IDENTITY])).read_bytes())
            registry = Registry.parse(Path(str(node[wire.NODE_SECAGG_PEERS])).read_text())
        except (KeyError, OSError, IdentityError) as err:
            raise SecAggRefused("secagg-no-identity", f"set both node config "
                                f"{wire.NODE_SECAGG_IDENTITY!r} and {wire.NODE_SECAGG_PEERS!r} "
                                f"to readable files ({type(err).__name__})") from None
        registered = registry.keys.get(site)
        if registered is None or registered.public_numbers() != key.public_key().public_numbers():
            raise SecAggRefused("secagg-no-identity", f"site {site!r} with this identity key is "
                                "not on the registration list (secagg-peers)")
        return SiteIdentity(site, key, registry)
    if wire.NODE_DATA_DIR not in node and wire.NODE_PARTITION_ID in node:
        site = f"site-{int(node[wire.NODE_PARTITION_ID])}"
        sites = [f"site-{i}" for i in range(int(node.get(_NUM_PARTITIONS, 0)))]
        return SiteIdentity(site, simulation_key(site), simulation_registry(sites or [site]))
    return None


def site_policy(node: dict) -> SecAggPolicy:
    try:
        return SecAggPolicy(
            min_neighbours=int(node.get(wire.NODE_SECAGG_MIN_NEIGHBOURS, 2)),
            min_contributors=int(node.get(wire.NODE_SECAGG_MIN_CONTRIBUTORS, 3)),
            # a weakening: only an explicit true counts (a typo keeps the strong protocol)
            allow_semi_honest=str(node.get(wire.NODE_SECAGG_SEMI_HONEST, False)).lower()
            in ("true", "1", "yes"))
    except (TypeError, ValueError) as err:
        raise SecAggRefused("secagg-parameters", f"the site's SecAgg node config: {err}") \
            from None


def _identity(context: Context, authenticated: bool) -> SiteIdentity | None:
    node = dict(context.node_config)
    if not authenticated:
        if not site_policy(node).allow_semi_honest:
            raise SecAggRefused("secagg-semi-honest", "the server asked for the unauthenticated "
                                "protocol; this site answers it only with node config "
                                f"{wire.NODE_SECAGG_SEMI_HONEST!r} = true")
        return None
    identity = site_identity(node)
    if identity is None:
        raise SecAggRefused("secagg-no-identity", f"set node config "
                            f"{wire.NODE_SECAGG_IDENTITY!r} and {wire.NODE_SECAGG_PEERS!r}")
    # the run's session key and the peers' keys verified in earlier rounds (this node's own
    # state: a site never takes them from a message)
    # (a session of another run is replaced when the round starts: RunSession.start)
    if wire.SECAGG_SESSION_STATE in context.state:
        session = RunSession.from_state(dict(context.state[wire.SECAGG_SESSION_STATE]))
        identity = SiteIdentity(identity.site, identity.key, identity.registry, session)
    return identity


class Protection(NamedTuple):
    """How the update of the train request being handled leaves this site."""
    masked: bool            # masked by this mod (its masked stage)
    signed: bool            # under the malicious-secure protocol's signed survivor set
    session: str            # which secure-aggregation session masks it ("" in plaintext)


def update_protection(msg: Message, context: Context) -> Protection:
    """How the update of the train request being handled leaves this site: masked by this
    mod (the masked stage; the mod refuses that stage without a round in progress), under
    the malicious-secure protocol, whose survivor set the sites sign, and in which session
    (a digest of the session's own secret self-mask seed, set at its setup stage) - all from
    the site's own state, never from the message. The train handler books its ledger row and
    binds its cached reply by it: a round's update is masked in one session only (masked
    again in a second session over fewer sites, the two sums would give it away)."""
    masked = msg.content[wire.CONFIG].get(wire.SECAGG_STAGE) == wire.SECAGG_MASKED
    if not masked or wire.SECAGG_STATE not in context.state:
        return Protection(masked, False, "")
    state = dict(context.state[wire.SECAGG_STATE])
    return Protection(masked, bool(state.get("authenticated", False)),
                      hashlib.sha256(bytes(state["seed"])).hexdigest())


def _site(context: Context) -> SiteSecAgg:
    if wire.SECAGG_STATE not in context.state:
        raise SecAggRefused("secagg-stage", "no secure-aggregation round in progress at this "
                            "site")
    state = dict(context.state[wire.SECAGG_STATE])
    return SiteSecAgg.from_state(state, _identity(context, bool(state["authenticated"])),
                                 site_policy(dict(context.node_config)))


def _save(context: Context, site: SiteSecAgg) -> None:
    context.state[wire.SECAGG_STATE] = ConfigRecord(site.to_state() | {
        "authenticated": site.identity is not None})
    if site.identity is not None:
        context.state[wire.SECAGG_SESSION_STATE] = ConfigRecord(site.identity.session.to_state())


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
        raise SecAggRefused("secagg-stage", "a secure-aggregation request without a stage")
    stage = request.get(wire.SECAGG_STAGE) if request else config.get(wire.SECAGG_STAGE)
    if stage is None:       # plaintext round; the train handler applies require-secagg
        return call_next(msg, context)
    if stage == wire.SECAGG_SETUP:
        encoding = Encoding(clip_range=float(request[wire.SECAGG_CLIP_RANGE]),
                            max_sites=int(request[wire.SECAGG_MAX_SITES]),
                            max_weight=int(request[wire.SECAGG_MAX_WEIGHT]))
        authenticated = bool(request.get(wire.SECAGG_AUTHENTICATED, True))
        site = SiteSecAgg(msg.metadata.dst_node_id, int(request[wire.SECAGG_ROUND]), encoding,
                          msg.metadata.run_id, _identity(context, authenticated),
                          site_policy(dict(context.node_config)))
        _save(context, site)
        advert = site.advertise()
        return _reply(msg, {wire.SECAGG_PK_ENC: advert.pk_enc, wire.SECAGG_PK_MASK: advert.pk_mask,
                            wire.SECAGG_SITE_ID: advert.site,
                            wire.SECAGG_SIGNATURE: advert.signature,
                            wire.SECAGG_SESSION_KEY: advert.session,
                            wire.SECAGG_ENDORSEMENT: advert.endorsement})
    site = _site(context)
    if int(request[wire.SECAGG_ROUND] if request else config[wire.SECAGG_ROUND]) != site.round_:
        raise SecAggRefused("secagg-stage", "a request for another round than the one in "
                            "progress")
    if stage == wire.SECAGG_SHARE:
        nodes = request[wire.SECAGG_NODES]
        # the fields that vouch for a key may be absent (semi-honest, or dropped on the way):
        # empty, so that the site names what is missing instead of failing on a lookup
        vouch = [request.get(key, [b""] * len(nodes)) for key in (
            wire.SECAGG_SIGNATURES, wire.SECAGG_SESSION_KEYS, wire.SECAGG_ENDORSEMENTS)]
        participants = {int(j): Advert(e, m, str(s), g, k, d) for j, e, m, s, g, k, d in zip(
            nodes, request[wire.SECAGG_PK_ENC], request[wire.SECAGG_PK_MASK],
            request.get(wire.SECAGG_SITE_IDS, [""] * len(nodes)), *vouch, strict=True)}
        cts = site.share_keys(participants, [int(j) for j in request[wire.SECAGG_NEIGHBOURS]],
                              int(request[wire.SECAGG_DEGREE]),
                              int(request[wire.SECAGG_THRESHOLD]))
        _save(context, site)
        return _reply(msg, {wire.SECAGG_NODES: [str(j) for j in cts],
                            wire.SECAGG_CIPHERTEXTS: list(cts.values())})
    if stage == wire.SECAGG_MASKED:
        received = dict(zip((int(j) for j in config[wire.SECAGG_NODES]),
                            config[wire.SECAGG_CIPHERTEXTS]))
        if len(received) < site.threshold:      # before training: nothing to mask it with
            raise SecAggRefused("secagg-too-few-shares", f"shares from {len(received)} "
                                f"neighbours, at least {site.threshold} needed - the update is "
                                "not sent")
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        try:
            delta = flat_delta(msg.content[wire.ARRAYS], reply.content[wire.ARRAYS])
        except ValueError as err:
            raise SecAggRefused("secagg-update", str(err)) from None
        metrics = reply.content[wire.METRICS]
        # site-level DP calibrates the server's noise to equal weights: one vote per site
        weight = 1 if config.get(wire.DP_MECHANISM) == wire.DP_SITE else \
            int(metrics[wire.NUM_EXAMPLES])
        if weight > site.encoding.max_weight:   # counted in the sum's header, never silent
            log.warning("secagg: %d training examples counted as %d (secagg.max_weight)",
                        weight, site.encoding.max_weight)
        noise, sampler = masked_stage_noise(context, config)    # distributed DP, if asked
        vector = site.masked_input(received, delta, weight, noise=noise, sampler=sampler)
        _save(context, site)
        reply.content[wire.ARRAYS] = ArrayRecord({wire.SECAGG_MASKED_ARRAY: Array(vector)})
        reply.content[wire.METRICS] = MetricRecord(masked_reply_metrics(metrics))
        return reply
    if stage == wire.SECAGG_CONSISTENCY:
        signature = site.sign_survivors([int(j) for j in request[wire.SECAGG_SURVIVED]])
        _save(context, site)
        return _reply(msg, {wire.SECAGG_SIGNATURE: signature})
    if stage == wire.SECAGG_UNMASK:
        signatures = dict(zip((int(j) for j in request.get(wire.SECAGG_NODES, [])),
                              request.get(wire.SECAGG_SIGNATURES, [])))
        try:
            # distributed DP's floor, proven by signatures (not only by the ids listed)
            assumed = check_unmask(context, list(request[wire.SECAGG_SURVIVED]))
            shares = site.unmask([int(j) for j in request[wire.SECAGG_SURVIVED]], signatures,
                                 min_signed=assumed)
        finally:        # one unmask request per round, answered or refused
            del context.state[wire.SECAGG_STATE]
        return _reply(msg, {
            wire.SECAGG_SEED_NODES: [str(j) for j in shares["seed"]],
            wire.SECAGG_SEED_SHARES: list(shares["seed"].values()),
            wire.SECAGG_KEY_NODES: [str(j) for j in shares["key"]],
            wire.SECAGG_KEY_SHARES: list(shares["key"].values())})
    raise SecAggRefused("secagg-stage", f"unknown secure-aggregation stage {stage!r}")
