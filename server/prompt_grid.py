"""A deployed ServerApp's grid that collects replies as they arrive, not every 3 s.

Flower 1.41's ``HttpGrid.send_and_receive`` (the grid a deployed ServerApp gets) pushes the
messages, then asks the SuperLink for replies and, while some are missing, sleeps a fixed 3 s
before asking again (``flwr.superlink.grid.http_grid``; no option sets it). Every message
round of a deployed run - train, evaluate, each SecAgg+ stage - therefore ended on a 3 s
boundary after its last reply. ``PromptGrid`` wraps that grid and does the same loop (push,
pull until every reply is in or ``timeout`` passed) asking every ``poll`` seconds (from one
ask to the next, the time a pull took included); every
other call goes to Flower's grid unchanged. The trade-off: one ``PullMessages`` call on the
coordinator's own runtime port per ``poll`` while a round waits (loopback, the ServerApp
process only), not one per site: 10 a second at the 0.1 s default (0.2 s until session 16:
the last reply of an exchange waits ``poll / 2`` on average for the next pull, and the sites
now see each message within ~0.1 s, ``medfed.deploy.follow``). Reply objects missing on the SuperLink when pulled are
retried after 0.05 s doubling to 0.5 s (Flower: 1 s doubling to 10 s).

Simulation keeps Flower's in-memory grid (it polls every 0.1 s already). The loop itself is
:func:`collect`, which the preflight's policy query uses too, on whichever grid it gets, with
its own end: a wait for the first answer, then a quiet window that each answer restarts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from functools import partial

from flwr.app import Message
from flwr.serverapp import Grid

from protocol import wire
from protocol.hoptrace import enabled as tracing
from protocol.hoptrace import hop
from protocol.packing import PackingError, pack, unpack
from protocol.transport import OBJECT_PULL_BACKOFF

log = logging.getLogger(__name__)
REPLY_POLL = 0.1          # seconds between two pulls while replies are missing


class PromptGrid(Grid):
    """Flower's ``grid`` with ``send_and_receive`` polling every ``poll`` seconds."""

    def __init__(self, grid: Grid, poll: float = REPLY_POLL):
        if poll <= 0:
            raise ValueError(f"poll must be > 0 seconds, got {poll!r}")
        self.inner, self.poll = grid, poll

    def set_run(self, run_id: int) -> None:
        self.inner.set_run(run_id)

    @property
    def run(self):
        return self.inner.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Each message's model arrays packed into one byte array (``protocol.packing``): one
        object per message for a site to pull instead of one per tensor."""
        messages = list(messages)
        for m in messages:
            if m.has_content() and wire.ARRAYS in m.content.array_records:
                m.content[wire.ARRAYS] = pack(m.content.array_records[wire.ARRAYS])
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Replies with packed arrays restored. One that does not decode exactly is left
        packed: its keys are not the model's, so the update guard drops it as malformed
        (``strategies.guard``), never averaged."""
        replies = list(self.inner.pull_messages(message_ids))
        for m in replies:
            if not m.has_error() and wire.ARRAYS in m.content.array_records:
                try:
                    m.content[wire.ARRAYS] = unpack(m.content.array_records[wire.ARRAYS])
                except PackingError as err:
                    log.warning("node %s sent malformed packed arrays (%s)",
                                m.metadata.src_node_id, err)
        return replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Flower's loop (``HttpGrid.send_and_receive``) with a ``poll``-second wait."""
        hop("serverapp.push")
        pushed = list(self.push_messages(messages))
        for message_id in pushed:
            hop("serverapp.pushed", message_id)
        replies: list[Message] = []
        for got in collect(self, pushed, poll=self.poll, first=timeout):
            for m in got if tracing() else ():      # MEDFED_HOP_TRACE: no content
                hop("serverapp.collected", m.metadata.reply_to_message_id,
                    node=m.metadata.src_node_id)
            replies.extend(got)
        return replies


def collect(grid: Grid, message_ids: Iterable[str], *, poll: float = REPLY_POLL,
            first: float | None, quiet: float | None = None) -> Iterator[list[Message]]:
    """Each batch of replies to the pushed ``message_ids`` as ``grid`` returns it, pulled
    every ``poll`` seconds, until every message has one or the wait ends.

    Parameters
    ----------
    grid : Grid
        Any grid: its ``pull_messages`` is asked for the replies still missing.
    message_ids : iterable of str
        What ``push_messages`` returned.
    poll : float
        Seconds from one ask to the next: a pull that took part of it (downloading replies:
        0.1-0.5 s on a busy coordinator) is followed by the rest only.
    first : float or None
        Seconds to wait from the start (None: no limit, Flower's ``timeout=None``).
    quiet : float or None
        Once a reply came, the wait ends ``quiet`` seconds after the latest one instead (the
        preflight: sites that keep answering are waited for); None: ``first`` holds.
    """
    missing = set(message_ids)
    end = None if first is None else time.monotonic() + first
    while missing and (end is None or time.monotonic() < end):
        asked = time.monotonic()
        got = list(grid.pull_messages(list(missing)))
        if got:
            missing.difference_update(m.metadata.reply_to_message_id for m in got)
            if quiet is not None:
                end = time.monotonic() + quiet
            yield got
        if missing:
            time.sleep(max(0.0, poll - (time.monotonic() - asked)))


def prompt_grid(grid: Grid) -> Grid:
    """``PromptGrid`` around a deployed ServerApp's grid, whose reply objects are retried
    after 0.05-0.5 s instead of Flower's 1, 2, 4 ... s (this ServerApp process only); any
    other grid unchanged."""
    from flwr.superlink.grid import http_grid

    if not isinstance(grid, http_grid.HttpGrid):
        return grid
    if not isinstance(http_grid.pull_objects, partial):
        http_grid.pull_objects = partial(http_grid.pull_objects, **OBJECT_PULL_BACKOFF)
    return PromptGrid(grid)
