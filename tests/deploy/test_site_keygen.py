"""``medfed site keygen``: the site's key pair is born on the site; only auth.pub travels."""

from __future__ import annotations

import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from medfed.certs import ProvisioningError, site_keygen
from medfed.cli import build_parser, join_two_word_commands, main
from medfed.deploy.preflight import check_auth_key


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keygen_writes_an_owner_only_flower_key_and_its_public_half(tmp_path):
    key = site_keygen(tmp_path / "keys", site="site-a")
    assert _mode(tmp_path / "keys") == 0o700
    assert _mode(key.private) == 0o600 and _mode(key.public) == 0o644
    private = serialization.load_ssh_private_key(key.private.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    public = serialization.load_ssh_public_key(key.public.read_bytes())    # what Flower registers
    raw = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    assert public.public_bytes(*raw) == private.public_key().public_bytes(*raw)
    assert key.public.read_text().strip() == key.public_line
    assert key.public_line.endswith(" medfed-site:site-a")
    check_auth_key(key.private)                       # what `medfed site` accepts at start


def test_keygen_never_replaces_a_key_silently(tmp_path):
    first = site_keygen(tmp_path, site="site-a").private.read_bytes()
    with pytest.raises(ProvisioningError, match="already exists"):
        site_keygen(tmp_path, site="site-a")
    assert (tmp_path / "auth.key").read_bytes() == first
    replaced = site_keygen(tmp_path, site="site-a", force=True)
    assert replaced.private.read_bytes() != first and _mode(replaced.private) == 0o600


def test_keygen_refuses_a_bad_site_id(tmp_path):
    with pytest.raises(ProvisioningError, match="lowercase"):
        site_keygen(tmp_path, site="Site A")
    assert not (tmp_path / "auth.key").exists()


def test_cli_site_keygen_prints_the_public_key_to_register(tmp_path, capsys):
    assert main(["site", "keygen", "--out", str(tmp_path), "--site-id", "site-b"]) == 0
    out = capsys.readouterr().out
    public = (tmp_path / "auth.pub").read_text().strip()
    assert public in out.splitlines() and "medfed register-site --site-id site-b" in out
    assert "PRIVATE KEY" not in out                   # the private key is never printed
    assert main(["site", "keygen", "--out", str(tmp_path)]) == 2          # exists: refused


def test_two_word_command_joining_leaves_everything_else_alone():
    assert join_two_word_commands(["--debug", "site", "keygen", "--out", "d"]) == [
        "--debug", "site keygen", "--out", "d"]
    site = ["site", "--site-id", "keygen", "--data-dir", "d"]
    assert join_two_word_commands(site) == site
    args = build_parser().parse_args(join_two_word_commands(["site", "keygen", "--out", "d"]))
    assert args.out == "d" and args.func.function == "site_keygen"
