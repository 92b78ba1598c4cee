"""Distributed Skellam DP: the bound, the calibration, the accounting and the wrap-around."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from scipy import stats
from scipy.special import logsumexp

from client.privacy.noise import SkellamNoise
from protocol.accounting import epsilon as accounted_epsilon
from protocol.secagg_encoding import HEADER, Encoding, decode, encode, noisy_encoding
from client.privacy.noise import MAX_SPLIT
from protocol.skellam import (EXACT_DIM, MAX_DIM, OVERFLOW_PROBABILITY, POISSON_EXACT_MAX,
                              NoiseShare, calibrated_variance, exact_scale,
                              noise_headroom_sites, overflow_probability, skellam_rdp)

FALSE_FAILURE = 1e-6          # two-sided chi-square bounds: the test fails wrongly this rarely


def _exact_renyi(alpha: float, variance: float, shift: int) -> float:
    """D_alpha(Sk(V) + shift || Sk(V)) in one dimension, summed over the pmf (scipy)."""
    half = variance / 2
    x = np.arange(-int(60 * math.sqrt(variance)) - 60, int(60 * math.sqrt(variance)) + 60)
    log_p = stats.skellam.logpmf(x - shift, half, half)     # far tails underflow to -inf
    log_q = stats.skellam.logpmf(x, half, half)
    kept = np.isfinite(log_p) & np.isfinite(log_q)          # the dropped tails weigh < e^-700
    log_p, log_q = log_p[kept], log_q[kept]
    return float(logsumexp(alpha * log_p + (1 - alpha) * log_q) / (alpha - 1))


@pytest.mark.parametrize("variance", [8.0, 50.0, 400.0])
@pytest.mark.parametrize("shift", [1, 3])
def test_theorem_bound_is_above_the_exact_renyi_divergence(variance, shift):
    """The paper's Theorem 3.5 as implemented upper-bounds the true divergence (1-D: L1 = L2)."""
    for alpha in (1.5, 2.0, 5.0, 20.0):
        exact = _exact_renyi(alpha, variance, shift)
        bound = skellam_rdp(alpha, variance=variance, l2=shift, l1=shift)
        assert math.isfinite(exact) and 0 < exact <= bound, (alpha, exact, bound)


def test_calibrated_variance_makes_the_gaussian_row_dominate_at_every_order():
    for sigma, l2, l1 in ((1.0, 1.6e7, 1.6e10), (0.5, 30.0, 3000.0), (3.0, 5.0, 400.0)):
        v = calibrated_variance(noise_multiplier=sigma, l2=l2, l1=l1)
        assert v >= sigma ** 2 * l2 ** 2
        for alpha in np.concatenate([1 + np.logspace(-4, 4, 200)]):
            assert skellam_rdp(alpha, variance=v, l2=l2, l1=l1) <= \
                alpha / (2 * sigma ** 2) * (1 + 1e-12)
    # at the scales the encoding uses, the discrete mechanism costs ~nothing extra
    v = calibrated_variance(noise_multiplier=1.0, l2=1.6e7, l1=1.6e10)
    assert v / 1.6e7 ** 2 - 1 < 1e-6


def _independent_epsilon(variance: float, l2: float, l1: float, delta: float) -> float:
    """Theorem 3.5 written out again, converted to (epsilon, delta) with the conversion of
    Balle et al. 2020 over a fine grid of orders - no MedFed or Opacus code involved."""
    alphas = np.concatenate([1 + np.logspace(-3, 0, 300), np.arange(2, 256, 1e-3)])
    rdp = alphas * l2 ** 2 / (2 * variance) + np.minimum(
        ((2 * alphas - 1) * l2 ** 2 + 6 * l1) / (4 * variance ** 2), 3 * l1 / (2 * variance))
    eps = rdp + np.log1p(-1 / alphas) - (np.log(delta) + np.log(alphas)) / (alphas - 1)
    return float(eps.min())


@pytest.mark.parametrize("sigma,sites,dim,coarse", [
    (1.0, 3, 100_000, False), (2.5, 10, 1_000_000, False), (0.7, 5, 1_000, False),
    (1.0, 3, 1_000_000, True)])         # a coarse scale: rounding adds half the sensitivity
def test_accounted_epsilon_matches_an_independent_computation_of_the_skellam_sum(
        sigma, sites, dim, coarse):
    """What a site books for the round ((sigma, 1, 1) through Opacus) against the Skellam sum
    it actually releases (m honest shares at the encoding's scale), computed independently:
    the sensitivity of a clipped, randomly rounded update written out here again."""
    share = NoiseShare(noise_multiplier=sigma, clip_norm=1.0, min_contributors=sites)
    enc = Encoding(clip_range=1.0, max_sites=1_000_000, max_weight=1) if coarse else \
        noisy_encoding(clip_range=1.0, max_sites=sites, share=share)
    total = sites * share.variance(scale=enc.scale, dim=dim)      # the unmasked sum's noise
    l2 = 1.0 * enc.scale + math.sqrt(dim)          # each coordinate moves < 1 when rounded
    l1 = math.sqrt(dim) * 1.0 * enc.scale + dim
    for delta in (1e-5, 1e-3):
        booked = accounted_epsilon([(sigma, 1.0, 1)], delta)
        independent = _independent_epsilon(total, l2, l1, delta)
        # booked dominates (up to the grid's resolution) and costs at most 1% more
        assert independent <= booked * (1 + 1e-5) and booked <= independent * 1.01, \
            (booked, independent)


def test_noise_headroom_keeps_the_sum_inside_int32_with_the_stated_probability():
    share = NoiseShare(noise_multiplier=1.0, clip_norm=0.5, min_contributors=2)
    enc = noisy_encoding(clip_range=0.5, max_sites=10, share=share)
    assert enc.max_weight == 1
    # signal of 10 sites at the extremes plus the rest of the field as headroom
    assert enc.max_sites * (enc.clip_range * enc.scale + 1) < 2 ** 31
    total = 10 * share.variance(scale=enc.scale, dim=MAX_DIM)
    headroom = (enc.max_sites - 10) * enc.clip_range * enc.scale
    assert overflow_probability(total_variance=total, headroom=headroom, dim=MAX_DIM) <= \
        OVERFLOW_PROBABILITY
    # the headroom alone (no scale cap) is the smallest number of summands that meets it
    h = noise_headroom_sites(noise_multiplier=1.0, clip_norm=0.5, clip_range=0.5,
                             max_sites=10, min_contributors=2,
                             scale_for=lambda h: Encoding(clip_range=0.5, max_sites=10 + h,
                                                          max_weight=1).scale)
    scale = Encoding(clip_range=0.5, max_sites=10 + h, max_weight=1).scale
    total = 10 * share.variance(scale=scale, dim=MAX_DIM)
    assert overflow_probability(total_variance=total, headroom=h * 0.5 * scale,
                                dim=MAX_DIM) <= OVERFLOW_PROBABILITY
    assert overflow_probability(total_variance=total, headroom=(h - 1) * 0.5 * scale,
                                dim=MAX_DIM) > OVERFLOW_PROBABILITY


def test_the_encoding_keeps_every_share_a_single_exact_poisson_draw():
    """NumPy's Poisson sampler is inexact at huge means (variance off by 4.6% at 5e14): the
    encoding's scale keeps a share's means <= POISSON_EXACT_MAX for models up to EXACT_DIM."""
    for sigma, m, sites in ((1.0, 3, 3), (4.0, 20, 20), (0.3, 1, 50), (12.0, 2, 2)):
        share = NoiseShare(noise_multiplier=sigma, clip_norm=0.5, min_contributors=m)
        enc = noisy_encoding(clip_range=0.5, max_sites=sites, share=share)
        assert share.variance(scale=enc.scale, dim=EXACT_DIM) <= 2 * POISSON_EXACT_MAX
        assert enc.scale >= 0.99 * exact_scale(share)      # and no coarser than needed


def test_a_larger_share_is_an_exact_sum_of_draws_and_a_hostile_scale_is_refused():
    noise = SkellamNoise(secure=False, seed=2)
    variance = 10 * 2 * POISSON_EXACT_MAX                 # ten draws per value
    z = noise.sample(variance, 400_000).astype(np.float64)
    assert _chi_square_accepts(z, variance)
    with pytest.raises(ValueError, match="too fine for exact noise"):
        noise.sample((MAX_SPLIT + 1) * 2 * POISSON_EXACT_MAX, 10)


def test_the_chernoff_tail_bounds_the_empirical_tail():
    from protocol.skellam import skellam_tail
    z = SkellamNoise(secure=False, seed=3).sample(1e6, 2_000_000)
    for k in (1.0, 2.0, 3.0):
        t = k * 1e3
        assert (z >= t).mean() <= skellam_tail(t, 1e6)


def _sum_of_sites(sites, share, enc, dim, *, skip=(), seed=0):
    """``sites`` sites encode a random clipped update with their noise share (pairwise masks
    that cancel, as in SecAgg), the server sums and decodes: (decoded average, plain average,
    integer noise of the sum)."""
    rng = np.random.default_rng(seed)
    deltas = [rng.normal(0, 1, dim).astype(np.float32) for _ in range(sites)]
    deltas = [d * np.float32(0.9 * share.clip_norm / np.linalg.norm(d)) for d in deltas]
    seeds = {(i, j): os.urandom(32) for i in range(sites) for j in range(i + 1, sites)}
    total = np.zeros(dim + HEADER, np.uint32)
    for i, d in enumerate(deltas):
        masks = [(s, 1 if i == a else -1) for (a, b), s in seeds.items() if i in (a, b)]
        sampler = (lambda v, n: np.zeros(n, np.int64)) if i in skip else \
            SkellamNoise(secure=False, seed=seed * 100 + i).sample
        vector, _ = encode(d, 50, enc, masks=masks, noise=share, sampler=sampler)
        total += vector
    average, weight = decode(total, enc)
    plain = np.mean(deltas, axis=0, dtype=np.float64)
    noise = (average.astype(np.float64) - plain) * enc.scale * weight
    return average, plain, noise, weight


def _chi_square_accepts(noise: np.ndarray, variance: float) -> bool:
    """Two-sided chi-square test of the sample variance (mean known 0) at FALSE_FAILURE."""
    n = noise.size
    statistic = float(np.sum(noise ** 2) / variance)
    low, high = stats.chi2.ppf(FALSE_FAILURE / 2, n), stats.chi2.isf(FALSE_FAILURE / 2, n)
    return bool(low <= statistic <= high)


def test_unmasked_sum_carries_the_calibrated_noise_variance():
    """Three sites, each share assuming three contributors: the sum's noise (signal and
    rounding removed) has variance V = calibrated_variance (chi-square, false-failure rate
    1e-6). The rounding adds at most 3/4 per coordinate, ~1e-14 of V."""
    dim, sites = 200_000, 3
    share = NoiseShare(noise_multiplier=1.0, clip_norm=1.0, min_contributors=sites)
    enc = noisy_encoding(clip_range=1.0, max_sites=sites, share=share)
    average, plain, noise, weight = _sum_of_sites(sites, share, enc, dim)
    variance = sites * share.variance(scale=enc.scale, dim=dim)
    assert weight == sites                                   # unit weights under DP
    assert _chi_square_accepts(noise, variance)
    assert abs(noise.mean()) < 6 * math.sqrt(variance / dim)
    # the noise in model units: sigma C sqrt(n / m) / n
    assert np.std(average - plain) == pytest.approx(1.0 / sites, rel=0.01)


def test_the_variance_test_catches_a_site_that_skips_its_noise():
    """The same test on a sum where one of three sites added nothing fails: 2/3 of V."""
    dim, sites = 200_000, 3
    share = NoiseShare(noise_multiplier=1.0, clip_norm=1.0, min_contributors=sites)
    enc = noisy_encoding(clip_range=1.0, max_sites=sites, share=share)
    *_, noise, _ = _sum_of_sites(sites, share, enc, dim, skip=(1,))
    assert not _chi_square_accepts(noise, sites * share.variance(scale=enc.scale, dim=dim))


def test_noise_is_added_after_the_l2_clip_at_the_shares_own_norm():
    """An update longer than C is clipped to C before quantisation (the sensitivity the noise
    is calibrated to); without noise the encoding's per-value clip alone would pass it."""
    share = NoiseShare(noise_multiplier=1e-4, clip_norm=0.5, min_contributors=1)
    enc = noisy_encoding(clip_range=1.0, max_sites=3, share=share)
    x = np.full(10_000, 0.05, np.float32)                    # norm 5, far above C = 0.5
    vector, _ = encode(x, 1, enc, noise=share,
                       sampler=SkellamNoise(secure=False).sample)
    average, weight = decode(vector, enc)
    assert weight == 1
    assert np.linalg.norm(average) == pytest.approx(0.5, rel=0.01)
    assert np.allclose(average, 0.005, atol=1e-3)


def test_distributed_dp_uses_unit_weights_even_for_a_site_claiming_a_million_examples():
    """The noise is calibrated to one vote per site: whatever the count and whatever weight
    cap the server's encoding allows, a noisy update enters the sum with weight 1."""
    share = NoiseShare(noise_multiplier=1.0, clip_norm=1.0, min_contributors=2)
    for enc in (noisy_encoding(clip_range=1.0, max_sites=3, share=share),
                Encoding(clip_range=1.0, max_sites=3, max_weight=1000)):
        vector, _ = encode(np.full(10, 0.1, np.float32), 10 ** 6, enc, noise=share,
                           sampler=SkellamNoise(secure=False).sample)
        assert int(vector[0]) == 1
