"""The site's runtime-API secret: who may claim a task on the SuperNode's loopback port.

Threat. ``flower-supernode --isolation process`` queues each task on its Runtime API at
``127.0.0.1:<runtime-port>`` and waits for an executor to claim it. Loopback is not a trust
boundary: any other account on the site machine can connect there. Whoever claims a task gets
its token, and with the token pulls the message (global weights, run config) and the FAB, and
pushes the reply the coordinator will aggregate as the hospital's.

What Flower 1.41 provides (``flwr.supercore.auth``; read, not guessed). With
``--superexec-auth-secret-file FILE`` (process isolation only; the file is read as exact raw
bytes, empty refused) the SuperNode's ``AcquireTask`` route requires four headers,
``flwr-superexec-{ts,nonce,body-sha256,signature}``: an HMAC-SHA256, keyed with
``HMAC(secret, "superexec-auth-v1")``, over the method, a timestamp (a narrow window), a fresh
nonce (replays refused) and the SHA-256 of the request body. Flower's SuperExec signs
``AcquireTask`` only; every other Runtime route needs the task token that ``AcquireTask``
hands out. So: no secret, no token; no token, no message, FAB or reply.

What MedFed adds. ``medfed site`` creates the secret (32 random bytes, hex) in its state dir
on first start and refuses one others may read (``check_runtime_secret``, the same rule as
the site key); the launcher signs its ``AcquireTask`` polls with it; and the token, the second
key, reaches the runner on its standard input (Flower's ``--token-stdin`` convention), never
on a command line every local account can read in ``/proc/<pid>/cmdline``.

The other direction. The secret proves the launcher to the SuperNode, not the SuperNode to the
launcher: while the site's SuperNode is down (restarted every 10 s while the coordinator still
holds the site's previous session), another account can bind the runtime port with a stock
SuperNode and hand the launcher tasks of its own, with a node config of its choosing (another
data dir, a fresh privacy dir and so a fresh budget, a report floor of 1). So ``medfed site``
also writes the node config it gives its SuperNode to ``state-dir/node-config.json``
(owner-only, ``pin_node_config``), the launcher hands the runner that file's path on its
command line, and the runner refuses every task whose node config differs from it
(``foreign_node_config``): such a task gets an error reply and one line in the site's log, and
nothing of it runs. A squatter could still copy the site's node config (the SuperNode's
command line shows it) and pose as the coordinator. So, first of all, ``medfed site`` writes
the pid of each SuperNode it starts to ``state-dir/supernode.pid`` (``pin_supernode_pid``),
and launcher and runner send a request to the runtime port only while every socket listening
on that port is an open file of that process (``runtime_port_refusal``, before each request
and each retry: ``RuntimePortGuard``). While the SuperNode is down, nothing is sent; a port
held by anyone else, or a ``/proc`` that cannot be read, refuses with one line in the site's
log. Left: the moment between that look and the connection (a SuperNode that dies within it).
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

import httpx

from client.privacy.ledger import write_own_file

from .preflight import DeployError

RUNTIME_SECRET = "runtime-auth.secret"
NODE_CONFIG = "node-config.json"          # the node config the site gave its SuperNode
SUPERNODE_PID = "supernode.pid"           # the SuperNode the site daemon started last
# The one method Flower's SuperExec signs (flwr.supercore.superexec.run_superexec).
ACQUIRE_TASK = "/flwr.proto.Runtime/AcquireTask"


def check_runtime_secret(path: Path) -> None:
    """The secret is a non-empty regular file of this account that nobody else may touch."""
    check_owner_only(path, "runtime secret")


def check_owner_only(path: Path, what: str) -> None:
    """``path`` is a non-empty regular file of this account that nobody else may touch
    (``medfed site`` (re)creates the site's ones, so deleting a refused one is the fix)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise DeployError(f"{what} {path} does not exist (`medfed site` creates it in "
                          "its state dir on start)") from None
    if not stat.S_ISREG(st.st_mode):
        raise DeployError(f"{what} {path} is not a regular file (a link?); delete it "
                          "and `medfed site` creates a new one")
    if st.st_uid != os.getuid():
        raise DeployError(f"{what} {path} belongs to another account (uid {st.st_uid}); "
                          "delete it and `medfed site` creates a new one")
    mode = st.st_mode & 0o777
    if mode & 0o077:
        raise DeployError(f"{what} {path} is accessible by group/other (mode "
                          f"{mode:04o}); delete it (`medfed site` creates a new one) or run "
                          f"`chmod 600 {path}` if nobody else could have read it")
    if st.st_size == 0:
        raise DeployError(f"{what} {path} is empty; delete it and `medfed site` creates "
                          "a new one")


def ensure_runtime_secret(state_dir: Path) -> Path:
    """``state_dir/runtime-auth.secret``: created owner-only if missing, checked either way."""
    path = state_dir / RUNTIME_SECRET
    if not path.exists() and not path.is_symlink():
        # O_EXCL|O_NOFOLLOW: never write the secret through a planted link or into a file
        # someone else created between the check and the open.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(32).encode("ascii"))
    check_runtime_secret(path)
    return path


def load_runtime_secret(path: Path) -> bytes:
    """The secret's bytes, read the way ``flower-supernode`` reads its copy."""
    from flwr.supercore.auth import load_superexec_auth_secret

    check_runtime_secret(path)
    secret = load_superexec_auth_secret(str(path))
    assert secret is not None
    return secret


def signing_interceptor(secret: bytes):
    """Flower's client interceptor that signs ``AcquireTask`` with the site's secret."""
    from flwr.supercore.interceptors.http import SuperExecAuthHttpInterceptor

    return SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=[ACQUIRE_TASK])


def pin_node_config(state_dir: Path, config: Mapping[str, object]) -> Path:
    """Write ``config`` (what the site passes its SuperNode's ``--node-config``) to
    ``state_dir/node-config.json``, owner-only, replacing the last start's; its path."""
    path = state_dir / NODE_CONFIG
    write_own_file(path, json.dumps(dict(config), sort_keys=True).encode())
    return path


def load_pinned_node_config(path: Path) -> dict[str, object]:
    """The node config ``pin_node_config`` wrote (checked owner-only first)."""
    check_owner_only(path, "pinned node config")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DeployError(f"pinned node config {path} cannot be read ({err}); `medfed site` "
                          "writes it on start") from None
    if not isinstance(config, dict):
        raise DeployError(f"pinned node config {path} is not a JSON object; `medfed site` "
                          "writes it on start")
    return config


def foreign_node_config(received: Mapping[str, object],
                        pinned: Mapping[str, object]) -> list[str]:
    """Keys on which a task's node config differs from the pinned one (added, missing, or
    another value or type: ``1`` is not ``1.0`` nor ``true``); sorted names only, no values."""
    def same(key: str) -> bool:
        return key in received and key in pinned and \
            json.dumps(received[key]) == json.dumps(pinned[key])

    return sorted(k for k in set(received) | set(pinned) if not same(k))


def pin_supernode_pid(state_dir: Path, pid: int) -> Path:
    """Write ``pid``, the SuperNode ``medfed site`` just started, to ``state_dir/supernode.pid``
    (owner-only, replacing the last one's); its path."""
    path = state_dir / SUPERNODE_PID
    write_own_file(path, str(pid).encode())
    return path


def runtime_port_refusal(address: str, supernode_pid: Path) -> str | None:
    """None when every socket listening on ``address``'s port is an open file of the site's
    SuperNode, the process ``pin_supernode_pid`` named in ``supernode_pid``; else why not, in
    one line. Linux ``/proc``: the listening sockets' inodes from ``/proc/net/tcp`` (and
    ``tcp6``), the SuperNode's from ``/proc/<pid>/fd``; what cannot be read refuses."""
    try:
        check_owner_only(supernode_pid, "SuperNode pid file")
        pid = int(supernode_pid.read_text())
    except (DeployError, OSError, ValueError) as err:
        return f"the site's SuperNode is unknown ({err})"
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            raise FileNotFoundError              # the pid is another account's now: ours died
        held = _socket_inodes(pid)
    except FileNotFoundError:
        return f"the site's SuperNode (pid {pid}) is not running"
    except OSError as err:
        return f"cannot read /proc/{pid}/fd ({err.strerror}) to check who listens on {address}"
    try:
        listening = _listening_inodes(address)
    except OSError as err:
        return f"cannot read /proc/net/tcp ({err.strerror}) to check who listens on {address}"
    if not listening:
        return f"the site's SuperNode (pid {pid}) does not listen on {address} (yet)"
    if not listening <= held:
        return (f"another process listens on {address}, not the site's SuperNode (pid {pid}): "
                "another account may be squatting the port")
    return None


def _socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` holds open (``socket:[inode]`` fd links)."""
    fds, held = Path(f"/proc/{pid}/fd"), set()
    for fd in os.listdir(fds):
        try:
            link = os.readlink(fds / fd)
        except FileNotFoundError:               # closed meanwhile
            continue
        if link.startswith("socket:["):
            held.add(int(link[len("socket:["):-1]))
    return held


def _listening_inodes(address: str) -> set[int]:
    """Inodes of the TCP sockets listening where a connection to ``address`` (host:port)
    could land: its own IP or a wildcard (0.0.0.0, ::; an IPv4-mapped ``::ffff:`` address as
    that IPv4), IPv4 and IPv6. Another IP on the same port (127.0.0.2:P beside the
    SuperNode's 127.0.0.1:P) receives none of those connections and does not count; a host
    that is not an IP (a name) counts every listener on the port."""
    host, _, port = address.rpartition(":")
    try:
        target = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        target = None
    inodes = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if table.name == "tcp6" and not table.exists():
            continue                            # a kernel without IPv6
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()               # sl local rem st ... uid timeout inode
            ip_hex, _, port_hex = fields[1].rpartition(":")
            if fields[3] != "0A" or int(port_hex, 16) != int(port):
                continue
            ip = _proc_ip(ip_hex)
            if target is None or ip.is_unspecified or ip == target:
                inodes.add(int(fields[9]))
    return inodes


def _proc_ip(hex_ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A /proc/net/tcp{,6} local address: 32-bit words in host byte order; an IPv4-mapped
    IPv6 address as its IPv4."""
    raw = bytes.fromhex(hex_ip)
    words = b"".join(raw[i:i + 4][::-1] if sys.byteorder == "little" else raw[i:i + 4]
                     for i in range(0, len(raw), 4))
    if len(words) == 4:
        return ipaddress.IPv4Address(words)
    ip = ipaddress.IPv6Address(words)
    return ip.ipv4_mapped or ip


class ForeignRuntimePort(httpx.TransportError):
    """A runtime-API request not sent (``runtime_port_refusal``'s line). A transport error
    Flower does not retry: its retry invoker raises it at once, its task heartbeat counts a
    failed beat."""


class RuntimePortGuard:
    """Flower client interceptor: checks ``runtime_port_refusal`` before each request the
    launcher or runner sends to the runtime port (each retry too), and sends none while it
    refuses (``ForeignRuntimePort``)."""

    def __init__(self, address: str, supernode_pid: Path):
        self.address, self.supernode_pid = address, supernode_pid

    def intercept(self, context, call_next):
        if (why := runtime_port_refusal(self.address, self.supernode_pid)) is not None:
            raise ForeignRuntimePort(why, request=context.request)
        return call_next(context)
