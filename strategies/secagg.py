"""SecAgg+ as a wrapper around any strategy whose aggregate is a weighted sum (Message API).

Flower's round loop stays Flower's: ``configure_train`` runs the setup and share-keys stages
with the grid it is given, then returns the train messages (the masked stage);
``aggregate_train`` runs the consistency stage (malicious-secure mode: survivors sign the
survivor set) and the unmask stage, decodes the weighted average *delta* and hands the
inner strategy one aggregate reply (``global + delta``, weight = total examples), so FedAvg
returns it as is and FedAdam/Yogi/Adagrad/FedAvgM apply their server optimiser to it. The server
sees masked uint32 vectors and the sum, never an individual update. Values the encoding had to
clip are counted per round (``clipped``) for the log and MLflow.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping

import numpy as np
from randomgen import AESCounter
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from protocol import wire
from protocol.arrays import apply_delta, float_keys
from protocol.secagg_encoding import HEADER
from protocol.secagg_protocol import Advert, SecAggConfig, SecAggError, ServerRound

from .guard import SummedReply, error_summary
from .sitedp import SiteDPAccounting, site_accountant
from .state import RoundReport, StrategyWrapper, expect_no_state
from .update_check import UNDECODABLE, decode

log = logging.getLogger(__name__)

SITE_DP = "site-dp"      # SumNoise's namespace inside SecAggPlus's state


class SumNoise(SiteDPAccounting):
    """Site-level DP on the secure sum: each site clipped its update to ``clipping_norm``
    (Flower's fixedclipping_mod) and weighs 1, so the average of n updates gets
    N(0, (sigma C / n)^2) per value - Flower's DP wrapper's calibration - composed with
    Flower's ``RdpAccountant`` (no amplification: every site, every round).

    Its state is the accountant's history; the noise generator is deliberately not saved
    (whoever holds its state could subtract the noise), so a resumed run draws fresh noise.
    """

    owner = "site-level DP on the secure sum"

    def __init__(self, *, noise_multiplier: float, clipping_norm: float, num_sites: int,
                 delta: float, rng: np.random.Generator | None = None):
        self.noise_multiplier, self.clipping_norm = noise_multiplier, clipping_norm
        self.num_sites = num_sites
        self.accountant = site_accountant(num_sites=num_sites, delta=delta)
        # the server's noise is the guarantee: AES-CTR bits keyed from os.urandom
        self.rng = rng or np.random.Generator(AESCounter(
            key=int.from_bytes(os.urandom(16), "little")))

    def add_noise(self, average: np.ndarray, *, contributors: int) -> np.ndarray:
        from flwr.serverapp import GaussianPrivacyEvent

        std = self.noise_multiplier * self.clipping_norm / contributors
        noisy = average.astype(np.float64) + self.rng.normal(0.0, std, average.shape)
        self.accountant.compose(GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier, sample_size=contributors,
            population_size=self.num_sites))
        log.info("secagg: site-level DP noise std %.3g on the sum of %d sites, epsilon %.3f",
                 std, contributors, self.epsilon)
        return noisy.astype(np.float32)


class SecAggPlus(StrategyWrapper, Strategy):
    """Wrap ``strategy`` so that sites' updates are only ever seen summed."""

    kind = "secagg"

    def __init__(self, strategy: Strategy, config: SecAggConfig, *, stage_timeout: float = 600,
                 site_dp: SumNoise | None = None):
        self.strategy = strategy
        self.config = config
        self.stage_timeout = stage_timeout
        self.site_dp = site_dp
        self.clipped = self.capped = 0
        self._round: ServerRound | None = None

    def state_dict(self) -> dict[str, np.ndarray]:
        # a secure round lives between configure_train and aggregate_train; only the
        # site-level DP accountant outlives it
        if self.site_dp is None:
            return {}
        return {f"{SITE_DP}/{k}": v for k, v in self.site_dp.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if self.site_dp is None:
            expect_no_state(state, "SecAgg+ without site-level DP")
            return
        prefix = f"{SITE_DP}/"
        stray = sorted(k for k in state if not k.startswith(prefix))
        if stray:
            raise ValueError(f"SecAgg+ keeps no state {stray}")
        self.site_dp.load_state_dict({k[len(prefix):]: v for k, v in state.items()})

    def round_report(self) -> RoundReport:
        """Values the encoding clipped and sites whose weight it capped in the last round
        (totals from the secure sum), and the site-level epsilon."""
        report = RoundReport(secagg_clipped=self.clipped, secagg_capped=self.capped)
        if self.site_dp is not None:
            report |= self.site_dp.round_report()
        return report

    def summary(self) -> None:
        log.info("SecAgg+ around %s (threshold %s, clip range %g)", type(self.strategy).__name__,
                 self.config.threshold, self.config.encoding.clip_range)
        self.strategy.summary()

    def _ask(self, grid: Grid, requests: dict[int, dict], stage: str) -> dict[int, ConfigRecord]:
        messages = [Message(content=RecordDict({wire.SECAGG: ConfigRecord(
            {wire.SECAGG_STAGE: stage, wire.SECAGG_ROUND: self._round.round_} | values)}),
            dst_node_id=node, message_type=MessageType.TRAIN) for node, values in requests.items()]
        out = {}
        for reply in grid.send_and_receive(messages, timeout=self.stage_timeout):
            if reply.has_error():
                log.warning("secagg %s: %s", stage, error_summary(reply))
            elif wire.SECAGG in reply.content.config_records:
                out[reply.metadata.src_node_id] = reply.content.config_records[wire.SECAGG]
        return out

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.clipped = self.capped = 0
        if self.site_dp is not None:     # the sites' fixedclipping_mod reads it
            config = ConfigRecord(dict(config) | {wire.DP_CLIPPING_NORM:
                                                  self.site_dp.clipping_norm})
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        nodes = [m.metadata.dst_node_id for m in messages]
        length = sum(math.prod(arrays[k].shape) for k in float_keys(arrays)) + HEADER
        self._round = ServerRound(server_round, nodes, self.config, length, run=grid.run.run_id)
        self._global, self._grid, self._messages = arrays, grid, messages
        enc = self.config.encoding
        keys = self._ask(grid, {n: {wire.SECAGG_CLIP_RANGE: float(enc.clip_range),
                                    wire.SECAGG_MAX_SITES: enc.max_sites,
                                    wire.SECAGG_MAX_WEIGHT: enc.max_weight,
                                    wire.SECAGG_AUTHENTICATED: self.config.authenticated}
                                for n in nodes}, wire.SECAGG_SETUP)
        share_requests = self._round.accept_keys({n: Advert(
            rec[wire.SECAGG_PK_ENC], rec[wire.SECAGG_PK_MASK], str(rec[wire.SECAGG_SITE_ID]),
            rec[wire.SECAGG_SIGNATURE], rec.get(wire.SECAGG_SESSION_KEY, b""),
            rec.get(wire.SECAGG_ENDORSEMENT, b"")) for n, rec in keys.items()})
        participants = self._round.public       # every site gets every signed advert
        shares = self._ask(grid, {n: {
            wire.SECAGG_NODES: [str(j) for j in participants],
            wire.SECAGG_PK_ENC: [a.pk_enc for a in participants.values()],
            wire.SECAGG_PK_MASK: [a.pk_mask for a in participants.values()],
            wire.SECAGG_SITE_IDS: [a.site for a in participants.values()],
            wire.SECAGG_SIGNATURES: [a.signature for a in participants.values()],
            wire.SECAGG_SESSION_KEYS: [a.session for a in participants.values()],
            wire.SECAGG_ENDORSEMENTS: [a.endorsement for a in participants.values()],
            wire.SECAGG_NEIGHBOURS: [str(j) for j in req["neighbours"]],
            wire.SECAGG_DEGREE: req["degree"],
            wire.SECAGG_THRESHOLD: req["threshold"]} for n, req in share_requests.items()},
            wire.SECAGG_SHARE)
        held = self._round.accept_shares({n: dict(zip((int(j) for j in rec[wire.SECAGG_NODES]),
                                                      rec[wire.SECAGG_CIPHERTEXTS]))
                                          for n, rec in shares.items()})
        out = []
        for msg in messages:        # Flower's strategies share one content object: copy it
            node = msg.metadata.dst_node_id
            if node in held:
                cts = held[node]
                content = RecordDict(dict(msg.content.items()))
                content[wire.CONFIG] = ConfigRecord(dict(msg.content[wire.CONFIG]) | {
                    wire.SECAGG_STAGE: wire.SECAGG_MASKED, wire.SECAGG_ROUND: server_round,
                    wire.SECAGG_NODES: [str(j) for j in cts],
                    wire.SECAGG_CIPHERTEXTS: list(cts.values())})
                out.append(Message(content=content, dst_node_id=node,
                                   message_type=msg.metadata.message_type))
        self._messages = out
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self._round is None:
            raise SecAggError("aggregate_train without a configured secure round")
        masked = {}
        # The masked vector's expected shape and dtype as a zero-stride array (nothing
        # allocated): what update_check.decode checks a reply's npy header against.
        expected = np.broadcast_to(np.zeros((), np.uint32), (self._round.length,))
        for reply in replies:
            if reply.has_error():
                log.warning("secagg round %d: %s", server_round, error_summary(reply))
                continue
            arrays = reply.content.array_records.get(wire.ARRAYS)
            if arrays is None or wire.SECAGG_MASKED_ARRAY not in arrays:
                log.warning("secagg round %d: node %s replied without a masked update; excluded",
                            server_round, reply.metadata.src_node_id)
                continue
            try:        # checked against the expected vector before anything is allocated
                vector = decode(arrays[wire.SECAGG_MASKED_ARRAY], None, expected,
                                wire.SECAGG_MASKED_ARRAY)
            except UNDECODABLE as err:      # one site's bytes never fail the round
                log.warning("secagg round %d: node %s sent an undecodable masked update "
                            "(%s); excluded", server_round, reply.metadata.src_node_id,
                            str(err)[:200])
                continue
            masked[reply.metadata.src_node_id] = vector
        requests = self._round.accept_masked(masked)
        if self.config.authenticated:       # the consistency stage: survivors sign the set
            signed = self._ask(self._grid, {n: {
                wire.SECAGG_SURVIVED: [str(j) for j in req["survivors"]]}
                for n, req in requests.items()}, wire.SECAGG_CONSISTENCY)
            requests = self._round.accept_signatures(
                {n: rec[wire.SECAGG_SIGNATURE] for n, rec in signed.items()})
        shares = self._ask(self._grid, {n: {
            wire.SECAGG_SURVIVED: [str(j) for j in req["survivors"]],
            wire.SECAGG_NODES: [str(j) for j in req.get("signatures", {})],
            wire.SECAGG_SIGNATURES: list(req.get("signatures", {}).values())}
            for n, req in requests.items()}, wire.SECAGG_UNMASK)
        delta, weight = self._round.unmask({n: {
            "seed": dict(zip((int(j) for j in rec[wire.SECAGG_SEED_NODES]),
                             rec[wire.SECAGG_SEED_SHARES])),
            "key": dict(zip((int(j) for j in rec[wire.SECAGG_KEY_NODES]),
                            rec[wire.SECAGG_KEY_SHARES]))} for n, rec in shares.items()})
        # totals from the secure sum's header
        self.clipped, self.capped = self._round.clipped, self._round.capped
        if self.capped:
            log.warning("secagg round %d: %d sites have more examples than secagg.max_weight; "
                        "their weights in the sum are capped", server_round, self.capped)
        if self.site_dp is not None:      # site-level DP: noise on the sum, never on a site
            delta = self.site_dp.add_noise(delta, contributors=len(masked))
        if self.clipped:
            log.warning("secagg round %d: %d values were outside +/-%g and clipped", server_round,
                        self.clipped, self.config.encoding.clip_range)
        aggregate = apply_delta(self._global, delta)
        origin = next(m for m in self._messages if m.metadata.dst_node_id in masked)
        metrics = MetricRecord({wire.NUM_EXAMPLES: weight, wire.SECAGG_CLIPPED: self.clipped,
                                wire.SECAGG_SITES: len(masked), wire.DP_UNIT_WEIGHT: 1.0})
        # a SummedReply: the guard inside counts it as len(masked) sites (a site cannot)
        summed = SummedReply(RecordDict({wire.ARRAYS: aggregate, wire.METRICS: metrics}),
                             reply_to=origin, sites=len(masked))
        self._round = None
        return self.strategy.aggregate_train(server_round, [summed])

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)
