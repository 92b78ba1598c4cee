"""Opacus' "Optimal order is the largest/smallest alpha" UserWarning is not printed where a
site accounts its DP rounds (walkthrough finding: it showed in the site's log during DP
training); other warnings still are. The epsilon is unchanged: the filter only hides text."""

from __future__ import annotations

import logging
import warnings

from opacus.accountants import create_accountant

from protocol import accounting

# a heavily noised round (epsilon ~0.1): the best RDP order is the largest of Opacus' grid
HISTORY = [(50.0, 1.0, 1)]
DELTA = 1e-5


def _opacus_epsilon() -> float:
    acc = create_accountant("rdp")
    acc.history = list(HISTORY)
    return float(acc.get_epsilon(delta=DELTA))


def test_opacus_itself_warns_for_this_history():
    """The premise: without our filter, Opacus warns here."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _opacus_epsilon()
    assert any("Optimal order is the" in str(w.message) for w in caught)


def test_accounting_neither_emits_nor_logs_the_edge_order_warning(caplog):
    logging.captureWarnings(True)          # as the site's logging does: a warning is a record
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            spent = accounting.epsilon(HISTORY, DELTA)
            sigma = accounting.calibrate_noise(target_epsilon=8.0, delta=DELTA,
                                               sample_rate=0.7, steps=3)
    finally:
        logging.captureWarnings(False)
    assert [str(w.message) for w in caught] == []
    assert "Optimal order" not in caplog.text
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert spent == _opacus_epsilon() and sigma > 0      # the same numbers, only quiet


def test_any_other_warning_still_shows():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with accounting._quiet_rdp_edge():
            warnings.warn("Optimal order is unrelated here", UserWarning)
            warnings.warn("something else Opacus says", UserWarning)
    assert [str(w.message) for w in caught] == ["Optimal order is unrelated here",
                                                "something else Opacus says"]
