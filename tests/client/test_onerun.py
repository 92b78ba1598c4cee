import math

import numpy as np
import pytest

from client.privacy.onerun import best_lower_bound, epsilon_lower_bound, guess_and_count


def _bound(m, r, v, delta=0.0, beta=0.05):
    return epsilon_lower_bound(num_canaries=m, num_guesses=r, num_correct=v, delta=delta, beta=beta)


def _randomized_response(seed, eps0, m=1000):
    """Canaries in w.p. 1/2; score = inclusion bit flipped w.p. 1/(1+e^eps0): exactly eps0-DP."""
    rng = np.random.default_rng(seed)
    included = rng.random(m) < 0.5
    flip = rng.random(m) < 1.0 / (1.0 + math.exp(eps0))
    return (included ^ flip).astype(float), included


@pytest.mark.parametrize("r", [10, 100, 1000])
@pytest.mark.parametrize("beta", [0.01, 0.05, 0.2])
def test_perfect_guessing_matches_closed_form(r, beta):
    # delta = 0, v = r: P[Binomial(r, q) >= r] = q^r <= beta  <=>  q <= beta^(1/r).
    p = beta ** (1.0 / r)
    assert _bound(1000, r, r, beta=beta) == pytest.approx(math.log(p / (1 - p)), abs=1e-6)


@pytest.mark.parametrize("delta", [0.0, 1e-5])
def test_chance_level_gives_zero(delta):
    assert _bound(1000, 200, 100, delta=delta) == 0.0
    assert _bound(1000, 200, 60, delta=delta) == 0.0
    assert _bound(1000, 0, 0, delta=delta) == 0.0


def test_monotone_in_correct_beta_and_delta():
    by_v = [_bound(1000, 200, v, delta=1e-5) for v in (130, 150, 170, 190, 200)]
    assert all(a < b for a, b in zip(by_v, by_v[1:]))
    by_beta = [_bound(1000, 200, 180, beta=b) for b in (0.001, 0.01, 0.05, 0.2)]
    assert all(a < b for a, b in zip(by_beta, by_beta[1:]))
    by_delta = [_bound(1000, 200, 180, delta=d) for d in (0.0, 1e-7, 1e-5, 1e-4, 1e-2)]
    assert all(a >= b for a, b in zip(by_delta, by_delta[1:]))
    assert by_delta[0] > by_delta[2] and by_delta[-1] == 0.0  # the delta term does bite


# Reference values: the paper's own code, ``get_eps_audit(m, r, v, delta, p)`` from Appendix D of
# arXiv:2305.08846 (reproduced e.g. as ``_one_run_p_value_naive`` in google-deepmind/jax_privacy's
# auditing tests and in ubc-systopia/panoramia-privacy-measurement O1_Steinke_Code/o1_audit.py),
# run by us with scipy 1.17; no table of such numbers was found in the paper's text. Its
# bisection stops at a width of at most 6 / 2**30, far inside the tolerance used here.
@pytest.mark.parametrize(
    ("m", "r", "v", "delta", "expected"),
    [
        (1000, 600, 600, 1e-5, 5.270399462431669),
        (100, 100, 100, 1e-5, 3.490215953439474),
        (1000, 200, 180, 1e-5, 1.7962850704789162),
        (1000, 200, 180, 0.0, 1.7988652642816305),
        (1000, 1000, 900, 1e-5, 2.0206455951556563),
        (10000, 1000, 1000, 1e-5, 5.529349599033594),
    ],
)
def test_reproduces_reference_implementation(m, r, v, delta, expected):
    assert _bound(m, r, v, delta=delta, beta=0.05) == pytest.approx(expected, abs=1e-6)


def test_randomized_response_validity_and_power():
    eps0 = 2.0
    bounds = [best_lower_bound(*_randomized_response(s, eps0), delta=0.0)["epsilon_lb"]
              for s in range(20)]
    assert max(bounds) <= eps0
    assert np.mean(bounds) > 0.5 * eps0


def test_randomized_response_violation_rate_is_at_most_beta():
    # Randomized response is the worst case for the bound, so violations happen at close to the
    # nominal 5% (exactly 4.90% for r = 200 here); 3 standard errors of slack over 1000 runs.
    eps0, violations, runs = 2.0, 0, 1000
    for seed in range(runs):
        r, v = guess_and_count(*_randomized_response(seed, eps0), k_plus=100, k_minus=100)
        violations += _bound(1000, r, v, beta=0.05) > eps0
    assert violations / runs <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / runs)


def test_guess_and_count_hand_example():
    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.4])
    included = np.array([True, False, True, False, True, False])
    # top 2: idx 0 (in, right), 3 (out, wrong); bottom 2: idx 1 (out, right), 4 (in, wrong)
    assert guess_and_count(scores, included, k_plus=2, k_minus=2) == (4, 2)
    assert guess_and_count(scores, included, k_plus=1, k_minus=1) == (2, 2)
    assert guess_and_count(scores, included.astype(int), k_plus=3, k_minus=0) == (3, 2)
    assert guess_and_count(scores, included, k_plus=0, k_minus=0) == (0, 0)
    # ties ranked by index: top 1 of equal scores is index 0
    assert guess_and_count(np.zeros(3), np.array([1, 0, 0]), k_plus=1, k_minus=2) == (3, 3)


def test_best_lower_bound_applies_bonferroni():
    scores, included = _randomized_response(0, 2.0)
    ks = [10, 50, 100, 250]
    best = best_lower_bound(scores, included, delta=1e-5, k_values=ks)
    per_k = {}
    for k in ks:
        r, v = guess_and_count(scores, included, k_plus=k, k_minus=k)
        per_k[k] = (_bound(1000, r, v, delta=1e-5, beta=0.05 / len(ks)), r, v)
    k_star = max(ks, key=lambda k: per_k[k][0])
    assert best == {"epsilon_lb": per_k[k_star][0], "k": k_star,
                    "num_guesses": per_k[k_star][1], "num_correct": per_k[k_star][2]}
    unadjusted = _bound(1000, per_k[k_star][1], per_k[k_star][2], delta=1e-5, beta=0.05)
    assert best["epsilon_lb"] < unadjusted


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_canaries=100, num_guesses=101, num_correct=50),
        dict(num_canaries=100, num_guesses=50, num_correct=51),
        dict(num_canaries=100, num_guesses=50, num_correct=-1),
        dict(num_canaries=0, num_guesses=0, num_correct=0),
        dict(num_canaries=100, num_guesses=50.0, num_correct=40),
        dict(num_canaries=100, num_guesses=50, num_correct=40, delta=1.0),
        dict(num_canaries=100, num_guesses=50, num_correct=40, delta=-1e-9),
        dict(num_canaries=100, num_guesses=50, num_correct=40, beta=0.0),
        dict(num_canaries=100, num_guesses=50, num_correct=40, beta=1.0),
        dict(num_canaries=100, num_guesses=50, num_correct=40, beta=float("nan")),
    ],
)
def test_epsilon_lower_bound_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        epsilon_lower_bound(**kwargs)


def test_guess_and_best_reject_bad_arguments():
    scores, included = np.arange(4.0), np.array([1, 0, 1, 0])
    with pytest.raises(ValueError, match="k_plus"):
        guess_and_count(scores, included, k_plus=3, k_minus=2)
    with pytest.raises(ValueError, match="k_plus"):
        guess_and_count(scores, included, k_plus=-1, k_minus=0)
    with pytest.raises(ValueError, match="equal length"):
        guess_and_count(scores, included[:3], k_plus=1, k_minus=1)
    with pytest.raises(ValueError, match="finite"):
        guess_and_count(np.array([0.0, np.nan, 1.0, 2.0]), included, k_plus=1, k_minus=1)
    with pytest.raises(ValueError, match="0/1"):
        guess_and_count(scores, np.array([0, 2, 1, 0]), k_plus=1, k_minus=1)
    with pytest.raises(ValueError, match="k_values"):
        best_lower_bound(scores, included, delta=0.0, k_values=[3])
    with pytest.raises(ValueError, match="k_values"):
        best_lower_bound(scores, included, delta=0.0, k_values=[])
    with pytest.raises(ValueError, match="beta"):
        best_lower_bound(scores, included, delta=0.0, beta=1.5, k_values=[1])
