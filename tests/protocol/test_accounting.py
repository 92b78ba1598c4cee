"""Opacus' "Optimal order is the largest/smallest alpha" UserWarning is not printed where a
site accounts its DP rounds (walkthrough finding: it showed in the site's log during DP
training); other warnings still are. The epsilon is unchanged: the filter only hides text."""

from __future__ import annotations

import logging
import threading
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
        accounting._quiet_rdp_edge()
        warnings.warn("Optimal order is unrelated here", UserWarning)
        warnings.warn("something else Opacus says", UserWarning)
        warnings.warn("Optimal order is the largest alpha, said another module", UserWarning)
    assert [str(w.message) for w in caught] == [
        "Optimal order is unrelated here", "something else Opacus says",
        "Optimal order is the largest alpha, said another module"]


def _edge(entry: tuple) -> bool:
    """Whether a ``warnings.filters`` entry ignores the edge-order warning of Opacus' RDP."""
    action, message, _category, module, _ = entry
    return action == "ignore" and message is not None and "Optimal order" in message.pattern \
        and module is not None and "opacus" in module.pattern


def test_accounting_adds_its_one_filter_and_touches_no_other():
    accounting.epsilon(HISTORY, DELTA)             # its filter is in place...
    with warnings.catch_warnings():                # ...and the caller's go before it
        warnings.filterwarnings("error", message="a filter of the caller's")
        warnings.simplefilter("always")            # both added after any earlier accounting
        before = [f for f in warnings.filters if not _edge(f)]
        for _ in range(2):
            accounting.epsilon(HISTORY, DELTA)
            accounting.calibrate_noise(target_epsilon=8.0, delta=DELTA, sample_rate=0.7,
                                       steps=3)
        after = list(warnings.filters)
    assert [f for f in after if not _edge(f)] == before        # same filters, same order
    assert _edge(after[0]) and sum(map(_edge, after)) == 1     # its own, once, first


def test_two_sites_accounting_at_once_neither_show_the_warning_nor_drop_filters(monkeypatch):
    """Two threads inside Opacus at once (held there by events, so the order is the one that
    broke ``catch_warnings``: the first leaves while the second is still inside), and other
    code adding a filter meanwhile. The second's warning stays quiet, the added filter stays,
    and the filters are otherwise what they were."""
    from opacus.accountants.analysis import rdp

    expected = accounting.epsilon(HISTORY, DELTA)
    real = rdp.get_privacy_spent
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def held(**kwargs):
        if threading.current_thread().name == "A":
            a_in.set()
            assert b_in.wait(10)
        else:
            b_in.set()
            assert a_out.wait(10)                  # A has left accounting
        return real(**kwargs)

    monkeypatch.setattr(rdp, "get_privacy_spent", held)
    spent: dict[str, float] = {}

    def account():
        spent[threading.current_thread().name] = accounting.epsilon(HISTORY, DELTA)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")            # an escaped warning would be recorded
        before = [f for f in warnings.filters if not _edge(f)]
        a, b = (threading.Thread(target=account, name=name) for name in "AB")
        a.start()
        b.start()
        assert a_in.wait(10) and b_in.wait(10)     # both inside Opacus
        warnings.filterwarnings("ignore", message="a filter other code adds meanwhile")
        added = warnings.filters[0]
        a.join(10)
        a_out.set()
        b.join(10)
        after = list(warnings.filters)
    assert spent == {"A": expected, "B": expected}
    assert [str(w.message) for w in caught if "Optimal order" in str(w.message)] == []
    assert [f for f in after if not _edge(f)] == [added] + before
    assert sum(map(_edge, after)) == 1
