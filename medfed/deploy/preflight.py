"""Checks that turn a misconfigured deployment into one clear error before anything starts.

Flower's own daemons report a wrong CA, an expired certificate or an unreachable SuperLink
after retries, in a multi-line log, or not at all (a SuperNode retries a refused connection
forever by default). These checks run first and raise ``DeployError`` with one line that says
what is wrong and what to do.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import socket
import ssl
import stat
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


class DeployError(ValueError):
    """A deployment setting is wrong; the message names it and the fix."""


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DeployError(f"{what} {path} does not exist (see `medfed certs`)")
    return path


def check_port_free(host: str, port: int, what: str) -> None:
    """Refuse a port another process listens on (a second coordinator, a stale site)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise DeployError(f"{what} port {host}:{port} is already in use (another "
                                  "coordinator or site running?); stop it or choose another "
                                  "port") from None
            raise DeployError(f"cannot bind {what} to {host}:{port}: {err.strerror}") from None


def load_certificate(path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(require_file(path, what).read_bytes())
    except ValueError:
        raise DeployError(f"{what} {path} is not a PEM certificate") from None


def check_validity(cert: x509.Certificate, what: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc < now:
        raise DeployError(f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d}; reissue it "
                          "with `medfed certs --force`")
    if cert.not_valid_before_utc > now:
        raise DeployError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} "
                          "UTC (check the clock)")


def check_server_certificates(cert_path: Path, key_path: Path, ca_path: Path) -> None:
    """The coordinator's certificate: valid now, issued by the CA, matching its key."""
    cert = load_certificate(cert_path, "server certificate")
    ca = load_certificate(ca_path, "CA certificate")
    check_validity(ca, f"CA certificate {ca_path}")
    check_validity(cert, f"server certificate {cert_path}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise DeployError(f"server certificate {cert_path} was not issued by the CA "
                          f"{ca_path}; sites would refuse it") from None
    try:
        key = serialization.load_pem_private_key(require_file(key_path, "server key")
                                                 .read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise DeployError(f"server key {key_path} is not an unencrypted PEM private key") from None
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.DER, raw)
            != cert.public_key().public_bytes(serialization.Encoding.DER, raw)):
        raise DeployError(f"server key {key_path} does not belong to certificate {cert_path}")


def check_key_permissions(path: Path) -> None:
    """The site's private key exists and only its owner may read or write it (no group/other
    bits): whoever can read it can join the federation as this hospital."""
    if not path.is_file():
        raise DeployError(f"auth key {path} does not exist; create the site's key on this "
                          "machine with `medfed site keygen --out DIR` and register DIR/auth.pub "
                          "with the coordinator")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise DeployError(f"auth key {path} is accessible by group/other (mode {mode:04o}); "
                          f"run `chmod 600 {path}` (and rotate it if others could read it)")


def check_auth_key(path: Path) -> None:
    """A site's SuperNode key: owner-only, an OpenSSH EC private key as Flower's SuperNode
    loads it."""
    check_key_permissions(path)
    try:
        key = serialization.load_ssh_private_key(require_file(path, "auth key").read_bytes(),
                                                 None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise DeployError(f"auth key {path} is not an unencrypted OpenSSH private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"auth key {path} is not an EC key (Flower needs a NIST curve)")


def replaceable_by_others(inner: Path, outer: Path) -> str | None:
    """Why another account could rename ``inner`` (and put a fresh one in its place) when it
    lies inside ``outer``: a folder from ``outer`` down to ``inner``'s parent that is another
    account's, or that group/others may write without the sticky bit. None when ``inner``
    is not inside ``outer`` or no such folder exists."""
    outer, inner = outer.resolve(), inner.resolve()
    if inner == outer or not inner.is_relative_to(outer):
        return None
    parts = inner.relative_to(outer).parts
    for depth in range(len(parts)):               # outer, ..., inner's parent
        folder = outer.joinpath(*parts[:depth])
        try:
            st = folder.stat()
        except FileNotFoundError:
            return None
        if st.st_uid != os.getuid():
            return f"a folder of it belongs to another account (uid {st.st_uid})"
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            return f"a folder of it is writable by group/others (mode {st.st_mode & 0o777:04o})"
    return None


def check_superlink(address: str, root_cert: Path, *, timeout: float = 5.0) -> None:
    """Reach the SuperLink and complete a TLS handshake verified against ``root_cert``."""
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(require_file(root_cert, "root certificate")))
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return
    except ssl.SSLCertVerificationError as err:
        raise DeployError(_verify_message(err, address, root_cert)) from None
    except ssl.SSLError as err:
        raise DeployError(f"TLS handshake with the SuperLink at {address} failed "
                          f"({err.reason or err}); is it serving TLS on that port?") from None
    except socket.timeout:
        raise DeployError(f"SuperLink {address} did not answer within {timeout:g} s "
                          "(firewall? wrong address?)") from None
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise DeployError(f"cannot reach the SuperLink at {address}: {reason}") from None


def _verify_message(err: ssl.SSLCertVerificationError, address: str, root_cert: Path) -> str:
    text = str(err.verify_message or err)
    if "expired" in text:
        return (f"the SuperLink's certificate at {address} has expired; the coordinator must "
                "reissue it (`medfed certs --force`)")
    if "Hostname mismatch" in text or "IP address mismatch" in text:
        return (f"the SuperLink's certificate is not valid for {address.rpartition(':')[0]} "
                "(mismatched name); connect with a name or IP in its SANs, or reissue it")
    if "local issuer" in text or "self-signed" in text or "self signed" in text:
        return (f"the SuperLink's certificate at {address} is not signed by the CA in "
                f"{root_cert} (wrong CA?)")
    return f"the SuperLink's certificate at {address} was refused: {text}"
