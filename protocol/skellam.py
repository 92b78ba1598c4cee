"""Distributed Skellam mechanism (Agarwal, Kairouz & Liu, NeurIPS 2021): the maths both sides use.

Site-level DP under secure aggregation without trusting the server: each site clips its update
to L2 norm ``C``, quantises it to integers (scale ``s``, randomized rounding), adds
``Skellam(V / m)`` noise to every coordinate (``Poisson(V / 2m) - Poisson(V / 2m)``) and only
then masks it. The server unmasks the sum and adds nothing.

Why Skellam rather than the distributed discrete Gaussian (Kairouz, Liu & Steinke, ICML 2021):
a sum of independent Skellam variables *is* a Skellam variable (variances add), so the unmasked
sum of ``n >= m`` honest sites carries exactly ``Skellam(n V / m)`` noise, at any number of
contributors, with no tau-term correcting for a sum that is only close to the analysed law; and
it is sampled as the difference of two vectorised Poisson draws from the site's CSPRNG, where
an exact discrete Gaussian needs a rejection loop per value.

Guarantee (Theorem 3.5 of the paper): adding or removing one integer vector ``x`` with
``||x||_2 <= D2`` and ``||x||_1 <= D1`` to a sum carrying ``Skellam(V)`` noise per coordinate is
``(alpha, eps(alpha))``-RDP for every ``alpha > 1`` with

    eps(alpha) <= alpha D2^2 / (2V) + min(((2 alpha - 1) D2^2 + 6 D1) / (4 V^2), 3 D1 / (2V)).

Randomized rounding moves each coordinate by less than one unit, so a quantised update has
``D2 = C s + sqrt(d)`` and ``D1 = sqrt(d) C s + d`` (``d`` coordinates) deterministically - no
conditional rounding is needed at our scales (``C s`` ~ 10^7 against ``sqrt(d)`` ~ 10^3).

Booking: a site's ledger composes Gaussian rows ``(sigma, q, steps)`` with Opacus. We calibrate
``V`` so that the Skellam bound above is at most the Gaussian RDP ``alpha / (2 sigma^2)`` at
*every* order ``alpha >= 1`` (``calibrated_variance``); a ledger row ``(sigma, 1, 1)`` then upper
bounds the round's true RDP, and composes with DP-SGD rows as before. The price is a variance
a hair above ``sigma^2 D2^2`` (relative excess ~ 1 / V, i.e. ~10^-14).

Dropouts: each site adds ``V / m`` for the job's ``min_contributors`` ``m``, and refuses to help
unmask a sum of fewer than ``m`` contributors; more contributors only add noise.

Sampling: NumPy's Poisson sampler (PTRS) computes its acceptance test in float64, which
fails at very large means - at mean 3e13 its variance is 1.6% too high, at 5e14 4.6% too low
(measured). A site therefore never draws a Poisson mean above ``POISSON_EXACT_MAX`` = 1e11
(measured exact there to the 0.1% a 3M-sample check resolves) in one call: a larger share is
the exact sum of several smaller Skellams (``client.privacy.noise.SkellamNoise``), and
``noisy_encoding`` keeps the scale coarse enough that a model of up to ``EXACT_DIM``
parameters needs one draw (the rounding then inflates the sensitivity by < 1% at 10^6
parameters, which the calibration accounts for).

Wrap-around: the sum lives in ``Z_(2^32)`` read as signed int32. ``noise_headroom_sites`` sizes
the encoding so that the signal of ``max_sites`` sites plus the noise of ``max_sites`` noise
shares stays inside ``(-2^31, 2^31)`` for every one of up to ``MAX_DIM`` coordinates except with
probability ``OVERFLOW_PROBABILITY`` (Chernoff bound on the Skellam tail, union bound over
coordinates and both tails). A wrap is post-processing of the noisy sum: it can spoil an
average, never the privacy guarantee.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

OVERFLOW_PROBABILITY = 2.0 ** -40     # bound on any coordinate of a round's sum wrapping
POISSON_EXACT_MAX = 1e11              # largest Poisson mean drawn in one call (see below)
EXACT_DIM = 10 ** 8                   # model size the encoding keeps single-draw shares for
MAX_DIM = 2 ** 31                     # coordinates the overflow bound covers (any model here)
MIN_ORDER = 1.0                       # the calibration holds for every RDP order above this


def skellam_rdp(alpha: float, *, variance: float, l2: float, l1: float) -> float:
    """Theorem 3.5's RDP bound of the Skellam mechanism at order ``alpha > 1``."""
    if not alpha > 1 or variance <= 0:
        raise ValueError(f"need alpha > 1 and variance > 0, got {alpha}, {variance}")
    extra = min(((2 * alpha - 1) * l2 ** 2 + 6 * l1) / (4 * variance ** 2),
                3 * l1 / (2 * variance))
    return alpha * l2 ** 2 / (2 * variance) + extra


def quantised_sensitivity(*, clip_norm: float, scale: float, dim: int) -> tuple[float, float]:
    """(L2, L1) bounds of one site's clipped, scaled and randomly rounded update."""
    if clip_norm <= 0 or scale <= 0 or dim < 1:
        raise ValueError("need clip_norm > 0, scale > 0 and dim >= 1")
    l2 = clip_norm * scale + math.sqrt(dim)
    return l2, math.sqrt(dim) * clip_norm * scale + dim


def calibrated_variance(*, noise_multiplier: float, l2: float, l1: float) -> float:
    """Smallest Skellam variance ``V`` of the sum with ``skellam_rdp(alpha) <= alpha /
    (2 sigma^2)`` for all ``alpha >= MIN_ORDER``: a Gaussian ledger row at ``sigma`` then
    dominates the round.

    With ``x = 1 / V`` the bound divided by alpha is ``a + b / alpha``, ``a = l2^2 x / 2 +
    l2^2 x^2 / 2`` and ``b = (6 l1 - l2^2) x^2 / 4``; its maximum over ``alpha >= 1`` is
    ``a + max(b, 0)`` (first branch of the min, which only overstates). Solve the quadratic
    ``A x^2 + B x = 1 / (2 sigma^2)`` for its positive root.
    """
    if not noise_multiplier > 0 or l2 <= 0:
        raise ValueError("need noise_multiplier > 0 and l2 > 0")
    quad = l2 ** 2 / 2 + max(6 * l1 - l2 ** 2, 0.0) / 4
    lin = l2 ** 2 / 2
    target = 1 / (2 * noise_multiplier ** 2)
    x = 2 * target / (lin + math.sqrt(lin ** 2 + 4 * quad * target))   # stable positive root
    return 1 / x


def share_variance(*, noise_multiplier: float, clip_norm: float, scale: float, dim: int,
                   min_contributors: int) -> float:
    """Variance of the Skellam noise one site adds per coordinate: ``V / m``."""
    if min_contributors < 1:
        raise ValueError(f"min_contributors must be >= 1, got {min_contributors}")
    l2, l1 = quantised_sensitivity(clip_norm=clip_norm, scale=scale, dim=dim)
    return calibrated_variance(noise_multiplier=noise_multiplier, l2=l2, l1=l1) / \
        min_contributors


@dataclass(frozen=True)
class NoiseShare:
    """What one site adds in a distributed-DP round: the job's ``sigma``, ``C`` and ``m``
    (each checked by the site's policy before it trains)."""
    noise_multiplier: float
    clip_norm: float
    min_contributors: int

    def __post_init__(self):
        if not (self.noise_multiplier > 0 and self.clip_norm > 0 and self.min_contributors >= 1):
            raise ValueError("a noise share needs noise_multiplier > 0, clip_norm > 0 and "
                             "min_contributors >= 1")

    def variance(self, *, scale: float, dim: int) -> float:
        """Per-coordinate variance of this site's Skellam share at the encoding's scale."""
        return share_variance(noise_multiplier=self.noise_multiplier, clip_norm=self.clip_norm,
                              scale=scale, dim=dim, min_contributors=self.min_contributors)


def skellam_tail(t: float, variance: float) -> float:
    """Chernoff bound on ``P[X >= t]`` for ``X ~ Skellam(variance)`` (both halves
    ``Poisson(variance / 2)``): ``min_theta E[e^(theta X)] e^(-theta t)`` at
    ``sinh(theta) = t / variance``."""
    if t <= 0:
        return 1.0
    r = t / variance
    return math.exp(-(t * math.asinh(r) - variance * (math.sqrt(1 + r * r) - 1)))


def tail_bound(variance: float, probability: float) -> float:
    """Smallest ``t`` (to 0.1%) with ``skellam_tail(t, variance) <= probability``."""
    lo, hi = 0.0, math.sqrt(variance)
    while skellam_tail(hi, variance) > probability:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if skellam_tail(mid, variance) > probability else (lo, mid)
    return hi


def noise_headroom_sites(*, noise_multiplier: float, clip_norm: float, clip_range: float,
                         max_sites: int, min_contributors: int,
                         scale_for: callable) -> int:
    """Extra summands the encoding must hold for the noise, in units of one site's largest
    coordinate (``clip_range * scale``).

    ``scale_for(h)`` is the encoding's scale when it holds ``max_sites + h`` summands. Up to
    ``max_sites`` noise shares of ``V / m`` each must stay below the headroom in every
    coordinate but with probability ``OVERFLOW_PROBABILITY``; since the scale shrinks as the
    headroom grows, iterate to the fixed point (monotone, a few steps).
    """
    h = 0
    for _ in range(64):
        scale = scale_for(h)
        total = max_sites * share_variance(noise_multiplier=noise_multiplier,
                                           clip_norm=clip_norm, scale=scale, dim=MAX_DIM,
                                           min_contributors=min_contributors)
        t = tail_bound(total, OVERFLOW_PROBABILITY / (2 * MAX_DIM))
        need = math.ceil(t / (clip_range * scale))
        if need <= h:
            return h
        h = need
    raise ValueError("the noise headroom does not converge: the encoding has too few bits "
                     "for this noise; lower max_sites or raise min_contributors")


def exact_scale(share: NoiseShare, *, dim: int = EXACT_DIM) -> float:
    """The finest scale at which ``share`` is one Skellam draw of means <= POISSON_EXACT_MAX
    (bisection on the share's variance, which grows with the scale)."""
    limit = 2 * POISSON_EXACT_MAX
    lo, hi = 1e-6, 1.0
    while share.variance(scale=hi, dim=dim) <= limit:
        lo, hi = hi, hi * 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share.variance(scale=mid, dim=dim) <= limit else (lo, mid)
    return lo


def overflow_probability(*, total_variance: float, headroom: float, dim: int) -> float:
    """Bound on any of ``dim`` coordinates' noise leaving ``+/- headroom`` (union bound)."""
    return min(1.0, 2 * dim * skellam_tail(headroom, total_variance))
