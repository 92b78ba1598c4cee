"""The site's long-lived runner (issue 27): one process serves every message of a run with the
app and the site's data loaded - counted, not timed: no DICOM file is decoded again while the
site's files are unchanged, and a touched or rewritten file is read on the next message. Each
task still passes the allow-list check and writes its egress line; a runner that dies is
replaced by the launcher."""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path

import pydicom
import pytest
from flwr.app import ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.supercore.fab import Fab

import medfed.deploy.launcher as launcher
import medfed.deploy.runner as runner
from client.data.pseudonyms import KEY_FILE
from client.job import decode_job
from medfed.deploy.allowlist import AllowList, fab_digest
from medfed.deploy.egress import EgressAudit, read_replies
from medfed.deploy.runtime_auth import pin_node_config
from protocol import wire
from server.config import load_experiment
from server.federation import job_config

APPROVED = b"the release the site reviewed"
SMALL = ["experiment=smoke", "task.image_size=32", "train.batch_size=8"]


def _train(round_: int) -> Message:
    record = job_config(load_experiment(SMALL))
    record[wire.SERVER_ROUND] = round_
    model, _ = decode_job(record, site_seed=0).build()
    content = RecordDict({wire.CONFIG: record, wire.ARRAYS: ArrayRecord(model.state_dict())})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


class _Beat:
    is_running = False

    def __init__(self, *_):
        pass

    def start(self):
        pass


class _Client:
    def __init__(self, token: str):
        self.token = token

    def close(self):
        pass


@pytest.fixture
def exchange(monkeypatch):
    """Flower's task exchange, in process: each token's client pulls the task queued under it;
    replies and task statuses are collected."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.runtime.run_clientapp as flwr_runner

    tasks: dict[str, tuple] = {}
    pushed: list[Message] = []
    status: list[str] = []
    monkeypatch.setattr(heartbeat, "HeartbeatSender", _Beat)
    monkeypatch.setattr(flwr_runner, "pull_task_input", lambda client: tasks.pop(client.token))
    monkeypatch.setattr(flwr_runner, "push_message", lambda c, reply, ctx: pushed.append(reply))
    monkeypatch.setattr(flwr_runner, "push_task_output",
                        lambda client, context, sub_status, details: status.append(sub_status))
    return tasks, pushed, status


@pytest.fixture
def dicom_reads(monkeypatch):
    """Every ``pydicom.dcmread`` call in this process (the readers call it by attribute)."""
    calls: list[str] = []
    real = pydicom.dcmread

    def counted(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counted)
    return calls


def _serve(tokens_tasks, tasks, site_dir: Path, audit: EgressAudit):
    """Queue one task per (token, message[, fab bytes]) and serve them all in one ``serve``
    call. Every FAB is labelled with the approved digest (what a lying coordinator sends)."""
    codes: list[int] = []
    node_config = {wire.NODE_DATA_DIR: str(site_dir), wire.NODE_SITE_ID: "s0"}
    for token, message, *fab in tokens_tasks:
        fab = fab[0] if fab else APPROVED
        context = Context(run_id=1, node_id=7, state=RecordDict(), run_config={},
                          node_config=dict(node_config))
        tasks[token] = (message, context, None, Fab(fab_digest(APPROVED), fab, {}))
    runner.serve([t for t, *_ in tokens_tasks], _Client, AllowList(frozenset({fab_digest(
        APPROVED)})), report=codes.append, node_config=node_config, site_id="s0", audit=audit)
    return codes


def _private_site(tiny_sites: Path, tmp_path: Path) -> Path:
    """A copy of one synthetic site: its files and pseudonym key, none of the site state an
    earlier test may have left in the shared fixture (a warm cache would read nothing)."""
    site = tmp_path / "site-0"
    shutil.copytree(tiny_sites / "site-0", site, ignore=shutil.ignore_patterns(".medfed"))
    (site / ".medfed").mkdir(mode=0o700)
    shutil.copy2(tiny_sites / "site-0" / ".medfed" / KEY_FILE, site / ".medfed" / KEY_FILE)
    return site


def test_one_runner_serves_two_messages_without_reading_dicom_again_and_sees_a_changed_file(
        tiny_sites, tmp_path, exchange, dicom_reads, task_identity):
    site = _private_site(tiny_sites, tmp_path)
    files = sorted(p for p in (site / "dicom").rglob("*") if p.is_file())
    tasks, pushed, status = exchange
    audit = EgressAudit(tmp_path / "egress.jsonl")

    assert _serve([("a" * 256, _train(1))], tasks, site, audit) == [0]
    first_read = len(dicom_reads)
    assert first_read >= len(files) - 2          # the first message reads the site (junk aside)
    fingerprint = pushed[-1].content[wire.SITE][wire.MANIFEST]

    # the second message of the run, same process, nothing changed: not one DICOM decode
    assert _serve([("b" * 256, _train(2))], tasks, site, audit) == [0]
    assert len(dicom_reads) == first_read
    assert pushed[-1].content[wire.SITE][wire.MANIFEST] == fingerprint

    # a touched file (same bytes, new mtime): the next message reads the site again
    os.utime(files[0], ns=(files[0].stat().st_atime_ns, files[0].stat().st_mtime_ns + 10**9))
    assert _serve([("c" * 256, _train(3))], tasks, site, audit) == [0]
    assert len(dicom_reads) > first_read
    assert pushed[-1].content[wire.SITE][wire.MANIFEST] == fingerprint
    second_read = len(dicom_reads)

    # a rewritten file (an image replaced by junk): read again, and the manifest shows it
    victim = next(p for p in files if pydicom.dcmread(p, stop_before_pixels=True))
    del dicom_reads[second_read:]               # the probe above is not the app's read
    victim.write_bytes(b"not a dicom file any more")
    assert _serve([("d" * 256, _train(4))], tasks, site, audit) == [0]
    assert len(dicom_reads) > second_read
    assert pushed[-1].content[wire.SITE][wire.MANIFEST] != fingerprint

    assert status == ["completed"] * 4 and not tasks
    # one egress line per reply, written by the runner, each pushed
    assert [r["outcomes"] for r in read_replies(audit.path)] == [["pushed"]] * 4


def test_the_runner_checks_the_fab_of_every_task_not_once(tiny_sites, tmp_path, exchange,
                                                          task_identity):
    """Attack: the coordinator sends an approved release first, then swaps the FAB's bytes for
    the next message of the same long-lived runner, still labelled with the approved digest.
    The runner hashes the bytes of every task: the swap is refused like a first message."""
    site = _private_site(tiny_sites, tmp_path)
    tasks, pushed, status = exchange
    audit = EgressAudit(tmp_path / "egress.jsonl")
    swapped = b"the coordinator's own code"
    assert _serve([("a" * 256, _train(1)), ("b" * 256, _train(2), swapped)],
                  tasks, site, audit) == [0, 1]
    assert pushed[-1].error.code == ErrorCode.INVALID_FAB
    assert status == ["completed", "failed"]
    assert [x["error_code"] for x in read_replies(audit.path)] == [None, ErrorCode.INVALID_FAB]


def test_a_task_that_fails_outside_the_app_does_not_stop_the_runner(exchange):
    tasks, _, _ = exchange           # nothing queued: pulling "a..." raises KeyError
    codes: list[int] = []
    served = runner.serve(["a" * 256], _Client, AllowList(), report=codes.append,
                          node_config={})
    assert served == 1 and codes == [1]


def test_an_interrupt_during_a_task_stops_the_runner_with_one_line_in_its_log(caplog):
    def interrupted(token):
        raise KeyboardInterrupt

    codes: list[int] = []
    with caplog.at_level(logging.INFO, logger=runner.log.name), \
            pytest.raises(KeyboardInterrupt):
        runner.serve(["a" * 256], interrupted, AllowList(), report=codes.append,
                     node_config={}, site_id="site-7")
    assert codes == []
    assert [r.getMessage() for r in caplog.records] == [
        "[site-7] site runner interrupted during a task (after 0 served); stopping"]


def test_tokens_arrive_one_a_line_and_anything_else_stops_the_runner(tmp_path):
    import io

    good = ["ab" * 128, "cd" * 128]
    assert list(runner.read_tokens(io.BytesIO(("\n".join(good) + "\n").encode()))) == good
    with pytest.raises(ValueError, match="other than a task token"):
        list(runner.read_tokens(io.BytesIO(b"ab" * 128 + b"\n--allow-app x\n")))
    with pytest.raises(ValueError):              # an overlong line is not read as a token
        list(runner.read_tokens(io.BytesIO(b"a" * 10_000 + b"\n")))


# --- the launcher's handle on the runner process ------------------------------------------

FAKE_RUNNER = """
import os, sys
sys.path.insert(0, {root!r})
from medfed.deploy.runner import read_tokens
events = int(sys.argv[sys.argv.index("--events-fd") + 1])
os.write(events, b"ready\\n")
for token in read_tokens(sys.stdin.buffer):
    if token.startswith("dead"):
        os._exit(3)                                       # dies in the middle of a task
    with open({log!r}, "a") as f:
        f.write(f"{{os.getpid()}} {{token[:4]}}\\n")
    os.write(events, b"done 0\\n")
"""


def _fake_runner(tmp_path: Path) -> tuple[list[str], Path]:
    log = tmp_path / "served.txt"
    root = str(Path(__file__).resolve().parents[2])
    return [sys.executable, "-c", FAKE_RUNNER.format(root=root, log=str(log))], log


@pytest.mark.timeout(120)
def test_site_worker_hands_tokens_over_stdin_and_hears_when_each_is_done(tmp_path):
    command, log = _fake_runner(tmp_path)
    worker = launcher.SiteWorker(command)
    worker.start()
    try:
        while not worker.ready:
            worker.wait(5)
        for token in ("aaaa" * 64, "bbbb" * 64):
            assert worker.idle
            worker.submit(token, "task")
            assert not worker.idle
            codes = []
            while not codes:
                codes = worker.wait(5)
            assert codes == [0]
        pids = {line.split()[0] for line in log.read_text().splitlines()}
        assert [line.split()[1] for line in log.read_text().splitlines()] == ["aaaa", "bbbb"]
        assert len(pids) == 1                    # one process served both
    finally:
        worker.stop()
    assert not worker.alive()


class _SuperNode:
    """AcquireTask as the SuperNode answers it: the queued tokens, then nothing; stops the
    launcher's loop once ``until()`` holds."""

    def __init__(self, tokens: list[str], until):
        self.tokens, self.until = list(tokens), until

    def AcquireTask(self, _request):  # noqa: N802 - Flower's method name
        from flwr.proto.runtime_pb2 import AcquireTaskResponse  # pylint: disable=E0611
        from flwr.proto.task_pb2 import Task  # pylint: disable=E0611

        if self.until():
            raise StopIteration
        if not self.tokens:
            return AcquireTaskResponse()
        return AcquireTaskResponse(task=Task(task_id=1, run_id=1), token=self.tokens.pop(0))

    def close(self):
        pass


@pytest.mark.timeout(120)
def test_a_runner_that_dies_mid_task_is_replaced_and_the_next_task_is_served(tmp_path,
                                                                              monkeypatch):
    command, log = _fake_runner(tmp_path)
    served = lambda: log.read_text().splitlines() if log.exists() else []  # noqa: E731
    node = _SuperNode(["aaaa" * 64, "dead" * 64, "bbbb" * 64], until=lambda: len(served()) == 2)
    monkeypatch.setattr(launcher, "acquire_client", lambda *a, **k: node)
    with pytest.raises(StopIteration):
        launcher.serve("127.0.0.1:1", AllowList(), site_id="a", secret=b"s", poll=0.05,
                       supernode_pid=tmp_path / "supernode.pid",
                       command=command)
    (first, a), (second, b) = (line.split() for line in served())
    assert (a, b) == ("aaaa", "bbbb") and first != second     # a new runner took over


@pytest.mark.timeout(120)
def test_a_runner_that_never_gets_ready_stops_the_site(tmp_path, monkeypatch):
    node = _SuperNode([], until=lambda: False)
    monkeypatch.setattr(launcher, "acquire_client", lambda *a, **k: node)
    with pytest.raises(RuntimeError, match="exited or hung 3 times before it was ready"):
        launcher.serve("127.0.0.1:1", AllowList(), site_id="a", secret=b"s", poll=0.05,
                       supernode_pid=tmp_path / "supernode.pid",
                       command=[sys.executable, "-c", "raise SystemExit(1)"])


@pytest.mark.timeout(120)
def test_a_runner_that_hangs_before_ready_is_stopped_counted_and_stops_the_site(
        tmp_path, monkeypatch, caplog):
    """A runner stuck in its imports never says ``ready``: without a bound the site would sit
    there forever claiming nothing. Each one is stopped after ``ready_timeout``, logged with
    its count, and the third in a row stops the site like three that died."""
    node = _SuperNode([], until=lambda: False)
    monkeypatch.setattr(launcher, "acquire_client", lambda *a, **k: node)
    pids = tmp_path / "pids"
    hang = f"import os, time; open({str(pids)!r}, 'a').write(f'{{os.getpid()}}\\n'); time.sleep(600)"
    with caplog.at_level("ERROR", logger="medfed.deploy"), \
            pytest.raises(RuntimeError, match="exited or hung 3 times before it was ready"):
        launcher.serve("127.0.0.1:1", AllowList(), site_id="a", secret=b"s", poll=0.05,
                       supernode_pid=tmp_path / "supernode.pid",
                       command=[sys.executable, "-c", hang], ready_timeout=1.0)
    stopped = [r.getMessage() for r in caplog.records if "was not ready" in r.getMessage()]
    assert [m.split("(")[1].split(" in a row")[0] for m in stopped] == \
        ["1 of 3", "2 of 3", "3 of 3"]
    started = pids.read_text().split()
    assert len(started) == 3
    for pid in started:                         # every hung runner was stopped, none left
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)


@pytest.mark.timeout(120)
def test_a_runner_whose_launcher_goes_away_stops_without_a_traceback(tmp_path):
    """Walkthrough finding: a site refused by the coordinator stops its launcher while the
    runner is still importing the app; Flower's parent monitor then raises SIGINT in the
    runner, whose KeyboardInterrupt traceback (and torch's exit statistics) filled the site's
    log above the one-line refusal. It exits quietly instead."""
    import subprocess

    parent = subprocess.Popen(["sleep", "60"])       # stands in for the site's launcher
    read, write = os.pipe()
    out = tmp_path / "runner.log"
    pinned = pin_node_config(tmp_path, {"site-id": "s0"})
    with open(out, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "medfed.deploy.runner",
                                 "--runtime-api-address", "127.0.0.1:1", "--serve",
                                 "--site-id", "s0", "--parent-pid", str(parent.pid),
                                 "--node-config-file", str(pinned),
                                 "--supernode-pid-file", str(tmp_path / "supernode.pid"),
                                 "--events-fd", str(write)],
                                stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.STDOUT,
                                pass_fds=(write,))
    os.close(write)
    try:
        parent.kill()                                # the launcher is gone
        parent.wait()
        code = proc.wait(timeout=100)                # hang guard, not a timing assertion
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        os.close(read)
    text = out.read_text()
    assert code == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert "FakeTensor" not in text, text


_INTERRUPTED_IMPORT = """
import atexit, logging, signal, sys
import medfed.deploy.runner as runner

def interrupted_import():
    # what an import of torch cut short leaves: a module of it logs at INFO at exit,
    # before torch set its own log levels
    log = logging.getLogger("torch._subclasses.fake_tensor")
    atexit.register(lambda: log.info("FakeTensor cache stats:"))
    signal.raise_signal(signal.SIGINT)            # Flower's parent monitor

runner.load_installed_clientapp = interrupted_import
sys.exit(runner.main(sys.argv[1:]))
"""


def _run_runner(script: str, tmp_path, *, ready: bool = True, ignore_sigint: bool = False):
    """``script`` (a runner with a stand-in import) run as the launcher starts the runner;
    ``ready=False``: the launcher's end of the events pipe is already closed;
    ``ignore_sigint``: SIGINT inherited ignored (a background start from a script)."""
    import signal
    import subprocess

    read, write = os.pipe()
    if not ready:
        os.close(read)                               # the launcher is gone
    try:
        return subprocess.run([sys.executable, "-c", script,
                               "--runtime-api-address", "127.0.0.1:1", "--serve",
                               "--node-config-file",
                               str(pin_node_config(tmp_path, {"site-id": "s0"})),
                               "--supernode-pid-file", str(tmp_path / "supernode.pid"),
                               "--events-fd", str(write)], pass_fds=(write,),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=100,           # hang guard, not a timing assertion
                              preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
                              if ignore_sigint else None)
    finally:
        os.close(write)
        if ready:
            os.close(read)


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_a_runner_stopped_while_importing_torch_prints_nothing_at_exit(tmp_path, inherited):
    """``ignored``: started from a site daemon in the background of a non-interactive shell
    (``nohup medfed site ... &``), which hands SIGINT down ignored: the parent monitor's
    signal must still stop the runner (a full `make test` run that way found it)."""
    result = _run_runner(_INTERRUPTED_IMPORT, tmp_path, ignore_sigint=inherited == "ignored")
    assert result.returncode == 130, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_a_runner_whose_launcher_is_gone_before_it_is_ready_exits_quietly(tmp_path):
    """The launcher stopped (its events pipe closed) while the runner imported the app: the
    runner's 'ready' meets a broken pipe and it stops without a traceback in the site's log
    (a full run's e2e test caught one)."""
    result = _run_runner(_QUIET_IMPORT, tmp_path, ready=False)
    assert result.returncode == 0 and "Traceback" not in result.stdout + result.stderr, \
        result.stdout + result.stderr


_QUIET_IMPORT = """
import sys
import medfed.deploy.runner as runner

runner.load_installed_clientapp = lambda: None
sys.exit(runner.main(sys.argv[1:]))
"""
