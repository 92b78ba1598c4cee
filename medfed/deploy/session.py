"""A site's own record of its session at the coordinator: tells a restart from a refused key.

Flower 1.41's SuperLink answers a SuperNode's ``ActivateNode`` with one error for two causes
(``FLEET_NODE_ACTIVATION_FAILED``, ``[code: 2004] Failed to activate SuperNode.``; the SuperNode
then exits with code 305, see ``flwr.superlink.servicer.fleet.fleet_handlers.activate_node``):

- the site's public key is not registered (``get_node_id_by_public_key`` finds nothing), or
- the node of that key is still ONLINE (``SqlLinkState.activate_node`` activates only REGISTERED
  or OFFLINE nodes): a previous session whose SuperNode never sent ``DeactivateNode`` -- it was
  killed with SIGKILL, ran out of memory, lost power -- and whose heartbeat has not expired yet.
  The SuperLink keeps a node online until ``HEARTBEAT_PATIENCE`` x its heartbeat interval
  (2 x 30 s) after the last heartbeat it received.

The reason travels only in the SuperLink's own log, and a site cannot ask the coordinator (the
Control API is the coordinator's). So the site keeps a record of its own: ``session.json`` in its
state dir says, while its SuperNode is connected, which key it connected with and when it was
last alive (rewritten every ``REFRESH`` seconds), and that it closed the session when it stopped
gracefully (Flower's SuperNode deactivates itself on SIGTERM). A refusal while that record says a
session of the same key may still be open is a restart: the site says so and retries until that
session must have expired (``open_session_left``). Any other refusal is the real "not registered".
The record holds a key fingerprint, a node id and times: nothing about patients.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from client.privacy.ledger import write_own_file

log = logging.getLogger("medfed.deploy")

SESSION_FILE = "session.json"
REFRESH = 10.0              # seconds between two "still alive" rewrites of the record
MARGIN = 10.0               # request latency and clock steps on top of Flower's expiry


def session_expiry() -> float:
    """Seconds after a record's last ``alive`` by which the SuperLink has surely let the session
    expire: the SuperNode's last heartbeat was at most ``REFRESH`` s after it, and the SuperLink
    keeps a node online ``HEARTBEAT_PATIENCE`` x ``HEARTBEAT_DEFAULT_INTERVAL`` s after that."""
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    return REFRESH + HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + MARGIN


def key_fingerprint(auth_key: Path) -> str:
    """SHA-256 of the site's public key (OpenSSH form), derived from its private key."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(auth_key.read_bytes(), None)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    return hashlib.sha256(public).hexdigest()


@dataclass(frozen=True)
class SessionRecord:
    """What the site remembers of its last session at the coordinator."""
    key: str                 # fingerprint of the public key it connected with
    node_id: int             # the SuperLink's node id of that key
    alive: float             # wall-clock time (time.time()) the session was last known alive
    closed: bool = False     # the SuperNode stopped gracefully (it deactivated the session)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SessionRecord:
        d = json.loads(text)
        return cls(key=str(d["key"]), node_id=int(d["node_id"]), alive=float(d["alive"]),
                   closed=bool(d.get("closed", False)))


def read_record(state_dir: Path) -> SessionRecord | None:
    """The site's session record; None when there is none or it cannot be read."""
    try:
        return SessionRecord.from_json((state_dir / SESSION_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("unreadable %s in the site's state dir: ignored", SESSION_FILE)
        return None


def write_record(state_dir: Path, record: SessionRecord) -> None:
    """Replace the record atomically (owner-only)."""
    write_own_file(state_dir / SESSION_FILE, record.to_json().encode())


def open_session_left(record: SessionRecord | None, key: str, now: float) -> float:
    """Seconds until a previous session of ``key`` has surely expired at the coordinator;
    0 when no session of that key can still be open (none recorded, another key, closed
    gracefully, or expired)."""
    if record is None or record.key != key or record.closed:
        return 0.0
    return max(0.0, record.alive + session_expiry() - now)


class SessionKeeper:
    """Keeps ``session.json`` current while the site's SuperNode is connected.

    ``connected`` when the SuperNode reports its node id, ``disconnected`` when it exits
    (``closed`` when it stopped gracefully); a thread rewrites ``alive`` every ``REFRESH`` s
    in between.
    """

    def __init__(self, state_dir: Path, key: str, refresh: float = REFRESH):
        self.state_dir, self.key, self.refresh = state_dir, key, refresh
        self._record: SessionRecord | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="session-keeper", daemon=True)
        self._thread.start()

    def connected(self, node_id: int) -> None:
        self._write(SessionRecord(key=self.key, node_id=node_id, alive=time.time()))

    def disconnected(self, *, closed: bool) -> None:
        with self._lock:
            record, self._record = self._record, None
        if record is not None:
            write_record(self.state_dir, replace(record, alive=time.time(), closed=closed))

    def stop(self) -> None:
        self._stop.set()

    def _write(self, record: SessionRecord) -> None:
        with self._lock:
            self._record = record
            write_record(self.state_dir, record)

    def _keep(self) -> None:
        while not self._stop.wait(self.refresh):
            with self._lock:
                if self._record is not None:
                    self._record = replace(self._record, alive=time.time())
                    write_record(self.state_dir, self._record)
