"""The policy a site declares before a run (the server's preflight query).

Read from the operator's node config and the site's own privacy ledger, never from the
message that asks: the query names what is asked (``policy``) and nothing it says can change
the answer. Flags and the budget's numbers only, with the epsilon the ledger has spent; no
data counts. Declaring is a courtesy that lets a misconfigured run fail in seconds; every
round is still checked by ``admit_round`` as if nothing had been declared.
"""

from __future__ import annotations

from pathlib import Path

from protocol import wire
from protocol.accounting import epsilon
from protocol.policy import SitePolicy

from .ledger import PrivacyLedger
from .policy import flag, site_budget


def declared_policy(settings: dict, data_dir: Path, *, site_id: str, role: str) -> SitePolicy:
    """This site's :class:`SitePolicy` from its node ``settings`` and its ledger.

    ``require_dp`` is what ``authorize`` enforces: a budget is set and ``require-dp`` is not
    false. The spent epsilon is the ledger's history composed at the budget's delta (0 when
    the ledger does not exist yet: reading never creates one).

    Raises
    ------
    PrivacyRefused
        The budget in node config is invalid (the reason goes back to the server).
    """
    budget = site_budget(settings, data_dir)
    spent = 0.0
    if budget is not None and budget.ledger_path.is_file():
        entries = PrivacyLedger(budget.ledger_path).entries()    # verifies the hash chain
        if entries:
            history = [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]
            spent = epsilon(history, budget.delta, entries[-1].accountant)
    return SitePolicy(
        site_id=site_id, role=role, require_dp=budget is not None and budget.require_dp,
        require_secagg=flag(settings.get(wire.NODE_REQUIRE_SECAGG, False)),
        epsilon=budget.epsilon if budget else None, delta=budget.delta if budget else None,
        epsilon_spent=spent,
        max_run_epsilon=budget.max_run_epsilon if budget else None,
        min_noise_multiplier=budget.min_noise_multiplier if budget else None,
        trust_server=budget is not None and budget.trust_server,
        max_assumed_sites=budget.max_assumed_sites if budget else None)
