"""A deployed ServerApp collects replies every 0.1 s, not on Flower's 3 s boundary (issue 27)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest

import server.prompt_grid as prompt


def _message(message_id: str) -> SimpleNamespace:
    """A message without content (what the grid looks at before pushing)."""
    return SimpleNamespace(id=message_id, has_content=lambda: False)


def _reply(message_id: str) -> SimpleNamespace:
    return SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=message_id),
                           has_error=lambda: False,
                           content=SimpleNamespace(array_records={}))


class _Grid:
    """Flower's grid contract, with replies that arrive on the third pull."""

    def __init__(self):
        self.pulls = 0
        self.run = "run-7"

    def push_messages(self, messages):
        return [m.id for m in messages]

    def pull_messages(self, message_ids):
        self.pulls += 1
        if self.pulls < 3:
            return []
        return [_reply(i) for i in sorted(message_ids)]

    def get_node_ids(self):
        return [1, 2]


def test_replies_are_collected_every_poll_not_every_3_s(monkeypatch):
    slept = []
    monkeypatch.setattr(prompt.time, "sleep", slept.append)
    monkeypatch.setattr(prompt.time, "monotonic", lambda: 5.0)      # pulls take no time
    inner = _Grid()
    grid = prompt.PromptGrid(inner)
    replies = grid.send_and_receive([_message("a"), _message("b")], timeout=60)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a", "b"]
    assert slept == [prompt.REPLY_POLL] * 2 and prompt.REPLY_POLL < 3
    assert grid.get_node_ids() == [1, 2] and grid.run == "run-7"


def test_the_time_a_pull_took_counts_towards_the_poll(monkeypatch):
    """A pull that downloads replies for 0.15 s is followed by 0.05 s of sleep, not 0.2 s; one
    slower than the poll by none."""
    now = [0.0]
    monkeypatch.setattr(prompt.time, "monotonic", lambda: now[0])
    slept = []
    monkeypatch.setattr(prompt.time, "sleep", slept.append)
    inner = _Grid()
    took = iter([0.15, 0.5, 0.0])
    real_pull = inner.pull_messages

    def slow_pull(ids):
        now[0] += next(took)
        return real_pull(ids)

    inner.pull_messages = slow_pull
    replies = prompt.PromptGrid(inner, poll=0.2).send_and_receive([_message("a")], timeout=60)
    assert len(replies) == 1
    assert slept == [pytest.approx(0.05), 0.0]


def test_a_timeout_still_ends_the_wait(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(prompt.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(prompt.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    inner = _Grid()
    inner.pull_messages = lambda ids: []                     # nobody answers
    assert prompt.PromptGrid(inner).send_and_receive([_message("a")], timeout=1.0) == []
    assert 1.0 <= now[0] < 1.0 + 2 * prompt.REPLY_POLL


def test_only_a_deployed_grid_is_wrapped_and_flowers_own_still_sleeps_3_s(monkeypatch):
    from flwr.superlink.grid import http_grid

    assert "time.sleep(3)" in inspect.getsource(http_grid.HttpGrid.send_and_receive)
    backoff = lambda: {k: inspect.signature(http_grid.pull_objects).parameters[k].default  # noqa: E731
                       for k in ("initial_backoff", "backoff_cap")}
    assert backoff() == {"initial_backoff": 1, "backoff_cap": 10}     # Flower's, unwrapped
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    simulated = object()
    assert prompt.prompt_grid(simulated) is simulated
    assert backoff() == {"initial_backoff": 1, "backoff_cap": 10}     # simulation: untouched
    deployed = http_grid.HttpGrid.__new__(http_grid.HttpGrid)
    assert isinstance(prompt.prompt_grid(deployed), prompt.PromptGrid)
    assert backoff() == prompt.OBJECT_PULL_BACKOFF                    # reply objects: prompt
    with pytest.raises(ValueError):
        prompt.PromptGrid(deployed, poll=0)
