"""A restarted site tells its own still-open session from an unregistered key.

The site daemon is driven with a stand-in for ``flower-supernode`` that prints what Flower 1.41
prints when the SuperLink refuses ``ActivateNode`` (the message is rendered from Flower's own
error catalogue and exit codes), a given number of times, then connects. No SuperLink, no
Flower process: fast. The loopback version with real processes is
``test_deploy_e2e.py::test_a_killed_site_restarted_at_once_rejoins``.
"""

from __future__ import annotations

import logging
import shlex
import time
from pathlib import Path

import pytest

from medfed.deploy import site as site_module
from medfed.deploy.preflight import DeployError
from medfed.deploy.runtime_auth import SUPERNODE_PID
from medfed.deploy.session import (SESSION_FILE, SessionKeeper, SessionRecord,
                                   open_session_left, read_record, session_expiry, write_record)
from medfed.deploy.site import STILL_OPEN, Site, SiteSettings

KEY = "f" * 64


def flower_refusal_lines() -> list[str]:
    """What ``flower-supernode`` logs when the SuperLink answers ActivateNode with
    FLEET_NODE_ACTIVATION_FAILED (``fleet_http_connection`` + ``flwr_exit``)."""
    from flwr.supercore.error import ApiErrorCode
    from flwr.supercore.error.catalog import API_ERROR_MAP
    from flwr.supercore.exit.exit_code import EXIT_CODE_HELP, ExitCode

    code = ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED
    exit_code = ExitCode.SUPERNODE_CONNECTION_ERROR
    return [f"ERROR :   Exit Code: {int(exit_code)}",
            "Failed to initialize the connection to the SuperLink.",
            f"[code: {int(code)}] {API_ERROR_MAP[code].public_message}",
            EXIT_CODE_HELP[exit_code], "",
            f"For more information, visit: <https://flower.ai/docs/framework/ref-exit-codes/"
            f"{int(exit_code)}.html>"]


def fake_supernode(tmp_path: Path, refusals: int | None) -> list[str]:
    """A command that is refused ``refusals`` times (None: always), then connects."""
    counter = tmp_path / "attempts"
    refused = "\n".join(flower_refusal_lines())
    limit = 10**6 if refusals is None else refusals
    script = (f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}\n"
              f"if [ $n -le {limit} ]; then printf '%s\\n' {shlex.quote(refused)}; exit 1; fi\n"
              "echo 'INFO :      SuperNode ID: 4242'; sleep 0.3; exit 0\n")
    return ["sh", "-c", script]


def attempts(tmp_path: Path) -> int:
    return int((tmp_path / "attempts").read_text())


@pytest.fixture()
def run_site(tmp_path, monkeypatch):
    """Start the site's SuperNode (the stand-in) as ``medfed site`` does, then supervise it."""
    def run(refusals: int | None, *, max_wait_time: float | None = 60.0) -> Site:
        monkeypatch.setattr(site_module, "supernode_command",
                            lambda _s: fake_supernode(tmp_path, refusals))
        settings = SiteSettings(site_id="a", data_dir=tmp_path, superlink="127.0.0.1:1",
                                root_cert=tmp_path / "ca.pem", auth_key=tmp_path / "auth.key",
                                state_dir=tmp_path, max_wait_time=max_wait_time)
        site = Site(settings)
        site.retry_every = 0.05
        site.keeper = SessionKeeper(tmp_path, KEY)
        site.start_supernode()
        try:
            site.supervise()
        finally:
            site.stop(grace=1)
        return site
    return run


def killed_just_now(state_dir: Path, *, key: str = KEY, alive: float | None = None,
                    closed: bool = False) -> None:
    """The record a site killed without a graceful stop leaves behind."""
    write_record(state_dir, SessionRecord(key=key, node_id=4242, closed=closed,
                                          alive=time.time() if alive is None else alive))


def test_a_killed_and_restarted_site_retries_until_its_old_session_expires(run_site, tmp_path,
                                                                           caplog):
    killed_just_now(tmp_path)
    with caplog.at_level(logging.INFO, logger="medfed.deploy"):
        site = run_site(refusals=2)            # the SuperLink still holds the old session
    assert attempts(tmp_path) == 3
    # launcher and runner trust the runtime port of the last SuperNode started, not the first
    assert (tmp_path / SUPERNODE_PID).read_text() == str(site.daemon.proc.pid)
    text = caplog.text
    assert text.count(STILL_OPEN) == 2
    assert "rejoined the coordinator" in text
    assert read_record(tmp_path).node_id == 4242 and not read_record(tmp_path).closed


def test_a_key_that_is_not_registered_is_still_a_one_line_fatal_error(run_site, tmp_path, caplog):
    with pytest.raises(DeployError, match="it is not registered"):
        run_site(refusals=None)                # no session record: first start of this site
    assert attempts(tmp_path) == 1
    assert STILL_OPEN not in caplog.text


@pytest.mark.parametrize("record", ["another key", "closed gracefully", "long expired"])
def test_a_refusal_no_open_session_explains_is_not_retried(run_site, tmp_path, caplog, record):
    if record == "another key":                # the operator replaced the key since
        killed_just_now(tmp_path, key="0" * 64)
    elif record == "closed gracefully":        # Flower deactivated the node on SIGTERM
        killed_just_now(tmp_path, closed=True)
    else:
        killed_just_now(tmp_path, alive=time.time() - session_expiry() - 1)
    with pytest.raises(DeployError, match="it is not registered"):
        run_site(refusals=None)
    assert attempts(tmp_path) == 1
    assert STILL_OPEN not in caplog.text


def test_retrying_is_bounded_by_max_wait_time(run_site, tmp_path):
    killed_just_now(tmp_path)
    with pytest.raises(DeployError, match="previous session after --max-wait-time 0.3 s"):
        run_site(refusals=None, max_wait_time=0.3)
    assert attempts(tmp_path) >= 2


def test_still_refused_after_the_old_session_expired_is_the_real_error(run_site, tmp_path):
    killed_just_now(tmp_path, alive=time.time() - session_expiry() + 0.4)
    with pytest.raises(DeployError, match="no longer registered, or another daemon"):
        run_site(refusals=None)
    assert attempts(tmp_path) >= 2


def test_open_session_left():
    now = 1_000_000.0
    fresh = SessionRecord(key=KEY, node_id=1, alive=now)
    assert open_session_left(None, KEY, now) == 0
    assert open_session_left(fresh, "0" * 64, now) == 0
    assert open_session_left(SessionRecord(KEY, 1, now, closed=True), KEY, now) == 0
    assert open_session_left(fresh, KEY, now) == session_expiry()
    assert open_session_left(fresh, KEY, now + session_expiry() + 1) == 0
    # Flower's own expiry (2 heartbeats of 30 s) is inside the bound
    assert 60 < session_expiry() < 120


def test_keeper_records_connect_refresh_and_graceful_close(tmp_path):
    keeper = SessionKeeper(tmp_path, KEY, refresh=0.05)
    try:
        keeper.connected(7)
        first = read_record(tmp_path)
        assert (first.key, first.node_id, first.closed) == (KEY, 7, False)
        deadline = time.monotonic() + 10           # hang guard
        while read_record(tmp_path).alive == first.alive:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        keeper.disconnected(closed=True)
        assert read_record(tmp_path).closed
        assert (tmp_path / SESSION_FILE).stat().st_mode & 0o077 == 0
    finally:
        keeper.stop()


def test_a_corrupt_record_is_ignored(tmp_path):
    (tmp_path / SESSION_FILE).write_text("{not json")
    assert read_record(tmp_path) is None
