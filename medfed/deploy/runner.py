"""The site-owned ClientApp runner, in place of ``flwr-clientapp``: one long-lived process per
site that serves every task the launcher hands it.

Why this exists. Flower's ``flwr-clientapp`` (``flwr.supernode.runtime.run_clientapp``) pulls
the task's FAB from the SuperNode, ``install_from_fab``\\ s it and imports the ClientApp *from
the bundle the coordinator uploaded*: whoever runs the coordinator decides which code runs next
to the hospital's data, and every site-side protection (ledger, require-dp, require-secagg,
de-identification) lives inside that code. This runner keeps Flower's task protocol (pull the
task input, heartbeat, push the reply and the task status, with flwr's own functions) and
changes exactly three things:

1. after ``pull_task_input`` it recomputes the SHA-256 of the FAB bytes and checks it against
   the site's allow-list (``AllowList``, given on the runner's command line by the site
   daemon, never read from the wire). A FAB that is not approved is refused before anything
   of it is unpacked, installed or imported and before any file is opened: the coordinator
   gets an error reply (``ErrorCode.INVALID_FAB``, "app <digest12> not approved by this
   site ..."), the site log gets one line;
2. an approved run executes the ClientApp of the site's *own installed* MedFed package
   (``CLIENTAPP_REF``, the same component ``pyproject.toml`` names), never code from the FAB.
   The digest says "this is the release we reviewed"; the installed package is the code that
   runs, so even an approved digest cannot smuggle code, and upgrading MedFed at a site is an
   install plus a new ``--allow-app``;
3. before either, the task's node config must be the one ``medfed site`` gave its SuperNode
   (``--node-config-file``, written by the site, never read from the wire): a task offered
   on the runtime port by another account's process, with a data dir, privacy dir or report
   floor of its choosing, is refused the same way (``check_origin``; see
   ``medfed.deploy.runtime_auth``). And no request at all reaches the runtime port while a
   process other than the site's SuperNode holds it (``--supernode-pid-file``; the same
   check as the launcher's, before each request: ``runtime_auth.RuntimePortGuard``).

Why a runner and not a patched Flower. Flower 1.41's ``--isolation process`` lets the site
start its own executor next to the SuperNode (``medfed.deploy.launcher``); Flower's
``flower-superexec`` cannot be told to start anything but ``flwr-clientapp``. Neither the FAB
nor Flower's loader is touched on the refused path (tests patch both to fail).

Why long-lived (``--serve``). ``flwr-clientapp`` is one process per message: a deployed round
paid ~10 s of imports per message and the site re-read and decoded all of its DICOM each
time. The runner imports the site's ClientApp once, says ``ready`` on its events pipe, then
reads task tokens from its standard input, one a line, and serves each in turn exactly as
``flwr-clientapp`` serves its one token (pull the task input, check the FAB digest, run the
app, audit and push the reply, push the task status); the app object, and with it the site's
``SiteDataCache``, stays loaded between messages and runs. Every check is per task: the FAB's
bytes are hashed again for each message (a run cannot be approved once and swapped later),
each reply gets its own egress line, each token its own runtime client. After each task it
writes ``done <code>`` on the events pipe, so the launcher claims the next task only when the
runner is free (a claimed token is never left waiting past Flower's heartbeat window).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.common.constant import FLWR_TASK_TOKEN_LENGTH, ErrorCode, SubStatus
from flwr.supercore.fab import Fab

from protocol.hoptrace import hop

from .allowlist import AllowList, AppRefused
from .egress import EgressAudit
from .runtime_auth import (ForeignRuntimePort, RuntimePortGuard, foreign_node_config,
                           load_pinned_node_config)

log = logging.getLogger("medfed.deploy")

# The site's own ClientApp; tests/security/test_app_allowlist.py checks that pyproject.toml's
# [tool.flwr.app.components] clientapp names the same object.
CLIENTAPP_REF = "client.app:app"
# Flower's task token: FLWR_TASK_TOKEN_LENGTH random bytes, hex (flwr.common.args checks it so)
TOKEN = re.compile(rf"[0-9a-f]{{{FLWR_TASK_TOKEN_LENGTH * 2}}}")
READY = b"ready\n"              # events pipe: the app is imported, send tasks


def load_installed_clientapp():
    """The ClientApp of the MedFed package installed at this site (never the FAB's copy)."""
    module, attr = CLIENTAPP_REF.split(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Outcome:
    """What a task produced: the reply to push and Flower's task status."""
    reply: Message
    sub_status: str
    details: str


def handle_task(message: Message, context: Context, fab: Fab, allow: AllowList, *,
                site_id: str = "site", load_app: Callable = load_installed_clientapp) -> Outcome:
    """Verify the task's FAB, then run the site's installed ClientApp on the message.

    Parameters
    ----------
    message, context : Message, Context
        The task input the SuperNode handed over.
    fab : Fab
        The FAB of the run (only its bytes are hashed; nothing of it is unpacked).
    allow : AllowList
        The digests this site's operator approved.
    site_id : str
        For the site log.
    load_app : callable
        Returns the ClientApp to run (the installed one; injectable for tests).

    Returns
    -------
    Outcome
        An error reply (``INVALID_FAB``) when refused, else the ClientApp's reply.
    """
    try:
        digest = allow.check(fab.content)
        if fab.hash_str and fab.hash_str != digest:
            # The SuperNode's label disagrees with the bytes: refuse rather than guess which
            # one the coordinator meant.
            raise AppRefused(digest, empty=False)
    except AppRefused as refused:
        reason = str(refused)
        log.error("[%s] run %s refused: %s", site_id, message.metadata.run_id, reason)
        return Outcome(Message(Error(code=ErrorCode.INVALID_FAB, reason=reason),
                               reply_to=message), SubStatus.FAILED, reason)
    log.info("[%s] run %s: app %s approved; starting the site's installed ClientApp",
             site_id, message.metadata.run_id, digest[:12])
    hop("runner.approved", message.metadata.message_id, site=site_id)
    from client.mods.errors import SiteError

    try:
        reply = load_app()(message=message, context=context)
    except SiteError as err:    # the site's one-line answer, written to be sent: a policy
        # line (no path or patient data; a DP refusal may carry the training count's 1/n or
        # steps, which the training reply carries anyway) or a fixed generic message
        reason = str(err)
        log.warning("[%s] run %s: %s", site_id, message.metadata.run_id, reason)
        return Outcome(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                               reply_to=message), SubStatus.FAILED, reason)
    except Exception as err:  # noqa: BLE001 - the coordinator gets a code, the site the trace
        log.exception("[%s] run %s: the ClientApp raised", site_id, message.metadata.run_id)
        reason = f"the site's ClientApp raised {type(err).__name__}"
        return Outcome(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason),
                               reply_to=message), SubStatus.FAILED, reason)
    return Outcome(reply, SubStatus.COMPLETED, "")


ORIGIN_REFUSED = ("task refused by the site: its node config is not the one this site gave "
                  "its SuperNode")


def check_origin(message: Message, context: Context, node_config: Mapping[str, object], *,
                 site_id: str = "site") -> Outcome | None:
    """An error ``Outcome`` (nothing run) when the task's node config is not ``node_config``,
    the one the site gave its SuperNode: another process then serves the runtime port."""
    differ = foreign_node_config(context.node_config, node_config)
    if not differ:
        return None
    log.error("[%s] run %s refused: its node config differs from this site's in %s; another "
              "process answers on the site's runtime port", site_id, message.metadata.run_id,
              ", ".join(differ))
    return Outcome(Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=ORIGIN_REFUSED),
                           reply_to=message), SubStatus.FAILED, ORIGIN_REFUSED)


def run_task(client, allow: AllowList, *, node_config: Mapping[str, object],
             site_id: str = "site", load_app: Callable = load_installed_clientapp,
             audit: EgressAudit | None = None) -> int:
    """One task over the SuperNode's runtime API, as ``run_clientapp`` does minus the FAB,
    refused unless its node config is ``node_config`` (``check_origin``); every reply
    (refusals and errors included) is written to ``audit`` before it is pushed, and how the
    push ended after it (``EgressAudit.sending``)."""
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supernode.runtime.run_clientapp import (pull_task_input, push_message,
                                                      push_task_output)

    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    heartbeat.start()
    context, outcome, pushed = None, None, False
    try:
        start = time.perf_counter()
        hop("runner.start", site=site_id)
        message, context, _run, fab = pull_task_input(client)
        pulled = time.perf_counter()
        message_id = message.metadata.message_id
        hop("runner.pulled", message_id, site=site_id)
        outcome = (check_origin(message, context, node_config, site_id=site_id)
                   or handle_task(message, context, fab, allow, site_id=site_id,
                                  load_app=load_app))
        hop("runner.handled", message_id, site=site_id)
        handled = time.perf_counter()
        with (audit.sending(outcome.reply, context.run_id, "push") if audit is not None
              else nullcontext()):
            push_message(client, outcome.reply, context)
            pushed = True        # set before the audit writes its outcome line, so a
                                 # failing write does not report a pushed reply as failed
        hop("runner.pushed", message_id, site=site_id)
        # where a message's time goes at the site (durations only)
        log.info("[%s] run %s: task input pulled in %.1fs, app %.1fs, reply pushed in %.1fs",
                 site_id, context.run_id, pulled - start, handled - pulled,
                 time.perf_counter() - handled)
    finally:
        try:
            # a task whose reply did not reach the SuperNode did not complete, whatever the
            # app returned (the reason names no exception text: it may quote the reply)
            done = outcome if outcome and pushed else None
            push_task_output(client=client, context=context,
                             sub_status=done.sub_status if done else SubStatus.FAILED,
                             details=(done.details if done else "the reply was not pushed"
                                      if outcome else "the site runner failed"))
            hop("runner.status_pushed", site=site_id)
        finally:                        # a refused port (ForeignRuntimePort) stops beats too
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
    return 0 if pushed and outcome.sub_status == SubStatus.COMPLETED else 1


def runtime_client(address: str, token: str, *, supernode_pid: Path):
    """HTTP client of the SuperNode's runtime API on loopback, authenticated by the task token;
    it sends nothing while the port is not the SuperNode's ``supernode_pid`` names."""
    from flwr.supercore.interceptors import (RuntimeTokenHttpInterceptor,
                                             RuntimeVersionHttpInterceptor)
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimePortGuard(address, supernode_pid),
                      RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker())


# Retries of the runner's pull from its own SuperNode (loopback, this machine): the SuperNode
# offers the task as soon as the message header arrives and downloads the arrays afterwards,
# so the runner's first pulls miss. Traced (bench/deploy.py --trace, session 17): with the
# shared 0.05-0.5 s backoff the runner had its input 0.13-0.37 s (median per exchange) after
# the SuperNode had stored it - its retries had backed off to 0.4-0.5 s by then.
LOCAL_PULL_BACKOFF = {"initial_backoff": 0.02, "backoff_cap": 0.1}


def prompt_pulls() -> None:
    """Pull a message's objects from the site's own SuperNode retrying every 0.02-0.1 s
    (``LOCAL_PULL_BACKOFF``) instead of Flower's 1, 2, 4 ... s: the SuperNode offers the task
    before it has downloaded the message's arrays, so the first tries usually miss, and with
    Flower's backoff a tiny model took 3-8 s to arrive (measured). Loopback, this process only:
    at most ~10 small requests a second to the site's own SuperNode while an object is missing."""
    from functools import partial

    import flwr.supernode.runtime.run_clientapp as flwr_clientapp

    flwr_clientapp.pull_and_inflate_object_from_tree = partial(
        flwr_clientapp.pull_and_inflate_object_from_tree, **LOCAL_PULL_BACKOFF)


def read_tokens(stream: BinaryIO) -> Iterator[str]:
    """Task tokens from the launcher, one a line, until it closes the pipe. Lines are read
    bounded; anything but a token ends the runner (the pipe is the launcher's alone)."""
    limit = FLWR_TASK_TOKEN_LENGTH * 2 + 1
    while line := stream.readline(limit + 1):
        token = line.removesuffix(b"\n").decode("ascii", "replace")
        if not TOKEN.fullmatch(token):
            raise ValueError("the site runner received something other than a task token")
        yield token


def serve(tokens: Iterable[str], connect: Callable, allow: AllowList, *,
          report: Callable[[int], None], node_config: Mapping[str, object],
          site_id: str = "site", load_app: Callable = load_installed_clientapp,
          audit: EgressAudit | None = None) -> int:
    """Serve each task token in this process (``run_task`` with ``connect(token)``'s client);
    ``report(code)`` after each. A task that fails to pull or push does not stop the next one.
    Returns the number of tasks served."""
    served = 0
    for token in tokens:
        try:
            code = run_task(connect(token), allow, node_config=node_config, site_id=site_id,
                            load_app=load_app, audit=audit)
        except KeyboardInterrupt:          # the launcher went away mid-task: say so, stop
            log.info("[%s] site runner interrupted during a task (after %d served); "
                     "stopping", site_id, served)
            raise
        except ForeignRuntimePort as err:  # the rest of the task was not sent
            log.error("[%s] task abandoned, nothing more sent to the runtime port: %s",
                      site_id, err)
            code = 1
        except Exception:  # noqa: BLE001 - one broken exchange must not take the site down
            log.exception("[%s] a task failed outside the ClientApp (runtime API)", site_id)
            code = 1
        served += 1
        report(code)
    return served


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="MedFed site ClientApp runner (long-lived)")
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--serve", action="store_true", required=True,
                   help="read task tokens from standard input, one a line (never from argv)")
    p.add_argument("--events-fd", type=int, required=True,
                   help="pipe to the launcher: 'ready', then 'done <code>' per task")
    p.add_argument("--site-id", default="site")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--allow-app", action="append", default=[])
    p.add_argument("--egress-log", help="append one audit line per reply to this file")
    p.add_argument("--node-config-file", type=Path, required=True,
                   help="the node config the site gave its SuperNode (runtime_auth."
                        "pin_node_config); tasks with another one are refused")
    p.add_argument("--supernode-pid-file", type=Path, required=True,
                   help="names the site's SuperNode (runtime_auth.pin_supernode_pid); nothing "
                        "is sent to the runtime port unless that process holds it")
    return p


def main(argv: list[str] | None = None) -> int:
    """Serve tokens until stdin closes. When its launcher goes away (the site is stopping,
    e.g. after the coordinator refused its key), Flower's parent monitor raises SIGINT here,
    mostly while the app is still being imported: the runner then exits quietly (130), not
    with a KeyboardInterrupt traceback in the site's log; one arriving during a task leaves
    one line there (``serve``). A site started in the background of a non-interactive shell
    (``nohup medfed site ... &`` in a script) hands its processes SIGINT *ignored*, which
    Python keeps: the parent monitor's signal would then be lost and the runner would
    outlive its launcher, so the runner restores Python's handler first. A launcher gone
    before the runner said it is ready (its events pipe closed) stops it quietly too."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _serve_tokens(argv)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:             # the launcher closed the events pipe: it is gone
        return 0


def _serve_tokens(argv: list[str] | None) -> int:
    """``main`` without the quiet stop."""
    args = parser().parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)     # a poll a second is not news
    # torch configures its loggers at the end of its import; one interrupted before that
    # would print its FakeTensor cache statistics at exit through our INFO root logger
    logging.getLogger("torch").setLevel(logging.WARNING)
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    allow = AllowList.build(args.allow_app)
    node_config = load_pinned_node_config(args.node_config_file)
    audit = EgressAudit(args.egress_log) if args.egress_log else None
    load_installed_clientapp()            # the imports, once, before the first task
    prompt_pulls()
    events = args.events_fd
    os.write(events, READY)

    def report(code: int) -> None:
        os.write(events, f"done {code}\n".encode("ascii"))

    def connect(token: str):
        return runtime_client(args.runtime_api_address, token,
                              supernode_pid=args.supernode_pid_file)

    served = serve(read_tokens(sys.stdin.buffer), connect, allow, report=report,
                   node_config=node_config, site_id=args.site_id, audit=audit)
    log.info("[%s] site runner stopping after %d tasks", args.site_id, served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
