"""The coordinator: a Flower SuperLink with TLS, SuperNode authentication and persistent state.

``medfed server`` checks its certificates and port, starts ``flower-superlink`` (TLS on the
one HTTP port that serves Flower's Fleet, Control and Runtime APIs, with every route but the
sites' Fleet API refused to peers outside this machine, Control also open to ``control_from``
when the operator names networks -- see ``control_guard``;
``--enable-supernode-auth``;
its state in a sqlite ``--database`` or in memory (``link_state``, below); runtime dependency
installation disabled so a run can never ``uv sync`` packages over the ones installed here),
waits until ``/health`` answers over TLS, registers the sites' public keys, and supervises it
until SIGTERM.

Link state (``medfed server --link-state``). ``sqlite`` (the default) keeps Flower's state in
``STATE/superlink.db``; ``memory`` is Flower's in-memory state. Traced on a deployed round
(``bench/RESULTS.md``, deploy, session 16): the sqlite state does not fsync per message or
object (WAL, ``synchronous=NORMAL``: 5 syncs of the database in a 3-round run after start-up),
but each Fleet/Runtime request opens several SQLAlchemy sessions: 8-11 ms per object handler
against 0.1 ms in memory, on the critical path of every message. What a restart of the
SuperLink loses with ``memory``: the sites' registrations (public key -> node id, name) -- the
coordinator registers every key of its authorized-keys folder again at each start, so only a
key added later with ``medfed register-site`` and not put in that folder has to be registered
again --, Flower's run list and logs (``flwr ls``/``flwr log``; MedFed's run directory,
checkpoints and MLflow run are files of their own), ``medfed sites``' last-seen times, and the
connected sites themselves: their node ids are gone, and a site's SuperNode stops (tried on
loopback: ``medfed site`` exited ~10 s after the coordinator came back; with sqlite it
reconnected by itself), so each site daemon has to be restarted. What it does not change: a run in progress ends with the SuperLink either way (its ServerApp is the
SuperLink's subprocess and Flower does not restart it; the messages it had queued are of no use
without it), and continues with ``medfed run ... resume=...`` from MedFed's own checkpoint
(``server.resume``) in both cases.
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from client.privacy.ledger import own_folder   # the 0700 rule of a site's state, here too
from medfed.certs import CA_CERT, SERVER_CERT, SERVER_KEY, registered_sites

from .control_guard import LOOPBACK, guard_command, is_loopback_only, parse_networks
from .preflight import DeployError, check_port_free, check_server_certificates, require_file
from .process import Daemon, flower_bin, flower_env, supervised

log = logging.getLogger("medfed.deploy")

CONNECTION = "medfed"          # the SuperLink connection name in FLWR_HOME/config.toml
LINK_STATES = ("sqlite", "memory")
FLOWER_IN_MEMORY = ":flwr-in-memory:"      # flwr.supercore.constant.FLWR_IN_MEMORY_DB_NAME

SUPERLINK_FATAL = {
    r"Address already in use|error while attempting to bind":
        "the coordinator port is already in use",
    r"Exit Code: \d+": "the SuperLink exited with an error (see the lines above)",
}


@dataclass(frozen=True)
class CoordinatorSettings:
    """Where the coordinator listens, which certificates it serves, where it keeps state."""
    certs: Path                        # output of `medfed certs` (server.pem/key, ca.pem)
    state_dir: Path                    # SuperLink database, Flower home, run directories
    host: str = "0.0.0.0"
    port: int = 9093
    authorized_keys: Path | None = None  # folder of <site>/auth.pub; default: certs/sites
    log_file: Path | None = None
    # networks allowed to use the Control API (submit runs, register keys) on the Fleet port
    control_from: tuple[str, ...] = LOOPBACK
    link_state: str = "sqlite"         # Flower's state: "sqlite" (STATE/superlink.db) or "memory"

    def __post_init__(self) -> None:
        if self.link_state not in LINK_STATES:
            raise DeployError(f"--link-state must be one of {', '.join(LINK_STATES)}, got "
                              f"{self.link_state!r}")

    @property
    def control_open(self) -> bool:
        """True when a peer outside this machine may use the Control API."""
        return not is_loopback_only(parse_networks(self.control_from))

    @property
    def own_networks(self) -> tuple[str, ...]:
        """This machine's own addresses: loopback, plus the bind address when it is one (bound
        to 10.0.0.5, the coordinator and its ServerApp reach the SuperLink from 10.0.0.5)."""
        own = () if self.host in ("0.0.0.0", "::", "") else (self.host,)
        return tuple(dict.fromkeys((*LOOPBACK, *own)))

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def flower_database(self) -> str:
        """Flower's ``--database``: the sqlite file, or its in-memory state."""
        return str(self.database) if self.link_state == "sqlite" else FLOWER_IN_MEMORY

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr"

    @property
    def ca(self) -> Path:
        return self.certs / CA_CERT

    @property
    def local_address(self) -> str:
        """Where this machine reaches the SuperLink (127.0.0.1 is in every server cert's SANs)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{host}:{self.port}"


def superlink_command(s: CoordinatorSettings) -> list[str]:
    """The ``flower-superlink`` command line for these settings, behind the port guard."""
    cmd = ["--ssl-ca-certfile", str(s.certs / CA_CERT),
           "--ssl-certfile", str(s.certs / SERVER_CERT),
           "--ssl-keyfile", str(s.certs / SERVER_KEY),
           "--enable-supernode-auth",
           "--database", s.flower_database,
           "--disable-runtime-dependency-installation",
           "--isolation", "subprocess",
           "--host", s.host, "--port", str(s.port)]
    if s.log_file is not None:
        cmd += ["--log-file", str(s.log_file)]
    return guard_command(s.control_from, s.own_networks, cmd)


def write_connection(flwr_home: Path, address: str, root_cert: Path) -> None:
    """Flower CLI connection ``medfed`` (address + CA) as the default in FLWR_HOME: made
    0700, and an existing one others may read (``mkdir -p`` by hand) tightened with a warning
    (``own_folder``) - the Flower CLI keeps its account tokens there (``credentials.yaml``)."""
    own_folder(flwr_home)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "{address}"\nroot-certificates = "{root_cert.resolve()}"\n')


def healthy(address: str, root_cert: Path, timeout: float = 3.0) -> bool:
    """True when the SuperLink answers ``GET /health`` over TLS verified with ``root_cert``."""
    context = ssl.create_default_context(cafile=str(root_cert))
    try:
        with urllib.request.urlopen(f"https://{address}/health", timeout=timeout,
                                    context=context) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return False


def flwr_cli(args: list[str], flwr_home: Path, timeout: float = 60.0) -> dict:
    """Run ``flwr <args> --format json`` and return its JSON answer."""
    proc = subprocess.run([flower_bin("flwr"), *args, "--format", "json"], capture_output=True,
                          text=True, env=flower_env(flwr_home), timeout=timeout)
    try:
        return json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DeployError(f"`flwr {' '.join(args[:2])}` failed: {tail[0]}") from None


def register_site(public_key: Path, site_id: str, flwr_home: Path) -> str:
    """Register one site's public key with the SuperLink; 'registered' or 'already'."""
    answer = flwr_cli(["supernode", "register", str(public_key), CONNECTION, "--name", site_id],
                      flwr_home)
    if answer.get("success"):
        return "registered"
    message = str(answer.get("error-message", ""))
    if "already in use" in message:
        return "already"
    raise DeployError(f"registering site {site_id} failed: {message.splitlines()[-1:]}")


def register_sites(keys: dict[str, Path], flwr_home: Path) -> dict[str, str]:
    return {site: register_site(path, site, flwr_home) for site, path in keys.items()}


@dataclass
class Coordinator:
    """A started coordinator (``start`` returns once it is healthy and sites are registered)."""
    settings: CoordinatorSettings
    daemon: Daemon | None = None
    registered: dict[str, str] = field(default_factory=dict)

    def start(self, *, startup_timeout: float = 60.0) -> None:
        s = self.settings
        if s.control_open:
            log.warning("the Control API is OPEN to %s: anyone there who reaches port %d can "
                        "submit a run (code every site executes) and register a site key; "
                        "Flower's open-source SuperLink has no account authentication",
                        ", ".join(s.control_from), s.port)
        check_server_certificates(s.certs / SERVER_CERT, s.certs / SERVER_KEY, s.ca)
        check_port_free(s.host, s.port, "coordinator")
        keys = registered_sites(s.authorized_keys or s.certs)
        if not keys:
            raise DeployError(f"no site public keys (sites/<site>/auth.pub) under "
                              f"{s.authorized_keys or s.certs}; every site must be registered")
        # registered keys, runs, checkpoints: the coordinator user's alone (as a site's state)
        own_folder(s.state_dir)
        write_connection(s.flwr_home, s.local_address, s.ca)
        self.daemon = Daemon(superlink_command(s), tag="coordinator", env=flower_env(s.flwr_home),
                             fatal=SUPERLINK_FATAL, cwd=s.state_dir)
        self.daemon.start()
        if not self.daemon.wait(lambda: healthy(s.local_address, s.ca), timeout=startup_timeout):
            exited = not self.daemon.running()
            code = self.daemon.stop(grace=5)
            raise DeployError(self.daemon.error or (
                f"the SuperLink exited during startup (exit {code}); see the lines above"
                if exited else f"the SuperLink did not become healthy on {s.local_address} "
                f"within {startup_timeout:g} s"))
        log.info("coordinator up: https://%s (TLS, SuperNode authentication on), state in %s "
                 "(Flower's link state: %s)", s.local_address, s.state_dir,
                 "superlink.db" if s.link_state == "sqlite" else
                 "in memory, sites re-registered at each start")
        self.registered = register_sites(keys, s.flwr_home)
        for site, outcome in sorted(self.registered.items()):
            log.info("site %s: public key %s", site, "registered" if outcome == "registered"
                     else "already registered")

    def supervise(self) -> int:
        return supervised(self.daemon)

    def stop(self) -> int:
        return self.daemon.stop() if self.daemon else 0


def require_ca(path: Path) -> Path:
    return require_file(path, "CA certificate")
