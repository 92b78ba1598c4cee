"""SecAgg+ core, transport-free: crypto, encoding, and whole rounds with dropouts."""

from __future__ import annotations

import os

import numpy as np
import pytest

from client.privacy.secagg import SecAggRefused, SiteSecAgg
from protocol.secagg_crypto import (InvalidShare, agree, decrypt, encrypt, expand_mask,
                                      generate_private_key, public_bytes, recover_secret,
                                      share_secret)
from protocol.secagg_encoding import HEADER, Encoding, decode, encode, read_header
from protocol.secagg_protocol import SecAggConfig, SecAggError, ServerRound, neighbours
from tests.strategies.secagg_sites import RUN, finish, make_sites, share_keys

ENC = Encoding(clip_range=0.5, max_sites=10, max_weight=1000)


def test_key_agreement_encryption_and_replay_protection():
    a, b = generate_private_key(), generate_private_key()
    k_ab = agree(a, public_bytes(b), purpose="encryption", round_=3, a=1, b=2)
    assert k_ab == agree(b, public_bytes(a), purpose="encryption", round_=3, a=2, b=1)
    assert k_ab != agree(a, public_bytes(b), purpose="mask", round_=3, a=1, b=2)
    assert k_ab != agree(a, public_bytes(b), purpose="encryption", round_=4, a=1, b=2)
    ct = encrypt(k_ab, b"share", sender=1, receiver=2, round_=3)
    assert decrypt(k_ab, ct, sender=1, receiver=2, round_=3) == b"share"
    for kwargs in ({"sender": 1, "receiver": 2, "round_": 4}, {"sender": 1, "receiver": 5,
                                                                 "round_": 3}):
        with pytest.raises(InvalidShare):
            decrypt(k_ab, ct, **kwargs)                     # replayed / misdirected
    with pytest.raises(InvalidShare):
        decrypt(k_ab, ct[:-1] + bytes([ct[-1] ^ 1]), sender=1, receiver=2, round_=3)


def test_masks_are_deterministic_full_width_and_distinct():
    seed = os.urandom(32)
    m = expand_mask(seed, 100_000)
    assert m.dtype == np.uint32 and (m == expand_mask(seed, 100_000)).all()
    assert (m[:10] == expand_mask(seed, 10)).all()
    assert (m != expand_mask(os.urandom(32), 100_000)).mean() > 0.999
    assert abs(m.astype(np.float64).mean() / 2**32 - 0.5) < 0.01
    assert m.max() > 2**31                                  # not folded to fewer bits


def test_shamir_threshold():
    secret = os.urandom(32)
    shares = share_secret(secret, threshold=3, num=5)
    assert recover_secret([shares[4], shares[0], shares[2]]) == secret
    with pytest.raises(InvalidShare):                       # two of three: not the secret
        recover_secret(shares[:2])


def test_encoding_weighted_average_within_quantization_bound_and_counts_clipping():
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 0.05, 5000) for _ in range(6)]
    deltas[2][:7] = 3.0                                     # clipped, and counted
    weights = [10, 200, 1000, 5000, 3, 77]                  # 5000 is capped at max_weight
    total, clipped = np.zeros(5000 + HEADER, np.uint32), 0
    for x, w in zip(deltas, weights):
        v, c = encode(x, w, ENC)
        total += v
        clipped += c
    average, weight = decode(total, ENC)
    capped = [min(w, ENC.max_weight) for w in weights]
    reference = sum(w * np.clip(x, -0.5, 0.5) for w, x in zip(capped, deltas)) / sum(capped)
    assert weight == sum(capped) and clipped == 7
    # the header sums like the values: the total weight, clipped values and capped sites
    assert read_header(total[:HEADER]) == (sum(capped), 7, 1)
    assert np.abs(average - reference).max() <= ENC.resolution


def test_no_overflow_at_the_extremes():
    for value in (0.5, -0.5):
        total = np.zeros(10 + HEADER, np.uint32)
        for _ in range(ENC.max_sites):
            total += encode(np.full(10, value), ENC.max_weight, ENC)[0]
        assert np.allclose(decode(total, ENC)[0], value, atol=ENC.resolution)


def test_neighbour_graph_is_regular_and_symmetric():
    ids = list(range(100, 120))
    graph = neighbours(ids, 6, b"seed")
    assert all(len(v) == 6 for v in graph.values())
    assert all(i in graph[j] for i, v in graph.items() for j in v)
    assert graph == neighbours(list(reversed(ids)), 6, b"seed")      # the seed decides
    assert graph != neighbours(ids, 6, b"other seed")


def run_round(n_sites: int, *, drop_after_shares=(), drop_before_shares=(), config=None,
              length=2001, seed=0):
    rng = np.random.default_rng(seed)
    ids = [11 * (i + 1) for i in range(n_sites)]
    deltas = {i: rng.normal(0, 0.02, length).astype(np.float32) for i in ids}
    counts = {i: int(rng.integers(5, 300)) for i in ids}
    config = config or SecAggConfig(encoding=ENC)
    server = ServerRound(7, ids, config, length + HEADER, run=RUN)
    sites = make_sites(ids, 7, ENC, authenticated=config.authenticated)
    held = share_keys(server, sites, skip=drop_before_shares)
    masked = {i: sites[i].masked_input(cts, deltas[i], counts[i])
              for i, cts in held.items() if i not in drop_after_shares}
    (average, weight), _ = finish(server, sites, masked)
    alive = [i for i in ids if i in masked]
    ref = sum(counts[i] * deltas[i].astype(np.float64) for i in alive) / sum(counts[i]
                                                                              for i in alive)
    return average, ref, weight, sum(counts[i] for i in alive), server, masked, deltas


def test_round_equals_plaintext_weighted_average():
    average, ref, weight, expected_weight, *_ = run_round(5)
    assert weight == expected_weight
    assert np.abs(average - ref).max() <= ENC.resolution


def test_one_of_five_dropped_after_masked_keys_equals_survivors_average():
    average, ref, weight, expected_weight, *_ = run_round(5, drop_after_shares=(33,))
    assert weight == expected_weight
    assert np.abs(average - ref).max() <= ENC.resolution


def test_dropped_before_sharing_and_after_sharing_together():
    # 10 sites: degree 8, threshold 5 - three dropouts leave every site 5 live neighbours
    average, ref, *_ = run_round(10, drop_before_shares=(22,), drop_after_shares=(55, 66))
    assert np.abs(average - ref).max() <= ENC.resolution


def test_server_never_holds_an_unmasked_individual_update():
    *_, server, masked, deltas = run_round(5)
    for site, vector in masked.items():
        plain, _ = encode(deltas[site], 1, ENC)
        # a masked vector is uniform noise: it agrees with any encoding only by chance
        assert (vector[HEADER:] == plain[HEADER:]).mean() < 0.01
        assert abs(vector.astype(np.float64).mean() / 2**32 - 0.5) < 0.05


def test_a_site_reveals_one_kind_of_share_per_neighbour_from_one_survivor_set():
    ids = [1, 2, 3, 4, 5]
    server = ServerRound(1, ids, SecAggConfig(encoding=ENC), 10 + HEADER, run=RUN)
    sites = make_sites(ids, 1, ENC)
    held = share_keys(server, sites)
    masked = {i: sites[i].masked_input(cts, np.zeros(10), 1) for i, cts in held.items()
              if i != 5}
    requests = server.accept_masked(masked)
    signatures = {i: sites[i].sign_survivors(r["survivors"]) for i, r in requests.items()}
    shares = sites[1].unmask([1, 2, 3, 4], signatures)
    assert set(shares["seed"]) == {2, 3, 4} and set(shares["key"]) == {5}
    with pytest.raises(SecAggRefused, match="already answered"):
        sites[1].unmask([1, 2, 3, 4], signatures)


def test_too_few_sites_or_bad_threshold_fail_clearly():
    with pytest.raises(SecAggError, match="at least 3 sites"):
        SecAggConfig().resolve(2)
    with pytest.raises(SecAggError, match="threshold"):
        SecAggConfig(degree=4, threshold=5).resolve(10)
    with pytest.raises(SecAggError, match="needs at least"):
        SecAggConfig(degree=8).resolve(5)
    with pytest.raises(SecAggError, match="nothing is unmasked"):
        run_round(4, drop_after_shares=(22, 33, 44))


def test_wrong_length_or_replayed_input_is_excluded(caplog):
    ids = [1, 2, 3, 4, 5]
    server = ServerRound(2, ids, SecAggConfig(encoding=ENC), 10 + HEADER, run=RUN)
    sites = make_sites(ids, 2, ENC)
    held = share_keys(server, sites)
    masked = {i: sites[i].masked_input(cts, np.zeros(10), 1) for i, cts in held.items()}
    masked[5] = np.zeros(11 + HEADER, np.uint32)
    unmask = server.accept_masked(masked)
    assert 5 not in unmask and f"expected ({10 + HEADER},)" in caplog.text
    # a share replayed into another round does not decrypt
    other = SiteSecAgg(1, 3, ENC)
    other._neighbour_keys, other._threshold = sites[1]._neighbour_keys, sites[1].threshold
    other._enc_key = sites[1]._enc_key
    other._share_keys = {j: agree(other._enc_key, pk, purpose="encryption", round_=3, a=1, b=j)
                         for j, (pk, _) in other._neighbour_keys.items()}      # this round's
    with pytest.raises(InvalidShare):
        other.masked_input(held[1], np.zeros(10), 1)


def test_masks_are_the_aes128_ctr_keystream_of_the_seed():
    """The mask is AES-128-CTR keyed by seed[:16] from the counter block seed[16:28] || 2 -
    checked against OpenSSL's plain CTR mode (the stream is produced by its GCM encryptor)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    n = 200_003                                     # not a multiple of the streamed piece
    seed = os.urandom(32)
    counter = seed[16:28] + (2).to_bytes(4, "big")
    stream = Cipher(algorithms.AES(seed[:16]), modes.CTR(counter)).encryptor()
    reference = np.frombuffer(stream.update(bytes(4 * n)), dtype=np.uint32)
    assert (expand_mask(seed, n) == reference).all()
    # odd-sized pieces (the rounding coins read half-words) continue the same stream
    from protocol.secagg_crypto import Words, keystream

    words, encryptor = Words(), keystream(seed)
    pieces = [words.next(encryptor, k).copy() for k in (3, 1, 65_536, 7)]
    assert (np.concatenate(pieces) == reference[:3 + 1 + 65_536 + 7]).all()


def test_streamed_masks_equal_expanded_masks():
    from protocol.secagg_crypto import apply_masks

    n = 200_003
    masks = [(os.urandom(32), 1), (os.urandom(32), -1), (os.urandom(32), 1)]
    expected = np.arange(n, dtype=np.uint32)
    for seed, sign in masks:
        expected = expected + expand_mask(seed, n) if sign > 0 else expected - expand_mask(seed, n)
    assert (apply_masks(np.arange(n, dtype=np.uint32), masks) == expected).all()


def test_encoding_with_masks_is_encoding_plus_masks_across_pieces():
    n = 150_000                                     # three streamed pieces
    x = np.random.default_rng(2).normal(0, 0.05, n)
    x[-5:] = 3.0                                    # clipped: the count joins its masked slot
    masks = [(os.urandom(32), 1), (os.urandom(32), -1)]
    rounding = os.urandom(32)
    masked, clipped = encode(x, 40, ENC, masks=masks, rounding_seed=rounding)
    plain, clipped_plain = encode(x, 40, ENC, rounding_seed=rounding)
    expected = plain + expand_mask(masks[0][0], n + HEADER) - expand_mask(masks[1][0],
                                                                          n + HEADER)
    assert (masked == expected).all() and clipped == clipped_plain == 5
    assert read_header(plain[:HEADER]) == (40, 5, 0)


def test_stochastic_rounding_is_unbiased_in_every_piece():
    from protocol.secagg_crypto import CHUNK

    n = 3 * CHUNK + 17
    units = 1234.3                                  # 30% of the way to the next integer
    encoded, _ = encode(np.full(n, units / ENC.scale), 1, ENC)
    values = encoded[HEADER:].view(np.int32)
    assert set(np.unique(values)) <= {1234, 1235}
    for piece in np.array_split(values, 4):         # no piece rounds one way only
        assert abs((piece == 1235).mean() - 0.3) < 0.01


def test_nan_update_is_refused_before_it_enters_the_sum():
    x = np.zeros(100, np.float32)
    x[57] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        encode(x, 1, ENC)


def test_round_over_several_pieces_with_a_dropout():
    average, ref, *_ = run_round(5, drop_after_shares=(22,), length=140_001)
    assert np.abs(average - ref).max() <= ENC.resolution


def test_shares_of_a_mask_key_recover_it_and_bad_shares_are_refused():
    secret = os.urandom(32)
    shares = share_secret(secret, threshold=4, num=8)
    assert recover_secret(shares[3:7]) == recover_secret(shares[:4]) == secret
    with pytest.raises(InvalidShare):
        recover_secret(shares[:3])                  # too few: not a 32-byte secret
    with pytest.raises(InvalidShare):
        recover_secret([shares[0], shares[0], shares[1], shares[2]])
    with pytest.raises(InvalidShare):
        recover_secret([shares[0][:-1]] + shares[1:4])


def test_flat_delta_and_apply_delta_invert_each_other_over_mixed_arrays():
    from flwr.app import Array, ArrayRecord

    from protocol.arrays import apply_delta, flat_delta, view

    rng = np.random.default_rng(5)
    before = ArrayRecord({
        "b.weight": Array(rng.normal(size=(3, 4)).astype(np.float32)),
        "a.bias": Array(rng.normal(size=5)),                           # float64
        "steps": Array(np.array([7], np.int64)),                       # not a float: kept
        "c.fortran": Array(np.asfortranarray(rng.normal(size=(2, 3)).astype(np.float32)))})
    step = {k: rng.normal(0, 0.01, size=view(before[k]).shape) for k in before.keys()}
    after = ArrayRecord({k: Array((view(before[k]) + step[k]).astype(view(before[k]).dtype))
                         if k != "steps" else before[k] for k in before.keys()})
    delta = flat_delta(before, after)
    assert delta.dtype == np.float32 and delta.size == 12 + 5 + 6
    restored = apply_delta(before, delta)
    assert list(restored.keys()) == list(before.keys())
    for k in before.keys():
        got, want = restored[k].numpy(), after[k].numpy()
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.allclose(got, want, atol=1e-6)
        assert (view(before[k]) == before[k].numpy()).all()           # the view reads right
    with pytest.raises(ValueError, match="differ"):
        flat_delta(before, ArrayRecord({k: before[k] for k in before.keys() if k != "a.bias"}))
    with pytest.raises(ValueError, match="a delta of"):
        apply_delta(before, delta[:-1])


def _round_until_unmask(n_sites=6, length=501, seed=9):
    rng = np.random.default_rng(seed)
    ids = list(range(1, n_sites + 1))
    deltas = {i: rng.normal(0, 0.02, length).astype(np.float32) for i in ids}
    server = ServerRound(4, ids, SecAggConfig(encoding=ENC, degree=4, threshold=3), length + HEADER,
                         run=RUN)
    sites = make_sites(ids, 4, ENC)
    held = share_keys(server, sites)
    masked = {i: sites[i].masked_input(cts, deltas[i], 10) for i, cts in held.items()}
    requests = server.accept_masked(masked)
    requests = server.accept_signatures({i: sites[i].sign_survivors(r["survivors"])
                                         for i, r in requests.items()})
    replies = {i: sites[i].unmask(r["survivors"], r["signatures"]) for i, r in requests.items()}
    return server, replies, deltas


def test_a_wrong_share_fails_the_round_instead_of_a_silent_garbage_aggregate():
    from protocol.secagg_crypto import parse_share

    server, replies, _ = _round_until_unmask()
    liar = next(iter(replies))
    victim, share = next(iter(replies[liar]["seed"].items()))
    x, y = parse_share(share)
    replies[liar]["seed"][victim] = x.to_bytes(4, "little") + (y ^ 1).to_bytes(66, "little")
    with pytest.raises(SecAggError, match="do not lie on one polynomial"):
        server.unmask(replies)


def test_a_malformed_share_is_ignored_with_a_log_line(caplog):
    server, replies, deltas = _round_until_unmask()
    sender = next(iter(replies))
    victim = next(iter(replies[sender]["seed"]))
    replies[sender]["seed"][victim] = b"\x00" * 12
    average, _ = server.unmask(replies)             # degree 4 > threshold 3: enough remain
    assert f"site {sender} sent a malformed seed share of site {victim}" in caplog.text
    reference = sum(deltas[i].astype(np.float64) for i in deltas) / len(deltas)
    assert np.abs(average - reference).max() <= ENC.resolution


def test_semi_honest_unmask_enforces_and_states_the_distributed_dp_floor(caplog):
    """Without signatures a site can count only the ids the server lists: a distributed-DP
    floor above that list is refused, and one within it is answered with a warning that it
    rests on the server's word (it used to be dropped without a word)."""
    ids = [1, 2, 3, 4, 5]
    server = ServerRound(2, ids, SecAggConfig(encoding=ENC, authenticated=False), 10 + HEADER,
                         run=RUN)
    sites = make_sites(ids, 2, ENC, authenticated=False)
    held = share_keys(server, sites)
    masked = {i: sites[i].masked_input(cts, np.zeros(10), 1) for i, cts in held.items()
              if i != 5}
    survivors = server.accept_masked(masked)[1]["survivors"]
    with pytest.raises(SecAggRefused, match=r"^secagg-too-few-contributors: 4 survivors "
                                            r"listed; .* assumes at least 5"):
        sites[1].unmask(survivors, min_signed=5)
    caplog.set_level("WARNING", logger="client.privacy.secagg")
    assert sites[2].unmask(survivors, min_signed=4)["key"].keys() == {5}
    assert "counted from the server's survivor list, not proven by signatures" in caplog.text
