"""Prompt delivery (issue 27): a site's SuperNode asks the coordinator again after at most
``--poll-interval`` seconds instead of Flower's fixed 3 s."""

from __future__ import annotations

import inspect
import time

import pytest

from medfed.deploy import supernode
from medfed.deploy.follow import FOLLOW_POLL, FOLLOW_WINDOW
from medfed.deploy.preflight import DeployError
from medfed.deploy.site import Site, SiteSettings, supernode_command


def test_flowers_loop_still_sleeps_3_s_where_the_cap_applies():
    """The cap replaces ``time`` in exactly the module whose loop has the fixed sleeps; if a
    Flower upgrade moves them, this fails instead of the cap silently doing nothing."""
    import flwr.supernode.start_client_internal as loop

    source = inspect.getsource(loop)
    assert "time.sleep(3)" in source and "import time" in source
    # its waits on its own state (the ClientApp's reply, a reply object's bytes)
    assert inspect.getsource(loop._push_messages).count("time.sleep(0.5)") == 2


def test_the_capped_clock_sleeps_at_most_the_interval(monkeypatch):
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    clock = supernode.capped_time(0.25)
    clock.sleep(3)
    clock.sleep(0.5)
    clock.sleep(0.01)
    assert slept == [0.25, supernode.LOCAL_WAIT, 0.01]
    assert clock.time is time.time and clock.monotonic is time.monotonic


def test_the_supernode_forwards_a_reply_within_the_local_wait_not_flowers_0_5_s(monkeypatch):
    from types import SimpleNamespace

    from medfed.deploy import follow
    clock = [100.0]                   # follow's monotonic clock, moved by hand
    monkeypatch.setattr(follow, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    """Flower's ``_push_messages`` looks for the ClientApp's reply in the SuperNode's own
    state and sleeps 0.5 s between looks: with the capped clock a reply that appears while
    it sleeps is sent after ``LOCAL_WAIT``, and the idle poll keeps ``--poll-interval``."""
    import flwr.supernode.start_client_internal as loop

    _restore_after(monkeypatch, loop)
    supernode.install(0.5)
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)

    class _State:                      # the reply shows up after the runner's second look
        looks = 0

        def get_messages_legacy(self, is_reply):
            self.looks += 1
            if self.looks == 3:
                raise StopIteration          # "here it is": the test ends there
            return []

    with pytest.raises(StopIteration):
        loop._push_messages(state=_State(), object_store=None, send=None, push_object=None)
    assert slept == [supernode.LOCAL_WAIT] * 2 and max(slept) <= 0.05
    loop.time.sleep(3)              # right after a reply: the run's next message is near
    assert slept[-1] == FOLLOW_POLL
    clock[0] += FOLLOW_WINDOW                                   # the window has passed
    loop.time.sleep(3)
    assert slept[-1] == 0.5


def _restore_after(monkeypatch, loop) -> None:
    """What ``install`` replaces in Flower's SuperNode loop, put back after the test."""
    for name in ("time", "pull_objects", "_push_messages", "get_fused_config_from_fab"):
        monkeypatch.setattr(loop, name, getattr(loop, name))


def test_install_caps_only_the_supernode_loop(monkeypatch):
    import flwr.supernode.start_client_internal as loop

    _restore_after(monkeypatch, loop)
    supernode.install(0.5)
    slept = []
    monkeypatch.setattr(time, "sleep", slept.append)
    loop.time.sleep(3)
    assert slept == [0.5]
    assert time.sleep is not loop.time.sleep                  # the rest of Flower untouched


@pytest.mark.parametrize("bad", [0, -1, 3.5])
def test_a_poll_interval_outside_0_to_3_s_is_refused(bad, tmp_path):
    with pytest.raises(ValueError, match="poll-interval"):
        supernode.capped_time(bad)
    settings = SiteSettings(site_id="a", data_dir=tmp_path, superlink="x:1",
                            root_cert=tmp_path / "ca", auth_key=tmp_path / "k",
                            state_dir=tmp_path / "s", poll_interval=bad)
    with pytest.raises(DeployError, match="--poll-interval"):
        Site(settings).preflight()


def test_the_site_starts_flowers_supernode_through_the_cap(tmp_path):
    settings = SiteSettings(site_id="a", data_dir=tmp_path, superlink="x:1",
                            root_cert=tmp_path / "ca", auth_key=tmp_path / "k",
                            state_dir=tmp_path / "s", poll_interval=0.4)
    cmd = supernode_command(settings)
    assert cmd[1:5] == ["-m", "medfed.deploy.supernode", "--poll-interval", "0.4"]
    assert cmd[cmd.index("--isolation") + 1] == "process"


def _backoffs(fn) -> dict:
    """The retry backoff ``fn`` (Flower's puller, maybe wrapped in a partial) will use."""
    params = inspect.signature(fn).parameters
    return {k: params[k].default for k in ("initial_backoff", "backoff_cap")}


def test_objects_are_retried_after_0_05_s_not_flowers_1_s(monkeypatch):
    """The SuperNode's download from the SuperLink and the runner's pull from the SuperNode
    both retry a missing object promptly (Flower: 1 s, 2 s, 4 s ...)."""
    import flwr.supernode.runtime.run_clientapp as flwr_clientapp
    import flwr.supernode.start_client_internal as loop

    from medfed.deploy import runner

    assert _backoffs(loop.pull_objects) == {"initial_backoff": 1, "backoff_cap": 10}
    assert _backoffs(flwr_clientapp.pull_and_inflate_object_from_tree) == \
        {"initial_backoff": 1, "backoff_cap": 10}
    _restore_after(monkeypatch, loop)
    monkeypatch.setattr(flwr_clientapp, "pull_and_inflate_object_from_tree",
                        flwr_clientapp.pull_and_inflate_object_from_tree)
    supernode.install(0.5)
    runner.prompt_pulls()
    assert _backoffs(loop.pull_objects) == supernode.OBJECT_PULL_BACKOFF
    # the runner pulls from its own SuperNode on loopback: retried sooner still
    assert _backoffs(flwr_clientapp.pull_and_inflate_object_from_tree) == \
        runner.LOCAL_PULL_BACKOFF
    assert runner.LOCAL_PULL_BACKOFF["backoff_cap"] <= 0.1
    assert supernode.OBJECT_PULL_BACKOFF["initial_backoff"] < 0.1
    # one setting for the ServerApp and the SuperNode (protocol.transport)
    from protocol import transport
    from server import prompt_grid

    assert supernode.OBJECT_PULL_BACKOFF is transport.OBJECT_PULL_BACKOFF \
        is prompt_grid.OBJECT_PULL_BACKOFF
