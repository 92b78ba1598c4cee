"""The site's task launcher: MedFed's replacement for ``flower-superexec`` at a site.

``medfed site`` runs ``flower-supernode --isolation process``: the SuperNode then only queues
tasks on its loopback runtime API and leaves starting them to an executor the site runs
itself. This is that executor. It follows ``flwr.supercore.superexec.run_superexec``'s loop
(``AcquireTask`` for ClientApp tasks, signed with the site's runtime secret) but hands each
task to the site-owned runner (``python -m medfed.deploy.runner --serve``) with the site's
allow-list instead of ``flwr-clientapp``; see ``medfed.deploy.runner`` for why. The task token
goes to the runner on its standard input, not its command line (``medfed.deploy.runtime_auth``).

One runner per site, started with the launcher and kept (``SiteWorker``): it imports the app
and reads the site's data once, not once per message. The launcher claims a task only while
the runner is ready and idle, so a claimed token never waits in a pipe past Flower's
heartbeat window. It sends the runtime port nothing while that port is not held by the
site's own SuperNode (``runtime_auth.runtime_port_refusal``: restarting, or another account
squatting it); it says so once, in one line. If the runner dies, the launcher starts a new
one; one that has not said ``ready`` within ``--ready-timeout`` seconds (hung in an import, a
stuck file system) is stopped, logged and counted like one that died (bounded: three runners
in a row that never get ready stop the site, with one line saying why). The task it was
serving is then Flower's to settle: a task claimed but never started goes back to pending when its
token expires (~30 s) and is claimed again (retried); one that had started is failed by the
SuperNode when its heartbeat stops (~60 s), which sends the coordinator Flower's
``CLIENT_APP_CRASHED`` error reply for it - the path a crashed ``flwr-clientapp`` takes (that
reply's egress line is the SuperNode's: ``medfed.deploy.supernode.audited``).

It claims every ``--poll-interval`` seconds (0.2) while idle, and every ``CLAIM_FOLLOW`` (0.05)
for ``FOLLOW_WINDOW`` seconds after the runner finished a task (``medfed.deploy.follow``): the
run's next message reaches the SuperNode soon after the last reply. Loopback calls to the
site's own SuperNode, nothing on the network.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from protocol.hoptrace import hop

from .allowlist import AllowList
from .follow import FollowPoll
from .runtime_auth import (ForeignRuntimePort, RuntimePortGuard, load_pinned_node_config,
                           load_runtime_secret, signing_interceptor)

log = logging.getLogger("medfed.deploy")


def launcher_command(address: str, allow: AllowList, site_id: str,
                     egress_log: Path | None = None, *, runtime_secret: Path,
                     node_config: Path, supernode_pid: Path) -> list[str]:
    """Command line ``medfed site`` starts the launcher with (it dies with ``medfed site``);
    the secret travels as a path (the file is owner-only), never as a value; so do the
    node config the site gave its SuperNode (``runtime_auth.pin_node_config``) and the file
    naming that SuperNode's pid (``runtime_auth.pin_supernode_pid``)."""
    return [sys.executable, "-m", "medfed.deploy.launcher", "--runtime-api-address", address,
            "--site-id", site_id, "--parent-pid", str(os.getpid()), *allow.args(),
            "--runtime-secret-file", str(runtime_secret),
            "--node-config-file", str(node_config),
            "--supernode-pid-file", str(supernode_pid),
            *(["--egress-log", str(egress_log)] if egress_log else [])]


def worker_command(address: str, allow: AllowList, site_id: str,
                   egress_log: Path | None = None, *, node_config: Path,
                   supernode_pid: Path) -> list[str]:
    """Command line of the site's long-lived runner (same interpreter, so the same installed
    MedFed). No token here: any local account can read a command line, so tokens go over
    stdin; ``SiteWorker`` adds the events pipe (``--events-fd``). ``node_config`` is the
    site's pinned node config and ``supernode_pid`` names its SuperNode, both from the
    site, never from the runtime port."""
    return [sys.executable, "-m", "medfed.deploy.runner", "--runtime-api-address", address,
            "--serve", "--site-id", site_id, "--parent-pid", str(os.getpid()),
            *allow.args(), "--node-config-file", str(node_config),
            "--supernode-pid-file", str(supernode_pid),
            *(["--egress-log", str(egress_log)] if egress_log else [])]


class SiteWorker:
    """The launcher's handle on one long-lived runner process: tokens go in on its stdin,
    ``ready`` / ``done <code>`` come back on a pipe of their own."""

    def __init__(self, command: list[str]):
        self.command = command
        self.proc: subprocess.Popen | None = None
        self.ready = False
        self.started = 0.0                    # time.monotonic() at start
        self.task: str | None = None          # what it is serving now ("task 4 of run 7")
        self._events = -1
        self._buffer = b""

    def start(self) -> None:
        read, write = os.pipe()
        try:
            self.proc = subprocess.Popen([*self.command, "--events-fd", str(write)],
                                         stdin=subprocess.PIPE, pass_fds=(write,))
        finally:
            os.close(write)
        self._events = read
        self.started = time.monotonic()

    def waited(self) -> float:
        """Seconds since it was started."""
        return time.monotonic() - self.started

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def idle(self) -> bool:
        return self.ready and self.task is None and self.alive()

    def submit(self, token: str, task: str) -> bool:
        """Hand the runner one task token; False if it is gone (the task is then Flower's)."""
        assert self.proc is not None and self.proc.stdin is not None
        self.task = task
        try:
            self.proc.stdin.write(token.encode("ascii") + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            return False
        return True

    def wait(self, timeout: float) -> list[int]:
        """Wait up to ``timeout`` s for the runner's events (returns early on one); the exit
        codes of the tasks it finished meanwhile."""
        codes: list[int] = []
        if self._events < 0:
            time.sleep(timeout)
            return codes
        ready, _, _ = select.select([self._events], [], [], timeout)
        if not ready:
            return codes
        chunk = os.read(self._events, 4096)
        if not chunk:                         # the runner closed the pipe: it is exiting
            os.close(self._events)
            self._events = -1
            return codes
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if line == b"ready":
                self.ready = True
            elif line.startswith(b"done "):
                self.task = None
                codes.append(int(line.split()[1]))
        return codes

    def stop(self, grace: float = 5.0) -> None:
        """Close its stdin (it finishes the task in hand and exits), then make sure."""
        if self.proc is None:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=grace)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        if self._events >= 0:
            os.close(self._events)
            self._events = -1


def acquire_client(address: str, secret: bytes, *, supernode_pid: Path, retry: bool = True):
    """HTTP client of the SuperNode's runtime API that signs ``AcquireTask`` with ``secret``
    and sends nothing while the port is not the SuperNode's ``supernode_pid`` names
    (``RuntimePortGuard``: raises ``ForeignRuntimePort``).

    With ``retry`` (the launcher), Flower's invoker retries a busy port and stops this process
    on a 401 - a launcher whose secret the SuperNode refuses exits, and the site with it."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimePortGuard(address, supernode_pid),
                      RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      signing_interceptor(secret)],
        retry_invoker=make_simple_http_retry_invoker() if retry else None)


CLAIM_FOLLOW = 0.05       # seconds between two claims right after the runner finished a task
MAX_EARLY_DEATHS = 3      # runners that never get ready, in a row, before the site stops
READY_TIMEOUT = 300.0     # seconds a runner may take to import the app before it is stopped


def serve(address: str, allow: AllowList, *, site_id: str, secret: bytes, supernode_pid: Path,
          poll: float = 0.2, egress_log: Path | None = None, node_config: Path | None = None,
          command: list[str] | None = None, ready_timeout: float = READY_TIMEOUT) -> None:
    """Claim ClientApp tasks from the SuperNode forever (``AcquireTask`` signed with the
    site's runtime ``secret``, every ``poll`` s while the runner is idle and the port is held
    by the SuperNode ``supernode_pid`` names) and hand each to the site's long-lived runner,
    restarting it if it dies or is not ready within ``ready_timeout`` s (see the module
    docstring); every ``CLAIM_FOLLOW`` s for a while after the runner finished a task. The
    runner gets ``node_config`` (the site's pinned node config) and ``supernode_pid`` unless
    ``command`` replaces it (tests)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    if command is None:
        if node_config is None:
            raise ValueError("the site's runner needs its pinned node config (node_config)")
        command = worker_command(address, allow, site_id, egress_log, node_config=node_config,
                                 supernode_pid=supernode_pid)
    client = acquire_client(address, secret, supernode_pid=supernode_pid)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    worker, early_deaths = SiteWorker(command), 0
    refused: str | None = None               # why the port is not trusted now (said once)
    claims = FollowPoll(poll, follow=CLAIM_FOLLOW)
    worker.start()
    try:
        while True:
            if worker.alive() and not worker.ready and worker.waited() > ready_timeout:
                log.error("[%s] the site runner was not ready %.0f s after it started "
                          "(%d of %d in a row); stopping it", site_id, worker.waited(),
                          early_deaths + 1, MAX_EARLY_DEATHS)
                worker.stop(grace=0)
            if not worker.alive():
                early_deaths = 0 if worker.ready else early_deaths + 1
                if early_deaths >= MAX_EARLY_DEATHS:
                    raise RuntimeError(f"the site runner exited or hung {early_deaths} times "
                                       f"before it was ready (--ready-timeout "
                                       f"{ready_timeout:g} s); see its lines above")
                lost = (f"; {worker.task} is left to Flower (retried if it had not started, "
                        "else failed with CLIENT_APP_CRASHED)" if worker.task else "")
                log.error("[%s] the site runner exited (code %s)%s; starting a new one",
                          site_id, worker.proc.returncode if worker.proc else None, lost)
                worker.stop()
                worker = SiteWorker(command)
                worker.start()
            if worker.idle:
                try:
                    answer = client.AcquireTask(request)
                except ForeignRuntimePort as err:    # nothing was sent
                    if str(err) != refused:
                        log.warning("[%s] not claiming tasks: %s", site_id, err)
                    refused, answer = str(err), None
                else:
                    if refused is not None:
                        log.info("[%s] the site's SuperNode holds %s: claiming tasks",
                                 site_id, address)
                    refused = None
                if answer is not None and answer.HasField("task") and answer.token:
                    task = f"task {answer.task.task_id} of run {answer.task.run_id}"
                    hop("launcher.claimed", site=site_id, task=answer.task.task_id)
                    log.info("[%s] %s: handing it to the site runner", site_id, task)
                    worker.submit(answer.token, task)
            if worker.wait(claims.interval()):     # it finished a task: the next one is near
                claims.touch()
    finally:
        worker.stop()
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="MedFed site task launcher")
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--site-id", default="site")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--allow-app", action="append", default=[])
    p.add_argument("--egress-log", type=Path)
    p.add_argument("--node-config-file", type=Path, required=True,
                   help="the node config the site gave its SuperNode; passed to the runner, "
                        "which refuses tasks that carry another")
    p.add_argument("--supernode-pid-file", type=Path, required=True,
                   help="names the SuperNode the site started; nothing is sent to the runtime "
                        "port unless that process holds it")
    p.add_argument("--runtime-secret-file", type=Path, required=True,
                   help="the secret the SuperNode's --superexec-auth-secret-file names")
    p.add_argument("--poll-interval", type=float, default=0.2,
                   help="seconds between two claims while the runner is idle (loopback)")
    p.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT,
                   help="seconds the site runner may take to load the app before it is "
                        "stopped and counted as failed to start")
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)     # a poll a second is not news
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    allow = AllowList.build(args.allow_app)
    secret = load_runtime_secret(args.runtime_secret_file)
    load_pinned_node_config(args.node_config_file)      # fail here, not in each runner
    if not allow.digests:
        log.warning("[%s] no app approved: every run will be refused", args.site_id)
    try:
        serve(args.runtime_api_address, allow, site_id=args.site_id, secret=secret,
              supernode_pid=args.supernode_pid_file,
              egress_log=args.egress_log, node_config=args.node_config_file,
              poll=args.poll_interval,
              ready_timeout=args.ready_timeout)
    except RuntimeError as err:          # the runner cannot start: one line, the site stops
        log.error("[%s] %s", args.site_id, err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
