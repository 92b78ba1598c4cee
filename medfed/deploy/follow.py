"""How often a site asks for its next message: soon after it just handled one, slowly when idle.

A deployed run is a chain of message exchanges (train, evaluate, each SecAgg+ stage): a site
that has just sent its reply gets the run's next message a fraction of a second later, once the
coordinator has every reply and has aggregated. Traced on a deployed round (``bench/RESULTS.md``,
deploy, session 16): with a fixed 0.5 s idle poll the slowest of three sites saw the next
message up to 0.5 s after the coordinator had pushed it, on every exchange.

``FollowPoll`` asks every ``follow`` seconds for ``window`` seconds after the site last handled
a message (``touch``), and every ``idle`` seconds otherwise. The SuperNode's idle poll of the
coordinator (``medfed.deploy.supernode``) and the launcher's claim poll of its own SuperNode
(``medfed.deploy.launcher``) use it. The trade-off: for ``window`` seconds after each reply, a
site sends ``1 / follow`` small authenticated requests a second instead of ``1 / idle`` (the
SuperNode: 10 instead of 2; at 1,000 sites that is up to ~10,000 requests/s at the coordinator
while a round is in flight); a site that is not in a run polls at ``idle`` as before.
"""

from __future__ import annotations

import time

FOLLOW_POLL = 0.1       # seconds between two asks right after a message was handled
FOLLOW_WINDOW = 3.0     # seconds after a handled message during which ``FOLLOW_POLL`` applies


class FollowPoll:
    """The wait before the next ask: ``follow`` within ``window`` s of ``touch``, else ``idle``.

    Parameters
    ----------
    idle : float
        Seconds between two asks when no message was handled for ``window`` seconds.
    follow : float
        Seconds between two asks right after a message was handled (at most ``idle``).
    window : float
        How long after a handled message ``follow`` applies, in seconds (0 turns it off).
    """

    def __init__(self, idle: float, follow: float = FOLLOW_POLL, window: float = FOLLOW_WINDOW):
        if not 0 < idle:
            raise ValueError(f"the idle poll must be > 0 seconds, got {idle!r}")
        if not 0 < follow:
            raise ValueError(f"the follow poll must be > 0 seconds, got {follow!r}")
        if window < 0:
            raise ValueError(f"the follow window must be >= 0 seconds, got {window!r}")
        self.idle, self.follow, self.window = idle, min(follow, idle), window
        self._last = float("-inf")

    def touch(self) -> None:
        """A message was just handled: ask again soon."""
        self._last = time.monotonic()

    def interval(self) -> float:
        """Seconds to wait before the next ask."""
        return self.follow if time.monotonic() - self._last < self.window else self.idle
