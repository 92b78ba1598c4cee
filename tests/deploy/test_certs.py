"""`medfed certs`: a CA, a server certificate with SANs, per-site keys Flower can load;
tight modes; re-running never replaces a key silently."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from medfed.certs import ProvisioningError, registered_sites, server_sans, write_certs
from medfed.cli import main


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def certs(tmp_path):
    out = tmp_path / "certs"
    write_certs(out, server_name="coordinator.example", sites=["a", "b", "c"],
                server_ips=("127.0.0.1", "10.0.0.5"))
    return out


def test_server_certificate_has_sans_and_chains_to_the_ca(certs):
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    assert server_sans(server) == ({"coordinator.example"}, {"127.0.0.1", "10.0.0.5"})
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ip = ipaddress.ip_address("127.0.0.1")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ip in san.get_values_for_type(x509.IPAddress)


def test_site_keys_are_what_flower_node_auth_loads(certs):
    assert set(registered_sites(certs)) == {"a", "b", "c"}
    for site in "abc":
        private = load_ssh_private_key((certs / "sites" / site / "auth.key").read_bytes(), None)
        public = load_ssh_public_key((certs / "sites" / site / "auth.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(public)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (certs / "sites" / site / "ca.pem").read_bytes() == (certs / "ca.pem").read_bytes()
    keys = {(certs / "sites" / s / "auth.pub").read_bytes() for s in "abc"}
    assert len(keys) == 3


def test_private_keys_0600_directories_0700(certs):
    assert _mode(certs) == 0o700 and _mode(certs / "sites") == 0o700
    for key in [certs / "ca.key", certs / "server.key",
                *(certs / "sites").glob("*/auth.key")]:
        assert _mode(key) == 0o600, key
    assert _mode(certs / "sites" / "a") == 0o700


def test_rerun_keeps_keys_and_adds_missing_sites(certs):
    before = {p: p.read_bytes() for p in certs.rglob("*") if p.is_file()}
    report = write_certs(certs, server_name="coordinator.example", sites=["a", "d"],
                         server_ips=("127.0.0.1", "10.0.0.5"))
    assert report.created == ["sites/d/auth.key", "sites/d/auth.pub"]
    assert "sites/a/auth.key" in report.kept and "ca.key" in report.kept
    for path, content in before.items():
        assert path.read_bytes() == content, path
    assert set(registered_sites(certs)) == {"a", "b", "c", "d"}


def test_changed_server_name_is_refused_without_force(certs):
    server = (certs / "server.pem").read_bytes()
    with pytest.raises(ProvisioningError, match="--force"):
        write_certs(certs, server_name="other.example", sites=[], server_ips=("127.0.0.1",))
    assert (certs / "server.pem").read_bytes() == server
    site_key = (certs / "sites" / "a" / "auth.key").read_bytes()
    write_certs(certs, server_name="other.example", sites=[], server_ips=("127.0.0.1",),
                force=True)
    assert (certs / "server.pem").read_bytes() != server
    assert (certs / "sites" / "a" / "auth.key").read_bytes() == site_key   # not named: kept


@pytest.mark.parametrize("argv, message", [
    (["--sites", "a,A_b"], "lowercase"),
    (["--sites", "a,a"], "repeat"),
    (["--server-ip", "not-an-ip"], "not an IP"),
    (["--server-name", "bad name"], "not a DNS name"),
])
def test_cli_bad_input_one_line(tmp_path, capsys, argv, message):
    args = ["certs", "--out", str(tmp_path / "c"), "--server-name", "localhost", *argv]
    if "--server-name" in argv:
        args = ["certs", "--out", str(tmp_path / "c"), *argv]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_cli_writes_and_reports(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path / "c"), "--server-name", "localhost",
                 "--sites", "x,y"]) == 0
    out = capsys.readouterr().out
    assert "created  sites/y/auth.key" in out
    assert main(["certs", "--out", str(tmp_path / "c"), "--server-name", "localhost",
                 "--sites", "x,y"]) == 0
    assert "kept     sites/x/auth.key" in capsys.readouterr().out
