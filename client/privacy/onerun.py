"""Epsilon lower bounds from a one-run privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023).

"Privacy Auditing with One (1) Training Run", arXiv:2305.08846. Each of ``m`` canaries is
included in training independently with probability 1/2. After training the auditor scores
every canary, guesses "in" for the ``k+`` highest scores and "out" for the ``k-`` lowest, and
abstains on the rest; ``r = k+ + k-`` guesses, ``v`` of them correct.

What is implemented: the paper's own code listing (``p_value_DP_audit`` and ``get_eps_audit``,
its Appendix D), as also reproduced in ``google-deepmind/jax_privacy``. Under the null hypothesis
that training is (eps, delta)-DP, with ``q = e^eps / (1 + e^eps)`` and ``X ~ Binomial(r, q)``,

    p(eps) = min(1, P[X >= v] + 2 m delta * max_{1 <= i <= v} P[v - i <= X < v] / i).

The reported bound is the largest eps with ``p(eps) < beta``, found by bisection, rounded down
(the conservative end). For ``delta = 0`` this is the plain Binomial tail
``P[Binomial(r, q) >= v] <= beta``. Like the paper's code, the bisection assumes ``p`` is
nondecreasing in eps (the Binomial term is; the delta term is a small correction).

Validity requires that which canaries are guessed, and how, does not depend on the inclusion
bits; choosing ``k`` by looking at the results is multiple testing (see ``best_lower_bound``).
"""

from __future__ import annotations

import numbers
import operator

import numpy as np
from scipy.special import expit
from scipy.stats import binom

# Fewer canaries cannot make a useful audit: even all of them guessed right bound epsilon below
# ~0.6 (m = 10, delta = 1e-5), so no broken DP path would be caught.
MIN_CANARIES = 10
_EPS_CAP = 128.0  # q = expit(128) == 1.0 in float64, so p(eps) = 1 there: always a valid bracket
_TOL = 1e-10
_MAX_ITERS = 200


def _p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P-value of >= v correct out of r guesses under (eps, delta)-DP (paper, App. D)."""
    q = float(expit(eps))
    tail = float(binom.sf(v - 1, r, q))  # P[X >= v]
    if delta == 0.0 or v == 0:
        return min(tail, 1.0)
    i = np.arange(1, v + 1)
    window = np.cumsum(binom.pmf(v - i, r, q))  # P[v - i <= X < v], i = 1..v
    alpha = float(np.max(window / i))
    return min(tail + alpha * delta * 2 * m, 1.0)


def _as_int(name: str, value: object) -> int:
    """Integer argument (numpy ints accepted, bools and floats rejected)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def epsilon_lower_bound(
    *, num_canaries: int, num_guesses: int, num_correct: int, delta: float = 0.0, beta: float = 0.05
) -> float:
    """Lower bound on epsilon that holds with probability ``1 - beta`` under (epsilon, delta)-DP.

    Parameters
    ----------
    num_canaries : int
        ``m``, canaries each included independently with probability 1/2.
    num_guesses : int
        ``r``, guesses made (abstentions excluded); ``0 <= r <= m``.
    num_correct : int
        ``v``, correct guesses; ``0 <= v <= r``.
    delta : float
        The delta of the DP claim being audited, ``0 <= delta < 1``.
    beta : float
        Significance level (``0.05`` is 95% confidence), ``0 < beta < 1``.

    Returns
    -------
    float
        The largest epsilon rejected at level ``beta``; ``0.0`` when nothing is rejected (e.g.
        guesses no better than chance).
    """
    m = _as_int("num_canaries", num_canaries)
    r = _as_int("num_guesses", num_guesses)
    v = _as_int("num_correct", num_correct)
    if m < 1:
        raise ValueError(f"num_canaries is {m}; need at least one canary")
    if not 0 <= r <= m:
        raise ValueError(f"num_guesses is {r}; need 0 <= num_guesses <= num_canaries ({m})")
    if not 0 <= v <= r:
        raise ValueError(f"num_correct is {v}; need 0 <= num_correct <= num_guesses ({r})")
    if not (isinstance(delta, numbers.Real) and 0.0 <= delta < 1.0):
        raise ValueError(f"delta is {delta!r}; need 0 <= delta < 1")
    if not (isinstance(beta, numbers.Real) and 0.0 < beta < 1.0):
        raise ValueError(f"beta is {beta!r}; need 0 < beta < 1")
    delta, beta = float(delta), float(beta)

    if _p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0  # invariant: p(lo) < beta <= p(hi)
    while hi < _EPS_CAP and _p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, min(2.0 * hi, _EPS_CAP)
    for _ in range(_MAX_ITERS):
        if hi - lo <= _TOL:
            break
        mid = 0.5 * (lo + hi)
        if _p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def guess_and_count(
    scores: np.ndarray, included: np.ndarray, *, k_plus: int, k_minus: int
) -> tuple[int, int]:
    """Guess "in" for the ``k_plus`` highest scores and "out" for the ``k_minus`` lowest.

    Parameters
    ----------
    scores : np.ndarray
        One finite score per canary, higher meaning more likely included. Ties are broken by
        canary index (lower index ranks higher), which is independent of inclusion.
    included : np.ndarray
        True inclusion of each canary (bool, or 0/1).
    k_plus, k_minus : int
        Number of "in" and "out" guesses; ``k_plus + k_minus <= len(scores)``.

    Returns
    -------
    tuple[int, int]
        ``(num_guesses, num_correct)``.
    """
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included)
    if s.ndim != 1 or inc.shape != s.shape:
        raise ValueError(f"scores and included must be 1-D of equal length, got {s.shape} and "
                         f"{inc.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite (found NaN or inf)")
    if inc.dtype != bool:
        if not np.all((inc == 0) | (inc == 1)):
            raise ValueError("included must be boolean or 0/1")
        inc = inc.astype(bool)
    kp, km = _as_int("k_plus", k_plus), _as_int("k_minus", k_minus)
    if kp < 0 or km < 0 or kp + km > s.size:
        raise ValueError(f"need k_plus, k_minus >= 0 and k_plus + k_minus <= {s.size}, "
                         f"got {kp} and {km}")
    order = np.argsort(-s, kind="stable")  # descending score, ties by index
    top, bottom = order[:kp], order[s.size - km:]
    correct = int(inc[top].sum()) + int((~inc[bottom]).sum())
    return kp + km, correct


def best_lower_bound(
    scores: np.ndarray,
    included: np.ndarray,
    *,
    delta: float,
    beta: float = 0.05,
    k_values: list[int] | None = None,
) -> dict:
    """Best symmetric (``k_plus = k_minus = k``) one-run bound over several ``k``.

    Taking the maximum over several ``k`` is multiple testing: each bound alone holds with
    probability ``1 - beta``, their maximum does not. Every ``k`` is therefore tested at
    ``beta / len(k_values)`` (Bonferroni), so the returned maximum holds with probability at
    least ``1 - beta``.

    Parameters
    ----------
    scores, included : np.ndarray
        As in ``guess_and_count``.
    delta : float
        The delta of the DP claim being audited.
    beta : float
        Overall significance level, shared across all ``k``.
    k_values : list[int], optional
        Candidate ``k``, each ``>= 1`` with ``2 k <= m``; duplicates are dropped. Default:
        ``round(f * m / 2)`` for ``f`` in 2%, 5%, 10%, 20%, 50%, 100%.

    Returns
    -------
    dict
        ``{"epsilon_lb", "k", "num_guesses", "num_correct"}`` for the ``k`` with the largest
        bound (the smallest such ``k`` on ties).
    """
    if not (isinstance(beta, numbers.Real) and 0.0 < beta < 1.0):
        raise ValueError(f"beta is {beta!r}; need 0 < beta < 1")
    m = int(np.asarray(scores).size)
    if k_values is None:
        k_values = [round(f * m / 2) for f in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)]
        k_values = [k for k in k_values if k >= 1]
    ks = sorted({_as_int("k", k) for k in k_values})
    if not ks or ks[0] < 1 or 2 * ks[-1] > m:
        raise ValueError(f"k_values must be non-empty with 1 <= k and 2 k <= {m}, got {k_values}")
    beta_each = beta / len(ks)  # Bonferroni over the k tried
    best: dict | None = None
    for k in ks:
        r, v = guess_and_count(scores, included, k_plus=k, k_minus=k)
        eps = epsilon_lower_bound(num_canaries=m, num_guesses=r, num_correct=v, delta=delta,
                                  beta=beta_each)
        if best is None or eps > best["epsilon_lb"]:
            best = {"epsilon_lb": eps, "k": k, "num_guesses": r, "num_correct": v}
    return best
