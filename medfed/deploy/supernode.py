"""``flower-supernode`` with a shorter idle poll: how promptly a site sees a new message.

Flower 1.41's SuperNode asks the SuperLink for a message, and when there is none sleeps a fixed
3 s before asking again (``flwr.supernode.start_client_internal``: ``time.sleep(3)`` in its
main loop; no option or environment variable sets it). Every message of a deployed round
(train, evaluate, and each SecAgg stage) therefore waited 0-3 s at each site before the site
even saw it. While waiting for its ClientApp's reply it polls its own state every 0.5 s.

A message's objects (its arrays) are downloaded after the message itself, each retried with
Flower's backoff of 1, 2, 4 ... s (``PULL_INITIAL_BACKOFF``) while the SuperLink does not have
it yet - which on a busy coordinator is most messages: 3 s per message measured here.

This entry point runs Flower's own ``flower_supernode`` unchanged, with ``time`` in that one
module replaced by a view whose ``sleep`` is capped at ``--poll-interval`` seconds (both
waits then last at most that long) and its object download retrying after 0.05 s doubling up
to 0.5 s (``OBJECT_PULL_BACKOFF``; only while an object is missing). Everything else (arguments, TLS, node authentication,
retries, isolation) is Flower's. The trade-off: an idle site sends the SuperLink one
``PullMessages`` request per interval instead of one per 3 s - at 0.5 s, 2 requests/s per
site (1,000 sites: ~2,000 requests/s of small authenticated TLS calls). ``medfed site
--poll-interval`` chooses; ``3`` is Flower's behaviour.

    python -m medfed.deploy.supernode --poll-interval 0.5 <flower-supernode arguments>
"""

from __future__ import annotations

import sys
import time
from functools import partial
from types import SimpleNamespace

FLOWER_IDLE_POLL = 3.0        # what Flower 1.41 sleeps between two empty pulls
# Retry of an object not there yet (Flower: 1 s, doubling, capped at 10 s). Used for the
# SuperNode's download from the SuperLink and the runner's pull from the SuperNode.
OBJECT_PULL_BACKOFF = {"initial_backoff": 0.05, "backoff_cap": 0.5}


def capped_time(interval: float) -> SimpleNamespace:
    """The ``time`` module with ``sleep`` capped at ``interval`` seconds."""
    if not 0 < interval <= FLOWER_IDLE_POLL:
        raise ValueError(f"--poll-interval must be in (0, {FLOWER_IDLE_POLL:g}] seconds, got "
                         f"{interval!r}")
    view = SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    view.sleep = lambda seconds: time.sleep(min(seconds, interval))
    return view


def install(interval: float) -> None:
    """Cap the SuperNode loop's sleeps (its module's ``time``) and shorten its object-download
    backoff; the rest of Flower is untouched."""
    import flwr.supernode.start_client_internal as loop

    loop.time = capped_time(interval)
    loop.pull_objects = partial(loop.pull_objects, **OBJECT_PULL_BACKOFF)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    interval = FLOWER_IDLE_POLL
    if argv[:1] == ["--poll-interval"]:
        interval = float(argv[1])
        argv = argv[2:]
    install(interval)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
