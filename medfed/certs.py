"""Provisioning for a real deployment: a CA, the coordinator's TLS certificate, site keys.

Recommended: each hospital creates its own key pair on its own machine with ``medfed site
keygen --out DIR`` (``site_keygen``): the private key never exists anywhere else, and only
``auth.pub`` travels to the coordinator's operator, who registers it (``medfed
register-site``). ``medfed certs --sites ...`` can still generate site keys centrally (handy
for a demo or compose on one host), but then the coordinator's operator has held every
hospital's private key and must hand it over securely.

Layout written by ``medfed certs --out DIR`` (DIR is 0700, every private key 0600)::

    DIR/ca.pem  ca.key              the federation's CA (keep ca.key offline after issuing)
    DIR/server.pem  server.key      the coordinator's TLS certificate (SANs: DNS names + IPs)
    DIR/sites/<site>/auth.key       a site's SuperNode authentication key (OpenSSH, EC P-384)
    DIR/sites/<site>/auth.pub       ... its public half: what the coordinator registers
    DIR/sites/<site>/ca.pem         the CA certificate the site verifies the coordinator with

TLS and node authentication are separate: TLS proves the coordinator to the sites (the sites
hold ``ca.pem``); the site key proves a site to the coordinator (Flower's SuperNode
authentication signs every Fleet request with it; the coordinator only accepts keys it has
registered). Flower reads the site key with ``load_ssh_private_key`` and registers
``load_ssh_public_key`` keys on a NIST curve, hence OpenSSH encoding on P-384.

Re-running never replaces a key silently: existing files are kept and only missing sites are
added; a changed server name or address list is refused unless ``force`` is set.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
CA_CERT, CA_KEY = "ca.pem", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
SITE_KEY, SITE_PUB = "auth.key", "auth.pub"


class ProvisioningError(ValueError):
    """The requested certificates cannot be written as asked; the message says why."""


@dataclass
class CertsReport:
    """What ``write_certs`` created and what it left as it was."""
    out: Path
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def site_dir(out: Path, site: str) -> Path:
    return out / "sites" / site


def write_certs(out: Path, *, server_name: str, sites: list[str],
                server_ips: tuple[str, ...] = ("127.0.0.1",), extra_dns: tuple[str, ...] = (),
                days: int = 365, force: bool = False) -> CertsReport:
    """Write (or complete) the deployment's CA, server certificate and site key pairs.

    Parameters
    ----------
    out : Path
        Output directory; created with mode 0700.
    server_name : str
        DNS name the sites use to reach the coordinator (first subject alternative name).
    sites : list of str
        Site ids (lowercase letters, digits, dashes); one key pair each.
    server_ips : tuple of str
        IP addresses put in the server certificate's SANs (127.0.0.1 for loopback use).
    extra_dns : tuple of str
        Further DNS names for the server certificate (e.g. a compose service name).
    days : int
        Validity of the CA and server certificates.
    force : bool
        Replace existing CA, server certificate and the named sites' keys.
    """
    _check_arguments(server_name, sites, server_ips, days)
    report = CertsReport(out)
    _make_private_dir(out)
    _make_private_dir(out / "sites")
    ca_key, ca_cert = _ca(out, days, force, report)
    _server(out, ca_key, ca_cert, server_name, server_ips, extra_dns, days, force, report)
    for site in sites:
        _site(out, site, force, report)
    return report


def _check_arguments(server_name: str, sites: list[str], server_ips, days: int) -> None:
    if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", server_name):
        raise ProvisioningError(f"--server-name {server_name!r} is not a DNS name")
    bad = [s for s in sites if not SITE_NAME.match(s)]
    if bad:
        raise ProvisioningError(f"site ids must be lowercase letters, digits and dashes: {bad}")
    if len(set(sites)) != len(sites):
        raise ProvisioningError(f"site ids repeat: {sites}")
    for ip in server_ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ProvisioningError(f"--server-ip {ip!r} is not an IP address") from None
    if days < 1:
        raise ProvisioningError("--days must be >= 1")


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Create ``path`` with ``mode`` from the start (never world-readable for a moment)."""
    if force:
        path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def _ca(out: Path, days: int, force: bool, report: CertsReport):
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    if cert_path.exists() and key_path.exists() and not force:
        report.kept += [CA_CERT, CA_KEY]
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    if (cert_path.exists() or key_path.exists()) and not force:
        raise ProvisioningError(f"{out} holds only half of the CA ({CA_CERT}/{CA_KEY}); "
                                "restore the other half or pass --force to start over")
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MedFed federation CA")])
    start, end = _validity(days)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    _write(key_path, _pem_key(key), 0o600, force)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    report.created += [CA_CERT, CA_KEY]
    return key, cert


def server_sans(cert: x509.Certificate) -> tuple[set[str], set[str]]:
    """(DNS names, IP addresses) of a certificate's subject alternative names."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return (set(san.get_values_for_type(x509.DNSName)),
            {str(ip) for ip in san.get_values_for_type(x509.IPAddress)})


def _server(out: Path, ca_key, ca_cert, server_name: str, server_ips, extra_dns, days: int,
            force: bool, report: CertsReport) -> None:
    cert_path, key_path = out / SERVER_CERT, out / SERVER_KEY
    dns = {server_name, *extra_dns}
    ips = set(server_ips)
    if cert_path.exists() and key_path.exists() and not force:
        have_dns, have_ips = server_sans(x509.load_pem_x509_certificate(cert_path.read_bytes()))
        if (have_dns, have_ips) != (dns, ips):
            raise ProvisioningError(
                f"{cert_path} was issued for DNS {sorted(have_dns)} / IP {sorted(have_ips)}, "
                f"not DNS {sorted(dns)} / IP {sorted(ips)}; pass --force to reissue it "
                "(site keys are kept unless their sites are named)")
        report.kept += [SERVER_CERT, SERVER_KEY]
        return
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(days)
    alt_names = [x509.DNSName(d) for d in sorted(dns)]
    alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in sorted(ips)]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(min(end, ca_cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(key_path, _pem_key(key), 0o600, force)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    report.created += [SERVER_CERT, SERVER_KEY]


@dataclass(frozen=True)
class SiteKey:
    """A key pair written by ``site_keygen``: where it is and the public line to register."""
    private: Path
    public: Path
    public_line: str


def site_keygen(out: Path, *, site: str | None = None, force: bool = False) -> SiteKey:
    """Create this site's SuperNode key pair on the site: ``out/auth.key`` (0600) and
    ``out/auth.pub`` (0644).

    Parameters
    ----------
    out : Path
        Folder for the pair; created with mode 0700.
    site : str, optional
        The site id, written as the public key's comment (``medfed-site:<site>``).
    force : bool
        Replace an existing key (the coordinator must then register the new public key).
    """
    if site is not None and not SITE_NAME.match(site):
        raise ProvisioningError(f"site id {site!r} must be lowercase letters, digits and dashes")
    _make_private_dir(out)
    key_path, pub_path = out / SITE_KEY, out / SITE_PUB
    if key_path.exists() and not force:
        raise ProvisioningError(f"{key_path} already exists; keep it (its public half is what "
                                "the coordinator registered) or pass --force to replace it "
                                "and register the new auth.pub")
    key = ec.generate_private_key(ec.SECP384R1())
    _write(key_path, _ssh_private(key), 0o600, force)
    public = _ssh_public(key, site or "unnamed")
    _write(pub_path, public, 0o644, True)
    return SiteKey(key_path, pub_path, public.decode().strip())


def _ssh_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


def _site(out: Path, site: str, force: bool, report: CertsReport) -> None:
    folder = site_dir(out, site)
    _make_private_dir(folder)
    key_path, pub_path = folder / SITE_KEY, folder / SITE_PUB
    names = [f"sites/{site}/{SITE_KEY}", f"sites/{site}/{SITE_PUB}"]
    if key_path.exists() and not force:
        if not pub_path.exists():       # the public half is derivable; restore it
            key = serialization.load_ssh_private_key(key_path.read_bytes(), None)
            _write(pub_path, _ssh_public(key, site), 0o644, False)
        report.kept += names
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        _write(key_path, _ssh_private(key), 0o600, force)
        _write(pub_path, _ssh_public(key, site), 0o644, True)
        report.created += names
    ca_copy = folder / CA_CERT
    _write(ca_copy, (out / CA_CERT).read_bytes(), 0o644, True)


def _ssh_public(key, site: str) -> bytes:
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH)
    return line + f" medfed-site:{site}\n".encode()


def registered_sites(out: Path) -> dict[str, Path]:
    """Site id -> public key file for every site under ``out/sites``."""
    root = out / "sites"
    if not root.is_dir():
        return {}
    return {p.parent.name: p for p in sorted(root.glob(f"*/{SITE_PUB}"))}
