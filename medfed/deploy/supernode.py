"""``flower-supernode`` with a shorter idle poll: how promptly a site sees a new message.

Flower 1.41's SuperNode asks the SuperLink for a message, and when there is none sleeps a fixed
3 s before asking again (``flwr.supernode.start_client_internal``: ``time.sleep(3)`` in its
main loop; no option or environment variable sets it). Every message of a deployed round
(train, evaluate, and each SecAgg stage) therefore waited 0-3 s at each site before the site
even saw it.

A message's objects (its arrays) are downloaded after the message itself, each retried with
Flower's backoff of 1, 2, 4 ... s (``PULL_INITIAL_BACKOFF``) while the SuperLink does not have
it yet - which on a busy coordinator is most messages: 3 s per message measured here.

While a message is in hand it waits on its own state: for the ClientApp's reply, and for a
reply object's bytes in its object store, each check followed by a fixed ``time.sleep(0.5)``
(local, in-process, no request to anyone). Traced on a deployed round (``bench/RESULTS.md``,
deploy): the runner had pushed its reply 0.3-0.5 s before the SuperNode sent it on, at each
site and every message exchange.

This entry point runs Flower's own ``flower_supernode`` unchanged, with ``time`` in that one
module replaced by a view whose ``sleep`` is capped: Flower's 3 s idle poll at
``--poll-interval`` seconds, its 0.5 s local waits at ``LOCAL_WAIT`` (0.05 s); its object
download retries after 0.05 s doubling up to 0.5 s (``protocol.transport.OBJECT_PULL_BACKOFF``;
only while an object is missing). For ``FOLLOW_WINDOW`` seconds after it sent a reply, its
idle poll is ``FOLLOW_POLL`` (0.1 s; ``medfed.deploy.follow``): the run's next message usually
comes a fraction of a second after the last reply (traced: the slowest of three sites saw it
up to 0.5 s late on every exchange). Everything else (arguments, TLS, node authentication,
retries, isolation) is Flower's. The trade-off: an idle site sends the SuperLink one
``PullMessages`` request per interval instead of one per 3 s - at 0.5 s, 2 requests/s per
site (1,000 sites: ~2,000 requests/s of small authenticated TLS calls), 10/s for 3 s after
each of its replies. ``medfed site --poll-interval`` chooses; ``3`` is Flower's behaviour. The
local waits cost a look at the SuperNode's own state 20 times a second while a ClientApp
works, nothing on the network.

One more change, not about time: Flower's loop reads the ``pyproject.toml`` inside each new
run's FAB (``get_fused_config_from_fab``: the run config's defaults) as soon as it has the
bundle - before the site's runner sees its digest. A FAB is a zip: a 299 KiB one inflated to a
300 MiB ``pyproject.toml`` that the SuperNode read whole (measured: +601 MiB peak memory). So
the SuperNode gets the site's allow-list too (``--allow-app``, before Flower's arguments) and
reads that file only from an approved FAB (``approved_config``); an unapproved one is stored
as bytes, its run config left empty, and the runner refuses its task by digest as before.

And one reply the runner never sees: when a claimed task's runner dies or hangs, Flower's
SuperNode itself answers the coordinator with ``CLIENT_APP_CRASHED`` ("ClientApp stopped
responding."). The SuperNode writes that reply's line to the site's egress audit (``--egress-log``,
``audited``) just before sending it, as the runner does for every other reply, and for every
reply a line saying whether its send to the coordinator went through.

    python -m medfed.deploy.supernode --poll-interval 0.5 [--allow-app D ...] \
        [--egress-log FILE] <flower-supernode arguments>
"""

from __future__ import annotations

import sys
import time
from functools import partial
from types import SimpleNamespace

from flwr.common.constant import ErrorCode

from protocol.hoptrace import enabled as tracing
from protocol.hoptrace import hop
from protocol.transport import OBJECT_PULL_BACKOFF

from .allowlist import AllowList, fab_digest
from .egress import EgressAudit
from .follow import FollowPoll

FLOWER_IDLE_POLL = 3.0        # what Flower 1.41 sleeps between two empty pulls
LOCAL_WAIT = 0.05             # for its 0.5 s waits on its own state (reply, reply bytes)


def capped_time(interval: float, local_wait: float = LOCAL_WAIT,
                poll: FollowPoll | None = None) -> SimpleNamespace:
    """The ``time`` module with ``sleep`` capped: Flower's idle poll (``FLOWER_IDLE_POLL``)
    at ``poll.interval()`` (``interval`` seconds when idle, sooner right after a reply), any
    shorter wait (its local ones) at ``local_wait``."""
    if not 0 < interval <= FLOWER_IDLE_POLL:
        raise ValueError(f"--poll-interval must be in (0, {FLOWER_IDLE_POLL:g}] seconds, got "
                         f"{interval!r}")
    poll = poll or FollowPoll(interval, window=0)

    def sleep(seconds: float) -> None:
        cap = poll.interval() if seconds >= FLOWER_IDLE_POLL else local_wait
        time.sleep(min(seconds, cap))

    view = SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    view.sleep = sleep
    return view


def approved_config(fused_config, allow: AllowList):
    """Flower's ``get_fused_config_from_fab`` for FABs on ``allow`` only: an unapproved one's
    zip is not opened (its run config is empty; the runner refuses the task by digest)."""

    def fused(fab_file, run):
        if isinstance(fab_file, bytes) and fab_digest(fab_file) in allow.digests:
            return fused_config(fab_file, run)
        return {}

    fused.flower = fused_config
    return fused


def install(interval: float, allow: AllowList = AllowList(),
            audit: EgressAudit | None = None) -> None:
    """Cap the SuperNode loop's sleeps (its module's ``time``: idle poll and local waits),
    shorten its object-download backoff, read run configs from approved FABs only
    (``approved_config``; none with an empty ``allow``) and write the replies it makes itself
    to ``audit`` (``audited``); the rest of Flower is untouched."""
    import flwr.supernode.start_client_internal as loop

    fused = getattr(loop.get_fused_config_from_fab, "flower", loop.get_fused_config_from_fab)
    loop.get_fused_config_from_fab = approved_config(fused, allow)

    push_messages = getattr(loop._push_messages, "flower", loop._push_messages)
    poll = FollowPoll(interval)
    loop.time = capped_time(interval, poll=poll)
    loop.pull_objects = partial(loop.pull_objects, **OBJECT_PULL_BACKOFF)
    if tracing():             # MEDFED_HOP_TRACE set: where a message's time goes (no content)
        loop._pull_and_store_message = traced_pull(loop._pull_and_store_message)
        push_messages = traced_push(push_messages)
    if audit is not None:
        push_messages = audited(push_messages, audit)
    loop._push_messages = followed(push_messages, poll)


def audited(push_messages, audit: EgressAudit):
    """Flower's ``_push_messages`` writing to ``audit`` how the send of each reply to the
    coordinator ended (``sent``: its header and every object it asked for went out), and,
    before it is sent, the line of each reply the SuperNode made itself (``CLIENT_APP_CRASHED``:
    its task's runner died or hung); the runner wrote the line of every other reply (and never
    sends that code). Flower logs and drops a failed send, so the failure is caught here: from
    an object push, and from anything else while a reply's objects go out (Flower's
    ``push_object_contents_from_iterable``, e.g. its object iterator reading the store)."""
    import flwr.supernode.start_client_internal as loop

    def push(**kw):
        send, push_object = kw["send"], kw["push_object"]
        # session id -> the reply whose objects are being pushed. By session, not "the last
        # reply": after one object fails Flower stops waiting for the others (its pool shuts
        # down without waiting), so a late failure of one reply can come after the next send.
        sending: dict = {}

        def settle(session=None, error: BaseException | None = None) -> None:
            for key in [session] if session is not None else list(sending):
                reply = sending.pop(key, None)      # atomic: settled once, by whoever first
                if reply is not None:
                    audit.outcome(reply, reply.metadata.run_id, "send", error)

        def audited_send(message, tree, runtime):
            settle()                    # the replies before: all their objects went out
            if message.has_error() and message.error.code == ErrorCode.CLIENT_APP_CRASHED:
                audit.record(message, message.metadata.run_id)
            try:
                result = send(message, tree, runtime)
            except BaseException as err:
                audit.outcome(message, message.metadata.run_id, "send", err)
                raise
            sending[result[1]] = message
            return result

        def audited_push_object(run_id, session_id, *args):
            try:
                return push_object(run_id, session_id, *args)
            except BaseException as err:
                settle(session_id, err)
                raise

        def audited_contents(contents, push_object_fn, **options):
            try:
                return push_contents(contents, push_object_fn, **options)
            except BaseException as err:    # Flower binds (run_id, session_id) by partial;
                args = getattr(push_object_fn, "args", ())      # unknown: every open send
                settle(args[1] if len(args) == 2 else None, err)
                raise

        push_contents = loop.push_object_contents_from_iterable
        loop.push_object_contents_from_iterable = audited_contents     # the loop's thread only
        try:
            result = push_messages(**kw | {"send": audited_send,
                                           "push_object": audited_push_object})
        except BaseException as err:    # stopped mid-way (Flower catches the rest)
            settle(error=err)
            raise
        finally:
            loop.push_object_contents_from_iterable = push_contents
        settle()
        return result

    return push


def traced_pull(pull_and_store):
    """Flower's ``_pull_and_store_message`` with hops: message received (its metadata), its
    objects stored (with the number of ``PullObject`` calls it took)."""

    def pull(**kw):
        receive, pull_object = kw["receive"], kw["pull_object"]
        confirm = kw["confirm_message_received"]
        calls = [0]

        def traced_receive():
            got = receive()
            if got is not None:
                meta = got[0].metadata
                hop("supernode.received", meta.message_id, run=meta.run_id, kind=meta.message_type)
            return got

        def traced_pull_object(run_id, object_id):
            calls[0] += 1
            return pull_object(run_id, object_id)

        def traced_confirm(run_id, message_id):
            hop("supernode.stored", message_id, pulls=calls[0])
            return confirm(run_id, message_id)

        return pull_and_store(**kw | {"receive": traced_receive, "pull_object": traced_pull_object,
                                      "confirm_message_received": traced_confirm})

    return pull


def traced_push(push_messages):
    """Flower's ``_push_messages`` with hops: reply found in the SuperNode's state, reply and
    its objects sent (with the number of ``PushObject`` calls)."""

    def push(**kw):
        send, push_object = kw["send"], kw["push_object"]
        calls, answered = [0], [""]

        def traced_send(message, tree, runtime):
            answered[0] = message.metadata.reply_to_message_id
            hop("supernode.reply_seen", answered[0])
            return send(message, tree, runtime)

        def traced_push_object(*args):
            calls[0] += 1
            return push_object(*args)

        try:
            return push_messages(**kw | {"send": traced_send, "push_object": traced_push_object})
        finally:
            hop("supernode.replied", answered[0], pushes=calls[0])

    return push


def followed(push_messages, poll: FollowPoll):
    """Flower's ``_push_messages`` (send the ClientApp's reply), then ``poll.touch()``: the
    loop's next idle waits are short while the run's next message is on its way."""

    def push_and_follow(*args, **kwargs):
        try:
            return push_messages(*args, **kwargs)
        finally:
            poll.touch()

    push_and_follow.follow_poll, push_and_follow.flower = poll, push_messages
    return push_and_follow


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    interval, approved, audit = FLOWER_IDLE_POLL, [], None
    while argv[:1] in (["--poll-interval"], ["--allow-app"], ["--egress-log"]):  # ours first
        if argv[0] == "--poll-interval":
            interval = float(argv[1])
        elif argv[0] == "--egress-log":
            audit = EgressAudit(argv[1])
        else:
            approved.append(argv[1])
        argv = argv[2:]
    install(interval, AllowList.build(approved), audit)
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main()
