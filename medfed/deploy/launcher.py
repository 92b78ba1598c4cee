"""The site's task launcher: MedFed's replacement for ``flower-superexec`` at a site.

``medfed site`` runs ``flower-supernode --isolation process``: the SuperNode then only queues
tasks on its loopback runtime API and leaves starting them to an executor the site runs
itself. This is that executor. It follows ``flwr.supercore.superexec.run_superexec``'s loop
(``AcquireTask`` for ClientApp tasks, signed with the site's runtime secret, one process per
task) but starts the site-owned runner (``python -m medfed.deploy.runner``) with the site's
allow-list instead of ``flwr-clientapp``; see ``medfed.deploy.runner`` for why. The task token
goes to the runner on its standard input, not its command line (``medfed.deploy.runtime_auth``).
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from .allowlist import AllowList
from .runtime_auth import load_runtime_secret, signing_interceptor

log = logging.getLogger("medfed.deploy")


def launcher_command(address: str, allow: AllowList, site_id: str,
                     egress_log: Path | None = None, *, runtime_secret: Path) -> list[str]:
    """Command line ``medfed site`` starts the launcher with (it dies with ``medfed site``);
    the secret travels as a path (the file is owner-only), never as a value."""
    return [sys.executable, "-m", "medfed.deploy.launcher", "--runtime-api-address", address,
            "--site-id", site_id, "--parent-pid", str(os.getpid()), *allow.args(),
            "--runtime-secret-file", str(runtime_secret),
            *(["--egress-log", str(egress_log)] if egress_log else [])]


def runner_command(address: str, allow: AllowList, site_id: str,
                   egress_log: Path | None = None) -> list[str]:
    """Command line of one task's runner (same interpreter, so the same installed MedFed).
    No token here: any local account can read a command line, so it goes over stdin."""
    return [sys.executable, "-m", "medfed.deploy.runner", "--runtime-api-address", address,
            "--token-stdin", "--site-id", site_id, "--parent-pid", str(os.getpid()),
            *allow.args(), *(["--egress-log", str(egress_log)] if egress_log else [])]


def start_runner(cmd: list[str], token: str) -> subprocess.Popen:
    """Start one runner and hand it its task token over a pipe."""
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
    try:
        proc.stdin.write(token.encode("ascii") + b"\n")
        proc.stdin.close()
    except BrokenPipeError:        # the runner died before reading; it reports nothing
        log.error("the site runner exited before it received its task")
    return proc


def acquire_client(address: str, secret: bytes, *, retry: bool = True):
    """HTTP client of the SuperNode's runtime API that signs ``AcquireTask`` with ``secret``.

    With ``retry`` (the launcher), Flower's invoker retries a busy port and stops this process
    on a 401 - a launcher whose secret the SuperNode refuses exits, and the site with it."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      signing_interceptor(secret)],
        retry_invoker=make_simple_http_retry_invoker() if retry else None)


def serve(address: str, allow: AllowList, *, site_id: str, secret: bytes, poll: float = 1.0,
          egress_log: Path | None = None) -> None:
    """Acquire ClientApp tasks from the SuperNode forever (``AcquireTask`` signed with the
    site's runtime ``secret``); start a runner for each."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType

    client = acquire_client(address, secret)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    running: list[subprocess.Popen] = []
    try:
        while True:
            running = [p for p in running if p.poll() is None]      # reap finished runners
            answer = client.AcquireTask(request)
            if answer.HasField("task") and answer.token:
                log.info("[%s] task %d of run %d: starting the site runner", site_id,
                         answer.task.task_id, answer.task.run_id)
                running.append(start_runner(
                    runner_command(address, allow, site_id, egress_log), answer.token))
            time.sleep(poll)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="MedFed site task launcher")
    p.add_argument("--runtime-api-address", required=True)
    p.add_argument("--site-id", default="site")
    p.add_argument("--parent-pid", type=int)
    p.add_argument("--allow-app", action="append", default=[])
    p.add_argument("--egress-log", type=Path)
    p.add_argument("--runtime-secret-file", type=Path, required=True,
                   help="the secret the SuperNode's --superexec-auth-secret-file names")
    args = p.parse_args(argv)
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)     # a poll a second is not news
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)
    allow = AllowList.build(args.allow_app)
    secret = load_runtime_secret(args.runtime_secret_file)
    if not allow.digests:
        log.warning("[%s] no app approved: every run will be refused", args.site_id)
    serve(args.runtime_api_address, allow, site_id=args.site_id, secret=secret,
          egress_log=args.egress_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
