"""Wrappers own their state and report what they did; the chain walker namespaces both."""

from __future__ import annotations

import io

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAdam, FedAvg

from protocol import wire
from strategies.external import ExternalSites
from strategies.observed import ObservedStrategy
from strategies.partial import PartialSharing
from strategies.state import (chain, chain_reports, chain_state, load_chain_state,
                              merge_reports)
from tests.strategies.rounds import (SITES, Grid, fedavg, guard, secagg_chain,
                                     site_dp_chain, arrays, train_round)


@pytest.fixture(autouse=True)
def _identity(task_identity):
    """Real Flower messages need the identity Flower sets in a running app."""


def _through_npz(state):
    """What a checkpoint does to the state: npz without pickle, and back."""
    buffer = io.BytesIO()
    np.savez(buffer, **state)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _epsilon(strategy) -> float:
    return merge_reports(chain_reports(strategy))["site_level_epsilon"]


def test_the_chain_names_every_link_and_numbers_a_repeated_kind():
    inner = fedavg()
    strategy = ObservedStrategy(ExternalSites(guard(guard(inner))), [])
    names = [name for name, _ in chain(strategy)]
    assert names == ["observed", "external-sites", "guard", "guard#2", "aggregator"]
    assert dict(chain(strategy))["aggregator"] is inner


def test_two_wrappers_reporting_the_same_thing_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="both site-dp and secagg report 'site_level_epsilon'"):
        merge_reports({"site-dp": {"site_level_epsilon": 1.0},
                       "secagg": {"site_level_epsilon": 2.0, "secagg_clipped": 0}})


def test_site_level_dp_epsilon_continues_after_a_restore():
    grid = Grid(SITES)
    straight, current = site_dp_chain(), arrays()
    for rnd in (1, 2, 3):
        current = train_round(straight, rnd, current, grid)
    expected = _epsilon(straight)

    first, current = site_dp_chain(), arrays()
    for rnd in (1, 2):
        current = train_round(first, rnd, current, grid)
    after_two = _epsilon(first)
    saved = _through_npz(chain_state(first))
    assert "site-dp/accountant" in saved

    resumed = site_dp_chain()                  # a restarted server builds a fresh chain
    load_chain_state(resumed, saved)
    assert _epsilon(resumed) == after_two
    train_round(resumed, 3, current, grid)
    assert 0 < after_two < expected
    assert _epsilon(resumed) == pytest.approx(expected, rel=1e-12)


def test_noise_on_the_secure_sum_keeps_its_epsilon_after_a_restore():
    straight = secagg_chain()
    for _ in range(3):
        straight.site_dp.add_noise(np.zeros(4, np.float32), contributors=SITES)   # per round
    first = secagg_chain()
    for _ in range(2):
        first.site_dp.add_noise(np.zeros(4, np.float32), contributors=SITES)
    saved = _through_npz(chain_state(first))
    assert set(saved) == {"secagg/site-dp/accountant"}
    resumed = secagg_chain()
    load_chain_state(resumed, saved)
    resumed.site_dp.add_noise(np.zeros(4, np.float32), contributors=SITES)
    report = merge_reports(chain_reports(resumed))
    assert report["site_level_epsilon"] == pytest.approx(_epsilon(straight), rel=1e-12)
    assert report["secagg_clipped"] == 0 and report["rejected"] == []


def test_partial_sharing_passes_the_guard_report_through_the_walk_too():
    guarded = guard(fedavg(), max_update_norm=1.0)
    strategy = ObservedStrategy(PartialSharing(guarded, ["b"]), [])
    train_round(strategy, 1, arrays(), Grid(SITES),
                lambda node, cur: {k: v + (100.0 if node == 1 else 0.01) for k, v in cur.items()})
    assert [r.site_id for r in merge_reports(chain_reports(strategy))["rejected"]] == ["site-1"]


def test_server_optimizer_moments_are_saved_under_the_aggregator():
    grid = Grid(SITES)
    adam = fedavg(cls=FedAdam)
    strategy = ExternalSites(guard(adam))
    train_round(strategy, 1, arrays(), grid)
    saved = _through_npz(chain_state(strategy))
    assert {k.split("|")[0] for k in saved} == {"aggregator/m_t", "aggregator/v_t",
                                                 "aggregator/current_arrays"}
    fresh = fedavg(cls=FedAdam)
    load_chain_state(ExternalSites(guard(fresh)), saved)
    for key in adam.m_t:
        np.testing.assert_array_equal(fresh.m_t[key], adam.m_t[key])
        np.testing.assert_array_equal(fresh.v_t[key], adam.v_t[key])


def test_state_the_chain_cannot_take_is_refused_not_dropped():
    saved = chain_state(site_dp_chain())
    with pytest.raises(ValueError, match=r"\['site-dp'\]"):
        load_chain_state(guard(fedavg()), saved)          # the same run without site DP
    with pytest.raises(ValueError, match="epsilon would restart at 0"):
        load_chain_state(site_dp_chain(), {})              # the accountant's history is missing
