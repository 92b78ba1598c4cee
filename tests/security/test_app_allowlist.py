"""The site executes only code its operator approved (issue 25, item 1).

Each test plays a malicious coordinator that ships its own FAB to a site: the site runner
(``medfed.deploy.runner``) must refuse an unapproved bundle before it installs, imports or
opens anything, say why in the error reply, and even for an approved digest run the site's
installed ClientApp, never the FAB's code."""

from __future__ import annotations

import builtins
import hashlib
import io
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.config import flatten_dict
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.fab import Fab

import medfed.deploy.runner as runner
from medfed.cli import main
from medfed.deploy.allowlist import AllowList, AppRefused, digest_of, fab_digest
from medfed.deploy.launcher import launcher_command, worker_command
from medfed.deploy.site import SiteSettings, supernode_command
from protocol import wire

ROOT = Path(__file__).resolve().parents[2]
PWNED = "MEDFED_TEST_FAB_CODE_RAN"


def _tampered_fab() -> bytes:
    """A FAB whose ClientApp would read the site's data; importing it sets a marker."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pyproject.toml", (ROOT / "pyproject.toml").read_text())
        z.writestr("client/__init__.py", "")
        z.writestr("client/app.py", f"import builtins\nbuiltins.{PWNED} = True\n"
                                    "import glob\nLEAK = [open(p, 'rb').read() for p in "
                                    "glob.glob('/data/**', recursive=True)]\n")
    return buf.getvalue()


def _task(data_dir: Path, content: bytes, hash_str: str | None = None):
    message = Message(RecordDict({wire.CONFIG: ConfigRecord({"x": 1})}), dst_node_id=7,
                      message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={wire.NODE_DATA_DIR: str(data_dir)},
                      state=RecordDict(), run_config={})
    return message, context, Fab(hash_str if hash_str is not None else fab_digest(content),
                                 content, {})


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """What pull_task_input sets in a real runner process (Message() needs it)."""
    from flwr.supercore.task_identity import TaskIdentity
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 7)
    monkeypatch.setattr(TaskIdentity, "_task_id", 3)


@pytest.fixture
def site_data(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "patient.dcm").write_bytes(b"PHI")
    return data


@pytest.fixture
def no_fab_code(monkeypatch):
    """Flower's FAB installer and FAB loader fail the test if anything calls them."""
    def forbidden(*_a, **_k):
        raise AssertionError("FAB code path used")

    import flwr.cli.install
    import flwr.clientapp.utils
    import flwr.supernode.runtime.run_clientapp as flwr_runner
    for module, name in ((flwr.cli.install, "install_from_fab"),
                         (flwr_runner, "install_from_fab"),
                         (flwr_runner, "get_load_client_app_fn"),
                         (flwr.clientapp.utils, "get_load_client_app_fn")):
        monkeypatch.setattr(module, name, forbidden)


@pytest.fixture
def opened(monkeypatch):
    """Every path opened through open()/io.open()/os.open() while the test runs."""
    seen: list[str] = []
    real_open, real_io_open, real_os_open = builtins.open, io.open, os.open

    def spy(real):
        def wrapper(file, *args, **kwargs):
            seen.append(os.fspath(file) if not isinstance(file, int) else f"fd:{file}")
            return real(file, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(builtins, "open", spy(real_open))
    monkeypatch.setattr(io, "open", spy(real_io_open))
    monkeypatch.setattr(os, "open", spy(real_os_open))
    return seen


def test_tampered_clientapp_is_refused_before_it_reads_any_file(site_data, no_fab_code,
                                                                 opened, caplog):
    approved = AllowList(frozenset({"a" * 64}))
    fab = _tampered_fab()
    message, context, fab_obj = _task(site_data, fab)
    opened.clear()                                        # building the fab above read files

    def load_app():
        raise AssertionError("a ClientApp was loaded for a refused run")

    with caplog.at_level("ERROR", logger="medfed.deploy"):
        outcome = runner.handle_task(message, context, fab_obj, approved, site_id="a",
                                     load_app=load_app)

    assert opened == []                                   # not the data dir, not anything
    assert not hasattr(builtins, PWNED)
    assert outcome.sub_status == SubStatus.FAILED
    assert outcome.reply.has_error()
    assert outcome.reply.error.code == ErrorCode.INVALID_FAB
    digest = hashlib.sha256(fab).hexdigest()
    assert f"app {digest[:12]} not approved by this site" in outcome.reply.error.reason
    assert "--allow-app" in outcome.reply.error.reason   # the operator's next step
    assert any("[a] run" in r.getMessage() and "refused" in r.getMessage()
               and digest[:12] in r.getMessage() for r in caplog.records)


def test_empty_allow_list_refuses_everything_with_a_hint(site_data, no_fab_code):
    message, context, fab = _task(site_data, b"any release at all")
    outcome = runner.handle_task(message, context, fab, AllowList(), load_app=None)
    assert outcome.reply.error.code == ErrorCode.INVALID_FAB
    reason = outcome.reply.error.reason
    assert "approves no app yet" in reason and "medfed app digest" in reason


def test_announced_hash_that_does_not_match_the_bytes_is_refused(site_data, no_fab_code):
    """The coordinator labels a tampered bundle with an approved digest: the bytes decide."""
    good = b"the reviewed release"
    allow = AllowList(frozenset({fab_digest(good)}))
    message, context, fab = _task(site_data, b"tampered", hash_str=fab_digest(good))
    outcome = runner.handle_task(message, context, fab, allow, load_app=None)
    assert outcome.reply.error.code == ErrorCode.INVALID_FAB
    same_bytes_wrong_label = _task(site_data, good, hash_str="b" * 64)[2]
    outcome = runner.handle_task(message, context, same_bytes_wrong_label, allow,
                                 load_app=None)
    assert outcome.reply.error.code == ErrorCode.INVALID_FAB


def test_approved_digest_runs_the_installed_clientapp_not_the_fab(site_data, no_fab_code):
    """Even an approved bundle cannot smuggle code: its client/app.py is never imported."""
    fab = _tampered_fab()
    allow = AllowList(frozenset({fab_digest(fab)}))
    message, context, fab_obj = _task(site_data, fab)
    loaded = []

    def load_app():
        app = runner.load_installed_clientapp()
        loaded.append(app)

        def fake(message, context):                      # the real app would train
            return Message(RecordDict(), reply_to=message)
        return fake

    outcome = runner.handle_task(message, context, fab_obj, allow, load_app=load_app)
    assert outcome.sub_status == SubStatus.COMPLETED and not outcome.reply.has_error()
    import client.app
    assert loaded == [client.app.app]
    assert Path(client.app.__file__).resolve().is_relative_to(ROOT)
    assert not hasattr(builtins, PWNED)


def test_the_coordinator_gets_the_sites_own_line_and_nothing_of_any_other_error(
        site_data, no_fab_code):
    """A site's refusal (``SiteError``: a policy line written to be sent, no path or patient
    data) reaches the coordinator as that line - it got only "raised SiteError" before, the
    reason in the site's log alone; any other exception still gives its type and nothing of
    its text (which may name a path or a value)."""
    from client.mods.errors import SiteError

    fab = _tampered_fab()
    allow = AllowList(frozenset({fab_digest(fab)}))
    message, context, fab_obj = _task(site_data, fab)
    line = "site-policy: this site holds fewer labelled training studies for this job"

    def refusing():
        def app(message, context):
            raise SiteError("site-policy", line.split(": ", 1)[1])
        return app

    def failing():
        def app(message, context):
            raise OSError("/data/hospital/patient-0042/ct.dcm unreadable")
        return app
    refused = runner.handle_task(message, context, fab_obj, allow, load_app=refusing)
    assert refused.reply.error.reason == line and refused.sub_status == SubStatus.FAILED
    failed = runner.handle_task(message, context, fab_obj, allow, load_app=failing)
    assert failed.reply.error.reason == "the site's ClientApp raised OSError"


def test_runner_pushes_the_refusal_to_the_coordinator(site_data, no_fab_code, monkeypatch):
    """The process glue: the error reply and a FAILED task status go back to the SuperNode."""
    import flwr.supercore.heartbeat as heartbeat
    import flwr.supernode.runtime.run_clientapp as flwr_runner

    message, context, fab = _task(site_data, _tampered_fab())
    pushed, status = [], []

    class Beat:
        is_running = False

        def __init__(self, *_):
            pass

        def start(self):
            pass

    class Client:
        closed = False

        def close(self):
            self.closed = True

    monkeypatch.setattr(heartbeat, "HeartbeatSender", Beat)
    monkeypatch.setattr(flwr_runner, "pull_task_input",
                        lambda client: (message, context, None, fab))
    monkeypatch.setattr(flwr_runner, "push_message", lambda c, reply, ctx: pushed.append(reply))
    monkeypatch.setattr(flwr_runner, "push_task_output",
                        lambda client, context, sub_status, details: status.append(
                            (sub_status, details)))
    client = Client()
    code = runner.run_task(client, AllowList(frozenset({"c" * 64})),
                           node_config=context.node_config, load_app=None)
    assert code == 1 and client.closed
    assert [r.error.code for r in pushed] == [ErrorCode.INVALID_FAB]
    assert status[0][0] == SubStatus.FAILED and "not approved" in status[0][1]


def test_runner_never_uses_flowers_fab_loader():
    """The runner's source has no path to the bundle's code (belt to the tests' braces)."""
    source = Path(runner.__file__).read_text()
    code = "\n".join(ln for ln in source.splitlines()
                     if not ln.lstrip().startswith("#") and "``" not in ln)
    assert "install_from_fab(" not in code and "get_load_client_app_fn" not in code


def test_installed_component_is_the_one_pyproject_names():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["flwr"]["app"]["components"]["clientapp"] == runner.CLIENTAPP_REF


def test_site_runs_its_own_launcher_with_the_allow_list(tmp_path):
    allow = AllowList(frozenset({"d" * 64, "e" * 64}))
    settings = SiteSettings(site_id="a", data_dir=tmp_path, superlink="x:1",
                            root_cert=tmp_path / "ca", auth_key=tmp_path / "k",
                            state_dir=tmp_path / "s", allow=allow)
    cmd = supernode_command(settings)
    assert cmd[cmd.index("--isolation") + 1] == "process"        # Flower starts nothing
    launcher = launcher_command("127.0.0.1:9094", allow, "a", runtime_secret=tmp_path / "x",
                                node_config=tmp_path / "n", supernode_pid=tmp_path / "p")
    assert launcher[1:3] == ["-m", "medfed.deploy.launcher"]
    task = worker_command("127.0.0.1:9094", allow, "a", node_config=tmp_path / "n",
                          supernode_pid=tmp_path / "p")
    assert task[1:3] == ["-m", "medfed.deploy.runner"]
    for argv in (launcher, task):
        assert [argv[i + 1] for i, a in enumerate(argv) if a == "--allow-app"] == \
            ["d" * 64, "e" * 64]
        assert not any("flwr-clientapp" in a or "superexec" in a for a in argv)


def test_app_digest_is_flowers_fab_hash(tmp_path, capsys):
    fab = tmp_path / "release.fab"
    fab.write_bytes(_tampered_fab())
    assert main(["app", "digest", str(fab)]) == 0
    assert capsys.readouterr().out.strip() == hashlib.sha256(fab.read_bytes()).hexdigest()
    assert digest_of(fab) == fab_digest(fab.read_bytes())


@pytest.mark.parametrize("bad", [["--allow-app", "abc123"],
                                 ["--allow-app", "g" * 64],
                                 ["--allow-list", "BADFILE"],
                                 ["--allow-list", "MISSING"]])
def test_malformed_allow_list_is_one_error_line_exit_2(tmp_path, bad):
    (tmp_path / "BADFILE").write_text("# approved releases\n" + "f" * 64 + "\nnot-a-digest\n")
    bad = [str(tmp_path / b) if b in ("BADFILE", "MISSING") else b for b in bad]
    result = subprocess.run(
        [sys.executable, "-m", "medfed.cli", "site", "--site-id", "a", "--data-dir",
         str(tmp_path), "--superlink", "localhost:1", "--root-cert", str(tmp_path / "ca"),
         "--auth-key", str(tmp_path / "key"), *bad],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("medfed: error: ")
    assert "digest" in lines[0] or "allow-list" in lines[0]


def test_allow_file_entries_and_comments(tmp_path):
    f = tmp_path / "allowed"
    f.write_text(f"# MedFed 0.1.0, reviewed 2026-11-30\n{'A' * 64}  # upper case is fine\n\n")
    allow = AllowList.build(["b" * 64], [f])
    assert allow.digests == {"a" * 64, "b" * 64}
    with pytest.raises(AppRefused):
        allow.check(b"something else")


# --- the site's SuperNode: an unapproved FAB's pyproject.toml is never read ------------------
# Flower's SuperNode loop reads the pyproject.toml inside each new run's FAB (the run config's
# defaults) before the runner sees the digest; a FAB is a zip, and a 299 KiB one held a
# 300 MiB pyproject.toml (+601 MiB peak memory at the site, measured).

def _zip(pyproject: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("pyproject.toml", pyproject)
    return buf.getvalue()


APPROVED_FAB = _zip((ROOT / "pyproject.toml").read_text())       # the release's own
BOMB_FAB = _zip("#" + " " * (8 << 20))      # 8 MiB of spaces: a few KiB on the wire


def _flower_loop_stores(fab: bytes, monkeypatch) -> tuple[list[bytes], object, int]:
    """Flower's own SuperNode loop step (``_pull_and_store_message``) as the site's SuperNode
    runs it (``supernode.install`` with the site's allow-list), on a message of a new run
    whose FAB is ``fab``: the FABs Flower read a pyproject.toml from, the node state, run id."""
    import flwr.common.config as flwr_config
    import flwr.supernode.start_client_internal as loop
    from flwr.app.message.message import make_message
    from flwr.app.metadata import Metadata
    from flwr.supercore.constant import TaskType
    from flwr.supercore.inflatable.inflatable_object import (get_all_nested_objects,
                                                             get_object_tree)
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run
    from flwr.supernode.nodestate import NodeStateFactory

    from medfed.deploy import supernode

    for name in ("time", "pull_objects", "_push_messages", "get_fused_config_from_fab"):
        monkeypatch.setattr(loop, name, getattr(loop, name))
    read: list[bytes] = []
    real = flwr_config.get_fab_config
    monkeypatch.setattr(flwr_config, "get_fab_config",
                        lambda fab_file: read.append(fab_file) or real(fab_file))
    supernode.install(0.5, AllowList(frozenset({fab_digest(APPROVED_FAB)})))

    store_factory = ObjectStoreFactory()
    state = NodeStateFactory(objectstore_factory=store_factory).state()
    state.set_node_id(1)
    run = Run.create_empty(77)
    run.fab_hash, run.primary_task_type = fab_digest(fab), TaskType.CLIENT_APP
    msg = make_message(Metadata(run_id=run.run_id, message_id="", src_node_id=0, dst_node_id=1,
                                reply_to_message_id="", group_id="", created_at=1e9,
                                ttl=600, message_type=MessageType.TRAIN),
                       content=RecordDict({"config": ConfigRecord({"x": 1})}))
    msg.metadata.__dict__["_message_id"] = msg.object_id
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    answered = loop._pull_and_store_message(
        state=state, object_store=store_factory.store(), node_config={"site-id": "a"},
        receive=iter([(msg, get_object_tree(msg))]).__next__, get_run=lambda run_id: run,
        get_fab=lambda fab_hash, run_id: Fab(fab_hash, fab, {}),
        pull_object=lambda run_id, oid: objects[oid],
        confirm_message_received=lambda *a: None, trusted_entities=None)
    assert answered == run.run_id                 # the message is queued as a task either way
    return read, state, run


def test_the_sites_supernode_never_opens_an_unapproved_fab(monkeypatch):
    read, state, run = _flower_loop_stores(BOMB_FAB, monkeypatch)
    assert read == []                             # not one pyproject.toml read
    context = state.get_run_series_context(run.series_id)
    assert context.run_config == {}
    # the task still reaches the runner, which refuses it by digest with its error reply
    assert state.get_fab(fab_digest(BOMB_FAB)).content == BOMB_FAB


def test_the_sites_supernode_reads_the_run_config_of_an_approved_fab(monkeypatch):
    read, state, run = _flower_loop_stores(APPROVED_FAB, monkeypatch)
    assert read == [APPROVED_FAB]
    defaults = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert state.get_run_series_context(run.series_id).run_config == \
        flatten_dict(defaults.get("config", {}))


def test_the_site_gives_its_supernode_the_allow_list(tmp_path, monkeypatch):
    import flwr.supernode.cli.flower_supernode  # noqa: F401 - loaded for sys.modules

    from medfed.deploy import supernode

    allow = AllowList(frozenset({"d" * 64, "e" * 64}))
    settings = SiteSettings(site_id="a", data_dir=tmp_path, superlink="x:1",
                            root_cert=tmp_path / "ca", auth_key=tmp_path / "k",
                            state_dir=tmp_path / "s", allow=allow)
    cmd = supernode_command(settings)
    ours = cmd[cmd.index("medfed.deploy.supernode") + 1:cmd.index("--superlink")]
    assert ours == ["--poll-interval", "0.5", *allow.args(),
                    "--egress-log", str(settings.state_dir / "egress.jsonl")]
    installed, flower = [], []
    cli = sys.modules["flwr.supernode.cli.flower_supernode"]
    monkeypatch.setattr(supernode, "install", lambda interval, allow, _audit: installed.append(
        (interval, allow)))
    monkeypatch.setattr(cli, "flower_supernode", lambda: flower.append(sys.argv[1:]))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    supernode.main(cmd[3:])
    assert installed == [(0.5, allow)]
    assert flower[0][:2] == ["--superlink", "x:1"]     # Flower gets only its own arguments
