"""Distributed site-level DP at the site: what it books, what it refuses, what it adds."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, RecordDict

from client.privacy import ddp
from client.privacy.ledger import PrivacyLedger
from client.privacy.noise import SkellamNoise
from client.privacy.policy import PrivacyRefused, SiteBudget, admit_round, authorize
from tests.strategies.secagg_sites import RUN, finish, make_sites, share_keys
from protocol import accounting, wire
from protocol.job import JobSpec, PrivacySpec
from protocol.secagg_encoding import HEADER, Encoding, encode, noisy_encoding
from protocol.secagg_protocol import SecAggConfig, ServerRound
from protocol.skellam import NoiseShare

DELTA = 1e-5


def _budget(tmp_path, **extra) -> SiteBudget:
    return SiteBudget(8.0, DELTA, tmp_path / "ledger.sqlite", **extra)


def _site_dp(noise=wire.DP_NOISE_DISTRIBUTED, m=3) -> PrivacySpec:
    return PrivacySpec(mechanism=wire.DP_SITE, noise_multiplier=2.0, clipping_norm=0.5,
                       noise=noise, min_contributors=m, planned_rounds=2, run_id="run-d")


def _authorize(request, budget):
    return authorize(request, budget, n_train=100, local_epochs=1, batch_size=10,
                     server_round=1, survivors_signed=True)


def test_a_distributed_round_books_the_sums_guarantee_trusting_m_honest_sites(tmp_path):
    auth = _authorize(_site_dp(m=3), _budget(tmp_path))
    entry = PrivacyLedger(tmp_path / "ledger.sqlite").entries()[0]
    assert (entry.mechanism, entry.trust) == ("site-dp", "sites>=3")
    assert (entry.noise_multiplier, entry.sample_rate, entry.steps) == (2.0, 1.0, 1)
    assert auth.entry.epsilon == pytest.approx(accounting.epsilon([(2.0, 1.0, 1)], DELTA))


def test_server_noise_is_refused_unless_the_operator_trusts_the_server(tmp_path):
    with pytest.raises(PrivacyRefused, match="does not trust it"):
        _authorize(_site_dp(noise=wire.DP_NOISE_SERVER), _budget(tmp_path))
    assert PrivacyLedger(tmp_path / "ledger.sqlite").entries() == []
    _authorize(_site_dp(noise=wire.DP_NOISE_SERVER), _budget(tmp_path, trust_server=True))
    assert [e.trust for e in PrivacyLedger(tmp_path / "ledger.sqlite").entries()] == ["server"]


def test_distributed_noise_outside_secure_aggregation_is_refused(tmp_path):
    job = SimpleNamespace(privacy=_site_dp(), train=SimpleNamespace(local_epochs=1,
                                                                     batch_size=10),
                          server_round=1)
    settings = {wire.NODE_DP_EPSILON: 8.0, wire.NODE_DP_DELTA: DELTA,
                wire.NODE_PRIVACY_DIR: str(tmp_path)}
    with pytest.raises(PrivacyRefused, match="without secure aggregation"):
        admit_round(job, settings, tmp_path, n_train=100, count_floor=10,
                    secure_aggregation=False, survivors_signed=False)
    assert admit_round(job, settings, tmp_path, n_train=100, count_floor=10,
                       secure_aggregation=True, survivors_signed=True).entry.trust == "sites>=3"


def _job_config(privacy: PrivacySpec):
    return JobSpec(model_name="m", model_options={}, task_name="t", task_options={},
                   class_names=("a", "b"), image_size=8, privacy=privacy).to_record()


def test_the_share_comes_from_the_job_the_site_admitted_and_only_for_distributed_noise():
    share = ddp.round_share(_job_config(_site_dp(m=4)))
    assert share == NoiseShare(noise_multiplier=2.0, clip_norm=0.5, min_contributors=4)
    assert ddp.round_share(_job_config(_site_dp(noise=wire.DP_NOISE_SERVER))) is None
    assert ddp.round_share(_job_config(PrivacySpec())) is None
    unset = ddp.round_share(_job_config(_site_dp(m=None)))      # not sent: this site alone
    assert unset.min_contributors == 1


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_the_site_refuses_to_unmask_a_sum_smaller_than_its_share_assumed():
    context = _context()
    share, sampler = ddp.masked_stage_noise(context, _job_config(_site_dp(m=3)))
    assert share.min_contributors == 3 and sampler is not None
    with pytest.raises(ddp.DistributedDPRefused, match="assumed at least 3"):
        ddp.check_unmask(context, ["7"])                  # itself and one survivor: 2 < 3
    ddp.masked_stage_noise(context, _job_config(_site_dp(m=3)))
    with pytest.raises(ddp.DistributedDPRefused, match="assumed at least 3"):
        ddp.check_unmask(context, ["7", "7", str(context.node_id)])   # padded: still 2
    context = _context()
    ddp.masked_stage_noise(context, _job_config(_site_dp(m=3)))
    ddp.check_unmask(context, ["7", "9"])                 # 3 contributors: fine
    ddp.check_unmask(context, ["7"])                      # the floor is checked once per round
    context = _context()                                  # no distributed round: no floor
    ddp.masked_stage_noise(context, _job_config(PrivacySpec()))
    ddp.check_unmask(context, [])


def test_a_replayed_round_draws_the_same_noise_and_a_new_round_fresh_noise():
    """The handler answers a repeated train request with its cached update; fresh noise on
    each copy would let the server average this site's share away - also after unmasking."""
    context = _context()

    def draw(server_round, task="classification"):
        config = _job_config(_site_dp(m=3))
        config[wire.SERVER_ROUND] = server_round
        config[wire.TASK_NAME] = task
        return ddp.masked_stage_noise(context, config)[1](1e12, 1000)

    first = draw(4)
    assert np.array_equal(first, draw(4))                 # replayed within the round
    ddp.check_unmask(context, ["7", "9"])                 # the round is unmasked
    assert np.array_equal(first, draw(4))                 # and replayed again afterwards
    assert not np.array_equal(first, draw(5))             # the next round: fresh noise
    # another task's round 4 (a second phase of the run): fresh noise too - one draw in two
    # sums would cancel in their difference (the same key and variance give the same values)
    assert not np.array_equal(first, draw(4, task="mm_dino"))


def _secure_round(share: NoiseShare, *, sites=5, drop=(), length=20_000):
    """A real (malicious-secure) SecAgg+ round: every site encodes with its noise share
    before masking."""
    rng = np.random.default_rng(1)
    enc = noisy_encoding(clip_range=1.0, max_sites=sites, share=share)
    ids = [10 * (i + 1) for i in range(sites)]
    deltas = {i: rng.normal(0, 0.002, length).astype(np.float32) for i in ids}
    server = ServerRound(3, ids, SecAggConfig(encoding=enc), length + HEADER, run=RUN)
    clients = make_sites(ids, 3, enc)
    held = share_keys(server, clients)
    masked = {i: clients[i].masked_input(cts, deltas[i], 100, noise=share,
                                         sampler=SkellamNoise(secure=False, seed=i).sample)
        for i, cts in held.items() if i not in drop}
    (average, weight), _ = finish(server, clients, masked)
    survivors = {i: server.survivors for i in masked}
    plain = np.mean([deltas[i] for i in masked], axis=0, dtype=np.float64)
    return average, plain, weight, enc, survivors


def test_a_secure_round_with_a_dropout_unmasks_a_noisy_average_of_the_survivors():
    share = NoiseShare(noise_multiplier=1.0, clip_norm=1.0, min_contributors=4)
    average, plain, weight, enc, survivors = _secure_round(share, drop=(30,))
    assert weight == 4                                   # unit weights: four survivors
    assert all(len(s) == 4 for s in survivors.values())  # each unmasks by the same four
    noise_std = ddp.sum_noise_std(share=share, scale=enc.scale, dim=plain.size, contributors=4)
    assert noise_std == pytest.approx(1.0 * 1.0 / 4, rel=1e-3)    # sigma C / n at n = m
    assert np.std(average - plain) == pytest.approx(noise_std, rel=0.05)
    assert abs(np.mean(average - plain)) < 5 * noise_std / math.sqrt(plain.size)


def test_a_site_claiming_a_million_examples_is_capped_inside_the_masked_sum():
    """Bounded weights: the weight rides inside the masked vector as an integer, capped at
    the site before masking; the server reads only the sum. An inflated count buys at most
    max_weight (attack: 10^6 examples against two honest sites of 100)."""
    enc = Encoding(clip_range=0.5, max_sites=3, max_weight=1000)
    honest = np.full(100, 0.01, np.float32)
    attacker = np.full(100, -0.2, np.float32)
    total = np.zeros(100 + HEADER, np.uint32)
    for x, n in ((honest, 100), (honest, 100), (attacker, 10 ** 6)):
        vector, _ = encode(x, n, enc)
        total += vector
    from protocol.secagg_encoding import decode
    average, weight = decode(total, enc)
    assert weight == 100 + 100 + 1000                   # 10^6 counted as max_weight
    expected = (200 * 0.01 + 1000 * -0.2) / 1200
    assert np.allclose(average, expected, atol=2 * enc.resolution)
    uncapped = (200 * 0.01 + 10 ** 6 * -0.2) / (200 + 10 ** 6)
    assert abs(expected - uncapped) > 0.02              # what the attack would have bought


def test_a_server_listing_more_survivors_than_signed_cannot_meet_the_noise_floor():
    """Distributed DP's floor m = 5: the server lists all five sites as survivors but hands
    a site only four survivor-set signatures (the fifth site's input it could have withheld).
    The listed ids are the server's word; the site counts signatures, so it reveals nothing.
    Control: the same request with no noise floor is answered (SecAgg+'s own floor is 3)."""
    from client.privacy.secagg import SecAggRefused
    from protocol.secagg_encoding import Encoding

    enc = Encoding(clip_range=0.5, max_sites=5, max_weight=10)
    ids = [10, 20, 30, 40, 50]
    server = ServerRound(2, ids, SecAggConfig(encoding=enc), 10 + HEADER, run=RUN)
    sites = make_sites(ids, 2, enc)
    held = share_keys(server, sites)
    masked = {i: sites[i].masked_input(cts, np.zeros(10, np.float32), 1)
              for i, cts in held.items()}
    requests = server.accept_signatures({i: sites[i].sign_survivors(r["survivors"])
                                         for i, r in server.accept_masked(masked).items()})
    request = requests[10]
    four = {j: sig for j, sig in request["signatures"].items() if j != 50}
    with pytest.raises(SecAggRefused, match="4 participants \\(5 needed\\)"):
        sites[10].unmask(request["survivors"], four, min_signed=5)
    assert sites[20].unmask(request["survivors"], four)["seed"]        # no floor: answered
