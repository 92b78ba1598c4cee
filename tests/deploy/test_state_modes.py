"""A site's and the coordinator's ``--state-dir`` are their own users' alone (walkthrough
finding). A new folder was already made 0700, but one that existed with wider modes (made by
hand under the usual umask 022, or by an older release) stayed 0755: the site's runtime
secret, session record and egress log, the coordinator's run directories, listable by every
account on the machine. Both are now tightened to 0700 with a warning, by the rule the site's
privacy state follows (``client.privacy.ledger.own_folder``), and so is the Flower CLI home of
``medfed run`` / ``medfed register-site`` (``--flwr-home``: its connection and account
tokens). The daemons and the Flower CLI themselves are stand-ins: no Flower process starts."""

from __future__ import annotations

import logging
import stat
from types import SimpleNamespace

import pytest

from medfed import cli
from medfed.certs import write_certs
from medfed.commands import deploy as deploy_commands
from medfed.deploy import coordinator as coordinator_module
from medfed.deploy import site as site_module
from medfed.deploy import submit as submit_module
from medfed.deploy.coordinator import Coordinator, CoordinatorSettings
from medfed.deploy.preflight import DeployError
from medfed.deploy.site import Site, SiteSettings


class _Daemon:
    """A Flower daemon that exits at once (the coordinator then stops at its startup)."""

    stopping, error = False, None
    proc = SimpleNamespace(pid=4242)             # the pid Site.start_supernode pins

    def __init__(self, *_args, **_kwargs):
        pass

    def start(self):
        pass

    def running(self):
        return False

    def wait(self, *_args, **_kwargs):
        return False

    def stop(self, grace=0):
        self.stopping = True
        return 1


@pytest.fixture()
def umask_022():
    import os

    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_sites_state_dir_made_wider_before_is_tightened_with_a_warning(tmp_path, monkeypatch,
                                                                         caplog, umask_022):
    state = tmp_path / "state" / "site-a"
    state.mkdir(parents=True)                      # mkdir -p by hand: 0755
    assert _mode(state) == 0o755
    monkeypatch.setattr(Site, "preflight", lambda self: None)
    monkeypatch.setattr(site_module, "key_fingerprint", lambda _key: "f" * 64)
    monkeypatch.setattr(site_module, "Daemon", _Daemon)
    site = Site(SiteSettings(site_id="a", data_dir=tmp_path, superlink="127.0.0.1:1",
                             root_cert=tmp_path / "ca.pem", auth_key=tmp_path / "auth.key",
                             state_dir=state))
    with caplog.at_level(logging.WARNING):
        site.start()
    site.stop(grace=0)
    assert _mode(state) == 0o700
    assert f"{state} was readable by others (mode 755): now 700" in caplog.text


def test_the_coordinators_state_dir_made_wider_before_is_tightened_with_a_warning(
        tmp_path, monkeypatch, caplog, umask_022):
    certs = tmp_path / "certs"
    write_certs(certs, server_name="localhost", sites=["a"])
    state = tmp_path / "coordinator"
    state.mkdir()
    assert _mode(state) == 0o755
    monkeypatch.setattr(coordinator_module, "Daemon", _Daemon)
    monkeypatch.setattr(coordinator_module, "check_port_free", lambda *_args: None)
    coordinator = Coordinator(CoordinatorSettings(certs=certs, state_dir=state,
                                                  host="127.0.0.1", port=1))
    with caplog.at_level(logging.WARNING), pytest.raises(DeployError, match="SuperLink exited"):
        coordinator.start(startup_timeout=0)
    assert _mode(state) == 0o700
    assert f"{state} was readable by others (mode 755): now 700" in caplog.text


class _NoFlower(Exception):
    """Where ``medfed run`` would start the Flower CLI (the test stops there)."""


@pytest.mark.parametrize("command", ["run", "register-site"])
def test_a_flwr_home_made_wider_before_is_tightened_with_a_warning(command, tmp_path,
                                                                   monkeypatch, caplog, capsys,
                                                                   umask_022):
    home = tmp_path / "flwr-deploy"
    home.mkdir()                                   # made by hand: 0755
    assert _mode(home) == 0o755
    monkeypatch.setattr(deploy_commands, "setup_logging", lambda *a, **k: None)
    monkeypatch.setattr(coordinator_module, "register_site", lambda *_args: "registered")
    for name in ("check_superlink", "check_tracking", "validate"):
        monkeypatch.setattr(submit_module, name, lambda *a, **k: None)

    def no_flower(*_args, **_kwargs):
        raise _NoFlower
    monkeypatch.setattr(submit_module.subprocess, "Popen", no_flower)
    common = ["--superlink", "127.0.0.1:1", "--root-cert", str(tmp_path / "ca.pem"),
              "--flwr-home", str(home)]
    argv = (["run", "experiment=smoke", *common] if command == "run" else
            ["register-site", "--site-id", "a", "--public-key", str(tmp_path / "auth.pub"),
             *common])
    with caplog.at_level(logging.WARNING):
        code = cli.main(argv)
    if command == "run":                                  # stopped at the Flower CLI
        assert code == 1 and "_NoFlower" in capsys.readouterr().err
    else:
        assert code == 0
    assert (home / "config.toml").is_file()
    assert _mode(home) == 0o700
    assert f"{home} was readable by others (mode 755): now 700" in caplog.text
