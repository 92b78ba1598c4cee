"""Privacy accounting shared by sites (budget enforcement) and server (reporting, validation).

Thin layer over Opacus' accountants so that every number we report is the one Opacus itself
computes for the same (sample rate q, noise multiplier sigma, steps). A site's whole history is
a list of ``(sigma, q, steps)`` - Opacus' own ``history`` format, one entry per round - so the
accountant is rebuilt from the site's ledger rather than kept in memory: it cannot reset when a
process restarts or a new round arrives.

Site-level DP rounds enter the same history as ``(sigma, 1.0, 1)``: the clipped site update
bounds what removing one *sample* can change, so a site-level Gaussian release is also a
sample-level one (without subsampling amplification). RDP composes across both.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Sequence

from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

ACCOUNTANTS = ("rdp", "prv")          # Opacus accountants that compose a (sigma, q, steps) history
History = Sequence[tuple[float, float, int]]

# Opacus' RDP analysis warns (UserWarning) when the best order lies at the edge of its alpha
# grid. The epsilon it returns is still an upper bound (at worst not the tightest one), nothing
# a site's operator can act on, and a site printed it into its log in every DP round.
RDP_EDGE_ORDER = r"Optimal order is the (largest|smallest) alpha"
RDP_MODULE = r"opacus\.accountants\.analysis\.rdp"
_EDGE_FILTER_LOCK = threading.Lock()   # two threads finding it missing would both add it


def _is_edge_filter(entry: tuple) -> bool:
    """Whether a ``warnings.filters`` entry is the one ``_quiet_rdp_edge`` installs."""
    action, message, category, module, _lineno = entry
    return (action == "ignore" and category is UserWarning and message is not None
            and message.pattern == RDP_EDGE_ORDER and module is not None
            and module.pattern == RDP_MODULE)


def _quiet_rdp_edge() -> None:
    """Put the filter that ignores that one warning of that one module first among the
    process's warning filters, where it stays; any other warning shows as the filters say.

    Not ``warnings.catch_warnings()`` around each call: that swaps the process-wide filter
    list and puts the saved one back on exit, so with two threads accounting at once one
    puts back a list without the filter while the other is still inside (the warning shows),
    and a filter other code added meanwhile is dropped. Here a filter is only added, or
    moved to the front when other code has since put filters before it (or dropped it, as
    ``catch_warnings`` blocks elsewhere do on exit); no other filter is added, dropped or
    reordered. Opacus' own accountant elsewhere in the process is quiet too (same warning,
    same reason)."""
    with _EDGE_FILTER_LOCK:
        filters = warnings.filters
        if filters and _is_edge_filter(filters[0]) and \
                sum(map(_is_edge_filter, filters)) == 1:
            return
        for entry in [f for f in filters if _is_edge_filter(f)]:
            filters.remove(entry)               # a stale copy behind others' filters
        warnings.filterwarnings("ignore", message=RDP_EDGE_ORDER, category=UserWarning,
                                module=RDP_MODULE)


class PrivacyConfigError(ValueError):
    """A privacy parameter is out of range or unknown; the message says which and why."""


def check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise PrivacyConfigError(f"unknown accountant {name!r}; choose one of {list(ACCOUNTANTS)}")
    return name


def check_budget(epsilon: float | None, delta: float | None, *, n: int | None = None) -> None:
    """epsilon > 0 and finite; 0 < delta < 1/n (delta >= 1/n permits releasing a record);
    ``n``: the records the guarantee covers, at least one."""
    if epsilon is None or delta is None:
        raise PrivacyConfigError("a privacy budget needs both epsilon and delta")
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise PrivacyConfigError(f"epsilon must be > 0 and finite, got {epsilon}")
    if not 0 < delta < 1:
        raise PrivacyConfigError(f"delta must be in (0, 1), got {delta}")
    if n is not None and n < 1:
        raise PrivacyConfigError(f"no records to train on (n={n}): this site has no training "
                                 "study for this task, so it has nothing to release")
    if n is not None and delta >= 1.0 / n:
        raise PrivacyConfigError(f"delta={delta:g} >= 1/n = 1/{n}: such a guarantee allows "
                                 "publishing a whole record; use delta well below 1/n")


def epsilon(history: History, delta: float, accountant: str = "rdp") -> float:
    """Cumulative epsilon of a ``(sigma, q, steps)`` history at ``delta`` (0 for no history)."""
    check_accountant(accountant)
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(k)) for s, q, k in history]
    _quiet_rdp_edge()
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """Smallest sigma with which ``steps`` steps at ``sample_rate`` stay within
    ``target_epsilon`` (Opacus' ``get_noise_multiplier``, tolerance 0.005)."""
    check_accountant(accountant)
    check_budget(target_epsilon, delta)
    if not 0 < sample_rate <= 1 or steps < 1:
        raise PrivacyConfigError(f"need 0 < sample_rate <= 1 and steps >= 1, "
                                 f"got q={sample_rate}, steps={steps}")
    _quiet_rdp_edge()
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps,
                                      accountant=accountant, epsilon_tolerance=0.005))
