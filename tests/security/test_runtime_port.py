"""Attacker: another account on the hospital's site machine. The SuperNode queues each task on
its runtime API at 127.0.0.1:<runtime-port>; loopback keeps the network out, not the other
users of the machine. Whoever claims a task gets its token, and with it pulls the message
(global weights, run config) and the FAB and pushes the reply the coordinator aggregates as
the hospital's. Flower's SuperExec secret (``--superexec-auth-secret-file``) makes the claim
(``AcquireTask``) require an HMAC with the site's secret; ``medfed site`` owns that secret and
hands the token to its runner over a pipe, not a command line. The other direction (a squatter
on the port while the site's SuperNode restarts) is at the end of the file."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from flwr.common.config import parse_config_args
from flwr.common.constant import ErrorCode
from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse  # pylint: disable=E0611
from flwr.supercore.auth import create_superexec_auth_metadata, derive_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.main import create_app
from flwr.supernode.nodestate import NodeStateFactory

from medfed.certs import site_keygen, write_certs
from medfed.deploy import launcher, runner
from medfed.deploy.allowlist import AllowList, fab_digest
from medfed.deploy.egress import EgressAudit, read_replies
from medfed.deploy.launcher import SiteWorker, acquire_client, worker_command
from medfed.deploy.preflight import DeployError
from medfed.deploy.runner import parser as runner_parser
from medfed.deploy import runtime_auth
from medfed.deploy.runtime_auth import (ACQUIRE_TASK, NODE_CONFIG, RUNTIME_SECRET,
                                        SUPERNODE_PID, ForeignRuntimePort,
                                        check_runtime_secret, ensure_runtime_secret,
                                        foreign_node_config, load_pinned_node_config,
                                        load_runtime_secret, pin_node_config,
                                        pin_supernode_pid, runtime_port_refusal)
from medfed.deploy import site as site_module
from medfed.deploy.site import Site, SiteSettings, node_config, supernode_command
from protocol import wire

from ..deploy.conftest import Children, free_port, run_medfed

ACQUIRE_URL = "/v1/runtime/acquire-task"
PROTOBUF = {"content-type": "application/protobuf"}
CLAIM = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])


def _signed(secret: bytes) -> dict[str, str]:
    """Headers of a claim signed with ``secret`` (what Flower's interceptor attaches)."""
    return {**PROTOBUF, **create_superexec_auth_metadata(
        auth_secret=derive_auth_secret(secret), method=ACQUIRE_TASK, request=CLAIM)}


def _rogue(address: str) -> RuntimeHttpClient:
    """Flower's own runtime client, as any local account can run it, without the secret."""
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])


# --- the claim, against Flower's SuperNode runtime app with one task queued -----------------

def test_without_the_site_secret_a_local_process_cannot_claim_a_queued_task(tmp_path):
    secret = load_runtime_secret(ensure_runtime_secret(tmp_path))
    factory = NodeStateFactory(objectstore_factory=ObjectStoreFactory())
    task_id = factory.state().create_task(task_type=TaskType.CLIENT_APP, run_id=7,
                                          fab_hash="f" * 64)
    app = create_app(state_factory=factory, superexec_auth_secret=secret)
    body = CLAIM.SerializeToString()
    with TestClient(app) as http:
        # no signature, a signature with a guessed secret: refused, nothing handed out
        for headers in (PROTOBUF, _signed(b"guess"), _signed(secret[:-1])):
            answer = http.post(ACQUIRE_URL, content=body, headers=headers)
            assert answer.status_code == 401, answer.content
            assert b"token" not in answer.content.lower()
        # the launcher's signed claim gets the task: the rogue calls claimed nothing
        launcher = _signed(secret)
        answer = http.post(ACQUIRE_URL, content=body, headers=launcher)
        assert answer.status_code == 200
        claimed = AcquireTaskResponse.FromString(answer.content)
        assert claimed.task.task_id == task_id and claimed.token
        # a replayed signed claim (same nonce) is refused
        assert http.post(ACQUIRE_URL, content=body, headers=launcher).status_code == 401


# --- the real site SuperNode, started with medfed's command line ------------------------------

@pytest.fixture()
def children(tmp_path):
    procs = Children(tmp_path)
    try:
        yield procs
    finally:
        procs.cleanup()


@pytest.mark.slow
def test_the_sites_supernode_refuses_claims_without_the_site_secret(tmp_path, children):
    write_certs(tmp_path / "certs", server_name="localhost", sites=["a"])
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    secret_file = ensure_runtime_secret(state)
    port = free_port()
    settings = SiteSettings(site_id="a", data_dir=tmp_path, root_cert=tmp_path / "certs/ca.pem",
                            auth_key=tmp_path / "certs/sites/a/auth.key", state_dir=state,
                            # nobody listens there: the runtime API is up before the SuperNode
                            # reaches its coordinator, which is all this test needs
                            superlink=f"127.0.0.1:{free_port()}", runtime_port=port)
    supernode = children.start("supernode", supernode_command(settings))
    children.wait_for("supernode", "Uvicorn running on", timeout=120)
    address = f"127.0.0.1:{port}"
    # the launcher's port check finds Flower's runtime API among this process's sockets
    pid_file = pin_supernode_pid(state, supernode.pid)
    assert runtime_port_refusal(address, pid_file) is None

    with pytest.raises(httpx.HTTPStatusError) as refused:
        _rogue(address).AcquireTask(CLAIM)
    assert refused.value.response.status_code == 401
    forged = tmp_path / "forged.secret"
    forged.write_bytes(os.urandom(32))
    with pytest.raises(httpx.HTTPStatusError) as refused:
        acquire_client(address, forged.read_bytes(), supernode_pid=pid_file,
                       retry=False).AcquireTask(CLAIM)
    assert refused.value.response.status_code == 401
    # the site's own launcher client is let in (no task queued: an empty answer)
    answer = acquire_client(address, load_runtime_secret(secret_file), supernode_pid=pid_file,
                            retry=False).AcquireTask(CLAIM)
    assert not answer.HasField("task")


# --- the task token never sits on a command line ---------------------------------------------

def test_the_runner_gets_its_task_tokens_over_a_pipe_not_its_command_line(tmp_path):
    token = "ab" * 128                                         # Flower's token format
    cmd = worker_command("127.0.0.1:9094", AllowList(), "a", node_config=tmp_path / "n",
                         supernode_pid=tmp_path / "p")
    assert token not in " ".join(cmd) and "--serve" in cmd
    with pytest.raises(SystemExit):                            # no way to pass it in argv
        runner_parser().parse_args(["--runtime-api-address", "x:1", "--events-fd", "3",
                                    "--token", token])
    # SiteWorker delivers it to the runner's stdin reader (the one runner.main uses)
    out = tmp_path / "got"
    worker = SiteWorker([sys.executable, "-c",
                         "import os, pathlib, sys\n"
                         "from medfed.deploy.runner import read_tokens\n"
                         "pathlib.Path(sys.argv[1]).write_text(''.join(read_tokens("
                         "sys.stdin.buffer)))", str(out)])
    worker.start()
    assert token not in " ".join(worker.proc.args)
    worker.submit(token, "task")
    worker.stop(grace=120)
    assert worker.proc.returncode == 0
    assert out.read_text() == token


# --- the secret file ------------------------------------------------------------------------

def test_the_secret_is_created_owner_only_once_and_kept(tmp_path):
    path = ensure_runtime_secret(tmp_path)
    assert path == tmp_path / RUNTIME_SECRET
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_bytes()
    assert len(first) == 64 and int(first, 16)                 # 32 random bytes, hex
    assert ensure_runtime_secret(tmp_path).read_bytes() == first


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606])
def test_a_secret_others_can_touch_is_refused(tmp_path, mode):
    path = ensure_runtime_secret(tmp_path)
    os.chmod(path, mode)
    with pytest.raises(DeployError, match=f"accessible by group/other \\(mode {mode:04o}\\)"):
        check_runtime_secret(path)
    with pytest.raises(DeployError, match="group/other"):
        ensure_runtime_secret(tmp_path)                        # not silently reused


def test_a_linked_or_empty_secret_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"x" * 64)
    os.chmod(target, 0o600)
    state = tmp_path / "state"
    state.mkdir()
    (state / RUNTIME_SECRET).symlink_to(target)
    with pytest.raises(DeployError, match="not a regular file"):
        ensure_runtime_secret(state)
    empty = tmp_path / "empty"
    empty.touch(mode=0o600)
    with pytest.raises(DeployError, match="empty"):
        check_runtime_secret(empty)


def _record_daemons(monkeypatch) -> list:
    """``Site.start`` without its processes: the command lines of the daemons it would start
    (SuperNode, launcher), and no preflight."""
    started = []

    class FakeDaemon:
        stopping = True                                         # the launcher watcher: done
        proc = type("Proc", (), {"pid": 4242})                  # what start_supernode pins

        def __init__(self, cmd, **_):
            started.append(cmd)

        def start(self):
            pass

        def wait(self):
            pass

    monkeypatch.setattr(site_module, "Daemon", FakeDaemon)
    monkeypatch.setattr(Site, "preflight", lambda self: None)
    return started


def test_site_start_creates_the_secret_and_gives_it_to_supernode_and_launcher(tmp_path,
                                                                               monkeypatch):
    started = _record_daemons(monkeypatch)
    settings = SiteSettings(site_id="a", data_dir=tmp_path, superlink="x:1",
                            root_cert=tmp_path / "ca",
                            auth_key=site_keygen(tmp_path / "keys", site="a").private,
                            state_dir=tmp_path / "s")    # a real key: start() records its
    Site(settings).start()                               # fingerprint for restarts
    secret = tmp_path / "s" / RUNTIME_SECRET
    check_runtime_secret(secret)                                # created, owner-only
    supernode, launcher_argv = started
    assert supernode[supernode.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert launcher_argv[launcher_argv.index("--runtime-secret-file") + 1] == str(secret)
    assert secret.read_text() not in " ".join(supernode + launcher_argv)   # a path, not a value


def test_site_refuses_a_readable_secret_before_reading_data_or_connecting(tmp_path):
    key = site_keygen(tmp_path / "keys", site="a").private
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(ensure_runtime_secret(state), 0o644)
    settings = SiteSettings(site_id="a", data_dir=tmp_path / "no-data", superlink="127.0.0.1:1",
                            root_cert=tmp_path / "no-ca.pem", auth_key=key, state_dir=state)
    with pytest.raises(DeployError, match="runtime secret .* group/other"):
        Site(settings).preflight()


def test_cli_site_with_a_group_readable_secret_fails_in_one_line(tmp_path):
    key = site_keygen(tmp_path / "keys", site="a").private
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(ensure_runtime_secret(state), 0o640)
    result = run_medfed("site", "--site-id", "a", "--data-dir", str(tmp_path / "no-data"),
                        "--superlink", f"127.0.0.1:{free_port()}", "--state-dir", str(state),
                        "--root-cert", str(tmp_path / "ca.pem"), "--auth-key", str(key))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("medfed: error: runtime secret")
    assert result.stderr.count("\n") == 1 and "group/other" in result.stderr


# --- the other direction: a squatter on the runtime port feeds the runner its own tasks -------
# While the site's SuperNode is down (restarted every 10 s while the coordinator still holds the
# site's previous session) another account binds 127.0.0.1:<runtime-port> with a stock Flower
# SuperNode: no secret asked, so the launcher's claim would get the squatter's task, with a node
# config (data dir, privacy dir: a fresh ledger, report floor) the squatter chose or copied.
# First line: launcher and runner send the port nothing unless the SuperNode the site started
# (its pid in <state-dir>/supernode.pid) holds it. Second line, for a squatter that got past the
# first (the moment between that look and the connection): the pinned node config.

APPROVED = b"PK-the-approved-release-bytes"       # stands for the reproducible release FAB
SITE = "hosp-a"


def _site_settings(tmp_path) -> SiteSettings:
    return SiteSettings(site_id=SITE, data_dir=tmp_path / "pacs", superlink="x:1",
                        root_cert=tmp_path / "ca", auth_key=tmp_path / "k",
                        state_dir=tmp_path / "state", dp_epsilon=8.0, dp_delta=1e-5,
                        require_secagg=True, min_report_size=10,
                        unlisted_labels='["other"]', privacy_dir="/srv/site-ledger")


@contextlib.contextmanager
def _squatter(node_config: dict):
    """A stock Flower SuperNode runtime API on a loopback port (no runtime secret) with one
    ClientApp task of an approved run queued under ``node_config``; yields its address and
    state (to read the replies it got)."""
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata
    from flwr.supercore.fab import Fab
    from flwr.supercore.inflatable.inflatable_object import (get_all_nested_objects,
                                                             get_object_tree,
                                                             no_object_id_recompute)
    from flwr.supercore.run import Run

    store_factory = ObjectStoreFactory()
    factory = NodeStateFactory(objectstore_factory=store_factory)
    state, store = factory.state(), store_factory.store()
    run = Run.create_empty(4242)
    run.fab_hash, run.primary_task_type = fab_digest(APPROVED), TaskType.CLIENT_APP
    state.set_run_series_context(run.series_id, Context(
        run_id=run.run_id, node_id=1, node_config=node_config, state=RecordDict(),
        run_config={}))
    state.store_run(run)
    state.store_fab(Fab(run.fab_hash, APPROVED, {}))
    state.create_task(task_type=TaskType.CLIENT_APP, run_id=run.run_id, fab_hash=run.fab_hash)
    msg = make_message(Metadata(run_id=run.run_id, message_id="", src_node_id=0, dst_node_id=1,
                                reply_to_message_id="", group_id="", created_at=time.time(),
                                ttl=600, message_type=MessageType.EVALUATE),
                       content=RecordDict({"config": ConfigRecord({"x": 1})}))
    with no_object_id_recompute():
        msg.metadata.__dict__["_message_id"] = msg.object_id
        state.store_message(msg)
        store.preregister(run.run_id, get_object_tree(msg))
        for oid, obj in get_all_nested_objects(msg).items():
            store.put(oid, obj.deflate())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state_factory=factory), host="127.0.0.1",
                                           port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(600):                       # hang guard (60 s), not a timing assertion
        if server.started:
            break
        time.sleep(0.1)
    assert server.started, "the squatter's runtime API did not start"
    try:
        yield f"127.0.0.1:{port}", state, run.run_id
    finally:
        server.should_exit = True
        thread.join(timeout=60)


def _spy_app(given: list):
    """A ClientApp loader whose app notes the node config it was given and replies."""
    from flwr.app import Message, MetricRecord, RecordDict

    def app(message, context):
        given.append(dict(context.node_config))
        return Message(RecordDict({"metrics": MetricRecord({"val_auc": 0.91})}),
                       reply_to=message)
    return lambda: app


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "medfed.deploy" and r.levelno >= logging.WARNING]


def _the_site_serves(address: str, pinned: dict, state_dir, caplog):
    """What the site's launcher and runner do with whatever answers on their runtime port,
    once past the port check (here the squatter's port is served from this test's process,
    and the pid file names it): claim a task (signed with the site's secret) and run it; the
    node config the ClientApp was given (None: it did not run), the runner's code and the
    site's warning/error lines."""
    secret = load_runtime_secret(ensure_runtime_secret(state_dir))
    pid_file = pin_supernode_pid(state_dir, os.getpid())
    claim = acquire_client(address, secret, supernode_pid=pid_file,
                           retry=False).AcquireTask(CLAIM)
    assert claim.token                          # the squatter hands out its task
    given: list = []
    with caplog.at_level(logging.INFO, logger="medfed.deploy"):
        code = runner.run_task(runner.runtime_client(address, claim.token,
                                                     supernode_pid=pid_file),
                               AllowList(frozenset({fab_digest(APPROVED)})),
                               node_config=pinned, site_id=SITE, load_app=_spy_app(given),
                               audit=EgressAudit(state_dir / "egress.jsonl"))
    return (given[0] if given else None), code, _warnings(caplog)


@pytest.mark.timeout(180)
def test_a_squatter_on_the_runtime_port_cannot_choose_the_sites_node_config(tmp_path, caplog):
    settings = _site_settings(tmp_path)
    settings.state_dir.mkdir(mode=0o700)
    pinned = load_pinned_node_config(pin_node_config(settings.state_dir, node_config(settings)))
    chosen = {**pinned, wire.NODE_DATA_DIR: "/srv/hospital/other-study",
              wire.NODE_PRIVACY_DIR: "/tmp/attacker-fresh-ledger", wire.NODE_MIN_EVAL_SPLIT: 1}
    with _squatter(chosen) as (address, state, run_id):
        given, code, errors = _the_site_serves(address, pinned, settings.state_dir, caplog)
        replies = state.get_messages_legacy(run_ids=[run_id], is_reply=True)
    assert given is None and code == 1           # nothing of the site's app ran
    assert [r.error.code for r in replies] == [ErrorCode.MOD_FAILED_PRECONDITION]
    assert "node config" in replies[0].error.reason
    # one line in the site's log: the keys, not the squatter's values
    assert errors == [f"[{SITE}] run {run_id} refused: its node config differs from this "
                      "site's in data-dir, min-eval-split-size, privacy-dir; another process "
                      "answers on the site's runtime port"]
    audited = read_replies(settings.state_dir / "egress.jsonl")
    assert [x["error_code"] for x in audited] == [ErrorCode.MOD_FAILED_PRECONDITION]
    assert [x["outcomes"] for x in audited] == [["pushed"]]      # through the runtime API


@pytest.mark.timeout(180)
def test_the_node_config_the_sites_supernode_hands_over_is_accepted(tmp_path, caplog):
    """Control: the same exchange with the node config Flower's SuperNode parses from the
    site's own ``--node-config`` (floats, a bool, an int, a quoted string) runs the app."""
    settings = _site_settings(tmp_path)
    settings.state_dir.mkdir(mode=0o700)
    pinned = load_pinned_node_config(pin_node_config(settings.state_dir, node_config(settings)))
    cmd = supernode_command(settings)
    parsed = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    with _squatter(parsed) as (address, _state, _run_id):
        given, code, errors = _the_site_serves(address, pinned, settings.state_dir, caplog)
    assert code == 0 and not errors
    assert given == node_config(settings)


def test_a_node_config_differing_in_a_value_type_or_key_is_foreign():
    pinned = {"a": 1, "b": 0.5, "c": True, "d": "x"}
    assert foreign_node_config(dict(pinned), pinned) == []
    for received, differ in (({**pinned, "a": 1.0}, ["a"]), ({**pinned, "c": 1}, ["c"]),
                             ({**pinned, "a": True}, ["a"]), ({**pinned, "d": "y"}, ["d"]),
                             ({**pinned, "e": 2}, ["e"]),
                             ({k: v for k, v in pinned.items() if k != "b"}, ["b"])):
        assert foreign_node_config(received, pinned) == differ


def test_site_start_pins_its_node_config_owner_only_and_hands_its_path_down(tmp_path,
                                                                          monkeypatch):
    started = _record_daemons(monkeypatch)
    settings = replace(_site_settings(tmp_path),
                       auth_key=site_keygen(tmp_path / "keys", site=SITE).private)
    settings.state_dir.mkdir(mode=0o700)
    stale = settings.state_dir / NODE_CONFIG
    stale.write_text('{"data-dir": "/elsewhere"}')        # the last start's: replaced
    Site(settings).start()
    assert stat.S_IMODE(stale.stat().st_mode) == 0o600
    assert load_pinned_node_config(stale) == node_config(settings)
    _supernode, launcher_argv = started
    assert launcher_argv[launcher_argv.index("--node-config-file") + 1] == str(stale)
    pid_file = settings.state_dir / SUPERNODE_PID          # the SuperNode's pid, owner-only
    assert pid_file.read_text() == "4242" and stat.S_IMODE(pid_file.stat().st_mode) == 0o600
    assert launcher_argv[launcher_argv.index("--supernode-pid-file") + 1] == str(pid_file)
    runner_argv = worker_command("127.0.0.1:9094", AllowList(), SITE, node_config=stale,
                                 supernode_pid=pid_file)
    args = runner_parser().parse_args([*runner_argv[3:], "--events-fd", "3"])
    assert args.node_config_file == stale and args.supernode_pid_file == pid_file
    for missing in ("--node-config-file", "--supernode-pid-file"):   # no runner without
        argv = [*runner_argv[3:], "--events-fd", "3"]                 # either
        del argv[argv.index(missing):argv.index(missing) + 2]
        with pytest.raises(SystemExit):
            runner_parser().parse_args(argv)


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o644])
def test_a_pinned_node_config_others_can_touch_is_refused(tmp_path, mode):
    path = pin_node_config(tmp_path, {"site-id": SITE})
    os.chmod(path, mode)
    with pytest.raises(DeployError, match="pinned node config .* group/other"):
        load_pinned_node_config(path)


# --- first line: nothing is sent to a port the site's SuperNode does not hold ----------------

# a runner that is ready at once and answers each token it gets with a failed task, so a
# launcher that claimed one goes on polling (and the test fails on what it claimed, not a hang)
READY_RUNNER = [sys.executable, "-c", "import os, sys\n"
                "events = int(sys.argv[sys.argv.index('--events-fd') + 1])\n"
                "os.write(events, b'ready\\n')\n"
                "for _token in sys.stdin:\n"
                "    os.write(events, b'done 1\\n')\n"]


@contextlib.contextmanager
def _sites_supernode(state: str):
    """The pid of the site's SuperNode while another account squats its port: ``restarting``,
    started and not listening yet (a live process of ours holding no socket); ``down``,
    exited."""
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    if state == "down":
        proc.communicate()
    try:
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.communicate()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("supernode", ["restarting", "down"])
def test_a_squatter_with_the_sites_exact_node_config_gets_nothing_from_launcher_or_runner(
        tmp_path, caplog, monkeypatch, supernode):
    """The squatter copied the node config from the SuperNode's command line, so the runner's
    node config check would pass: the launcher claims nothing from it (one line, however
    often it polls) and a runner handed a token pulls nothing and pushes nothing."""
    settings = _site_settings(tmp_path)
    settings.state_dir.mkdir(mode=0o700)
    pinned = load_pinned_node_config(pin_node_config(settings.state_dir, node_config(settings)))
    cmd = supernode_command(settings)
    copied = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    assert not foreign_node_config(copied, pinned)
    secret = load_runtime_secret(ensure_runtime_secret(settings.state_dir))
    polls = []

    def stop_after_five_polls(*args, **kwargs):     # the launcher's real client, counted
        client = real_client(*args, **kwargs)

        class Counted:
            def AcquireTask(self, request):  # noqa: N802 - Flower's method name
                polls.append(1)
                if len(polls) > 5:
                    raise StopIteration
                return client.AcquireTask(request)

            def close(self):
                client.close()
        return Counted()

    real_client = launcher.acquire_client
    monkeypatch.setattr(launcher, "acquire_client", stop_after_five_polls)
    with _sites_supernode(supernode) as pid, _squatter(copied) as (address, state, run_id), \
            caplog.at_level(logging.INFO, logger="medfed.deploy"):
        pid_file = pin_supernode_pid(settings.state_dir, pid)
        with pytest.raises(StopIteration):
            launcher.serve(address, AllowList(frozenset({fab_digest(APPROVED)})), site_id=SITE,
                           secret=secret, supernode_pid=pid_file, poll=0.05,
                           command=READY_RUNNER)
        launcher_lines = _warnings(caplog)
        # the squatter's task was never claimed: it is still there for the taking
        token = _rogue(address).AcquireTask(CLAIM).token
        assert token
        given, codes = [], []
        served = runner.serve([token], lambda t: runner.runtime_client(
                                  address, t, supernode_pid=pid_file),
                              AllowList(frozenset({fab_digest(APPROVED)})),
                              report=codes.append, node_config=pinned, site_id=SITE,
                              load_app=_spy_app(given),
                              audit=EgressAudit(settings.state_dir / "egress.jsonl"))
        replies = state.get_messages_legacy(run_ids=[run_id], is_reply=True)
    why = (f"another process listens on {address}, not the site's SuperNode (pid {pid}): "
           "another account may be squatting the port" if supernode == "restarting" else
           f"the site's SuperNode (pid {pid}) is not running")
    assert launcher_lines == [f"[{SITE}] not claiming tasks: {why}"]
    assert served == 1 and codes == [1] and given == [] and replies == []
    assert _warnings(caplog)[1:] == [f"[{SITE}] task abandoned, nothing more sent to the "
                                     f"runtime port: {why}"]
    assert not (settings.state_dir / "egress.jsonl").exists()      # no reply was made


def test_the_port_check_refuses_what_it_cannot_read(tmp_path, monkeypatch):
    """No pid file, one others may write, or a /proc it cannot read: refused, never trusted;
    the port held by the process the pid file names: trusted (the test's own listener)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as ours:
        address = f"127.0.0.1:{ours.getsockname()[1]}"
        pid_file = tmp_path / SUPERNODE_PID
        assert "SuperNode pid file" in runtime_port_refusal(address, pid_file)
        pin_supernode_pid(tmp_path, os.getpid())
        assert runtime_port_refusal(address, pid_file) is None
        os.chmod(pid_file, 0o622)
        assert "group/other" in runtime_port_refusal(address, pid_file)
        os.chmod(pid_file, 0o600)

        def unreadable(*_args):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(runtime_auth, "_listening_inodes", unreadable)
        assert runtime_port_refusal(address, pid_file) == \
            f"cannot read /proc/net/tcp (Permission denied) to check who listens on {address}"
        monkeypatch.setattr(runtime_auth, "_socket_inodes", unreadable)
        assert runtime_port_refusal(address, pid_file) == \
            (f"cannot read /proc/{os.getpid()}/fd (Permission denied) to check who listens "
             f"on {address}")
    with pytest.raises(ForeignRuntimePort):          # what the guard raises: nothing sent
        runtime_auth.RuntimePortGuard(address, pid_file).intercept(
            type("Context", (), {"request": None}), lambda _context: pytest.fail("sent"))


def test_a_listener_on_another_ip_of_the_port_neither_blocks_nor_passes_for_the_site(tmp_path):
    """Another account listening on 127.0.0.2:P or [::1]:P beside the SuperNode's
    127.0.0.1:P receives none of the site's connections: it must not stop the site (it did
    when every listener on the port counted). One on the site's own address - or a name for
    a host, where any listener could answer - still refuses."""
    import socket
    import subprocess
    import sys

    with socket.create_server(("127.0.0.1", 0)) as ours:
        port = ours.getsockname()[1]
        pin_supernode_pid(tmp_path, os.getpid())
        pid_file = tmp_path / SUPERNODE_PID
        other = ("import socket, sys, time; s = socket.create_server((sys.argv[1], "
                 "int(sys.argv[2])), family=getattr(socket, sys.argv[3])); print(1, flush=True);"
                 " time.sleep(60)")
        for host, family in (("127.0.0.2", "AF_INET"), ("::1", "AF_INET6")):
            squatter = subprocess.Popen([sys.executable, "-c", other, host, str(port), family],
                                        stdout=subprocess.PIPE, text=True)
            try:
                assert squatter.stdout.readline().strip() == "1"      # listening
                assert runtime_port_refusal(f"127.0.0.1:{port}", pid_file) is None
                assert "another process listens" in runtime_port_refusal(
                    f"localhost:{port}", pid_file)
            finally:
                squatter.kill()
                squatter.wait()
