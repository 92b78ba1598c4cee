"""Attacker: another account on the hospital's site machine (or a backup/NFS reader) that can
read the site's SuperNode key -- whoever holds it joins the federation as that hospital.
``medfed site`` must refuse to start with a missing key or one with any group/other bits, in
one line, before it reads the data or contacts the coordinator."""

from __future__ import annotations

import os

import pytest

from medfed.certs import site_keygen
from medfed.deploy.preflight import DeployError, check_auth_key
from medfed.deploy.site import Site, SiteSettings

from ..deploy.conftest import free_port, run_medfed


@pytest.fixture
def key(tmp_path):
    return site_keygen(tmp_path / "keys", site="a").private


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o610, 0o601, 0o660])
def test_a_key_others_can_touch_is_refused(key, mode):
    os.chmod(key, mode)
    with pytest.raises(DeployError, match=f"accessible by group/other \\(mode {mode:04o}\\)"):
        check_auth_key(key)


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_an_owner_only_key_is_accepted(key, mode):
    os.chmod(key, mode)
    check_auth_key(key)


def test_a_missing_key_is_refused_with_the_keygen_hint(tmp_path):
    with pytest.raises(DeployError, match="does not exist.*medfed site keygen"):
        check_auth_key(tmp_path / "nope.key")


def test_site_refuses_a_readable_key_before_reading_data_or_connecting(key, tmp_path):
    os.chmod(key, 0o644)
    settings = SiteSettings(site_id="a", data_dir=tmp_path / "no-data", superlink="127.0.0.1:1",
                            root_cert=tmp_path / "no-ca.pem", auth_key=key,
                            state_dir=tmp_path / "state")
    with pytest.raises(DeployError, match="group/other"):   # not the data or CA error
        Site(settings).preflight()


def test_cli_site_with_a_group_readable_key_fails_in_one_line(key, tmp_path):
    os.chmod(key, 0o640)
    result = run_medfed("site", "--site-id", "a", "--data-dir", str(tmp_path / "no-data"),
                        "--superlink", f"127.0.0.1:{free_port()}",
                        "--root-cert", str(tmp_path / "ca.pem"), "--auth-key", str(key))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("medfed: error: auth key")
    assert result.stderr.count("\n") == 1 and "chmod 600" in result.stderr
