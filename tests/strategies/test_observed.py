"""ObservedStrategy: what the wrappers below it did reaches the round record."""

from __future__ import annotations

import pytest

from strategies.external import ExternalSites
from strategies.observed import ObservedStrategy, RoundRecord
from tests.strategies.rounds import SITES, Grid, arrays, fedavg, guard, train_round


@pytest.fixture(autouse=True)
def _identity(task_identity):
    """Real Flower messages need the identity Flower sets in a running app."""


def test_a_rejection_behind_external_sites_reaches_the_round_record():
    """BUG 2: ExternalSites forwarded nothing, so the observer saw no rejection and no norm."""
    seen: list[RoundRecord] = []

    class Recorder:
        def on_train(self, record):
            seen.append(record)

        def on_round_end(self, record):
            pass

    guarded = guard(fedavg(), max_update_norm=1.0)
    strategy = ObservedStrategy(ExternalSites(guarded), [Recorder()])

    def updates(node, current):        # site-2 sends a huge update: over the norm bound
        return {k: v + (100.0 if node == 2 else 0.01) for k, v in current.items()}

    train_round(strategy, 1, arrays(), Grid(SITES), updates)
    record = seen[-1]
    assert [(r.site_id, "exceeds bound" in r.reason) for r in record.rejected] == [("site-2", True)]
    assert sorted(record.update_norms) == ["site-1", "site-2", "site-3"]
    assert record.update_norms["site-2"] > 100
