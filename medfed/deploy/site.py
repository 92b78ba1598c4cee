"""The site daemon: a Flower SuperNode with the hospital's node config.

``medfed site`` validates the site's data directory through the ingest step (``load_site``)
and refuses an unusable one, checks its key (present, owner-only, see ``check_auth_key``) and that the coordinator is reachable over TLS
with the hospital's copy of the CA, then runs ``flower-supernode`` with TLS, SuperNode
authentication and the operator's node config (site id, data directory, privacy budget,
``require-secagg``, the layout its data were checked with, its foundation-dir; keys from
``protocol.wire``). Connections are outbound only. A lost
connection is retried with exponential backoff (Flower's retry invoker, bounded by
``--max-retries``/``--max-wait-time``) and every retry is logged under the site id. A site
restarted at once after being killed finds the coordinator still holding its previous session
(Flower refuses the activation of a node that is still online): it says so and restarts its
SuperNode until that session expired, bounded by ``--max-wait-time``; a key that is not
registered stays a one-line fatal error (``medfed.deploy.session`` tells the two apart).

The site executes only code its operator approved: the SuperNode runs with ``--isolation
process`` and the site starts its own task launcher (``medfed.deploy.launcher``) next to it,
which runs each task in ``medfed.deploy.runner``: the run's FAB must be on the site's
allow-list (``--allow-app``/``--allow-list``, see ``medfed.deploy.allowlist``) and the
ClientApp that runs is the site's installed one, never code from the bundle. Only the
launcher may claim those tasks: the SuperNode and the launcher share a secret the site keeps
in its state dir (``medfed.deploy.runtime_auth``), so other accounts on the machine cannot;
and the runner runs only tasks that carry the node config the site gave its SuperNode (kept
in the state dir too), so another account's process on the runtime port cannot choose it;
before that, neither sends that port anything unless the SuperNode the site started (its pid
in the state dir) is the process listening there.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from client.privacy.ledger import own_folder
from protocol import wire

from .allowlist import AllowList
from .egress import EGRESS_LOG
from .launcher import launcher_command
from .preflight import (DeployError, check_auth_key, check_port_free, check_superlink,
                        replaceable_by_others)
from .process import Daemon, flower_env, sleep_unless_stopped
from .runtime_auth import (RUNTIME_SECRET, SUPERNODE_PID, check_runtime_secret,
                           ensure_runtime_secret, pin_node_config, pin_supernode_pid)
from .session import SessionKeeper, key_fingerprint, open_session_left, read_record
from .supernode import FLOWER_IDLE_POLL

log = logging.getLogger("medfed.deploy")

SUPERNODE_FATAL = {
    r"Failed to activate SuperNode|Invalid SuperNode authentication":
        "the coordinator refused this site's key: it is not registered (ask the coordinator "
        "to register sites/<site>/auth.pub)",
    r"SSL/TLS handshake error": "TLS handshake with the SuperLink failed (wrong CA or "
                                "certificate?)",
    r"Giving up reconnection": "lost the connection to the SuperLink and gave up after "
                               "--max-retries/--max-wait-time",
    r"Exit Code: \d+": "the SuperNode exited with an error (see the lines above)",
}
# Flower's refusal of an ActivateNode: a key not registered, or its node still online (session)
ACTIVATION_REFUSED = re.compile(r"Failed to activate SuperNode")
CONNECTED = re.compile(r"SuperNode ID: (\d+)")
STILL_OPEN = ("previous session of this site is still open at the coordinator; retrying until "
              "it expires")


@dataclass(frozen=True)
class SiteSettings:
    """Everything a hospital's operator sets for its site daemon."""
    site_id: str
    data_dir: Path
    superlink: str                     # HOST:PORT of the coordinator
    root_cert: Path                    # the federation CA (verifies the coordinator)
    auth_key: Path                     # this site's private key (OpenSSH EC)
    state_dir: Path                    # Flower home of this site (installed apps, state)
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_max_assumed_sites: int | None = None    # distributed DP: the most honest sites a noise
                                               # share may rely on (None: the job's m)
    require_secagg: bool = False
    privacy_dir: str | None = None
    device: str = "auto"
    torch_threads: int = 1
    decode_workers: int = 1            # DICOM decode processes at ingest
    runtime_port: int = 9094           # local port Flower's ClientApp processes talk to
    poll_interval: float = 0.5         # idle SuperNode's wait between two pulls (Flower: 3 s)
    max_retries: int | None = None     # reconnection attempts after a lost connection
    max_wait_time: float | None = 600.0  # seconds of reconnecting before giving up
    role: str = wire.ROLE_TRAIN        # external: evaluates every global model, never trains
    allow: AllowList = AllowList()     # FAB digests this site runs; empty refuses every run
    layout: str = "brain_mri_4seq"     # the imaging layout preflight reads the data with;
                                       # declared in node config: the layout the site serves
    foundation_dir: str | None = None  # the site's own directory of pretrained encoders
    secagg_peers: Path | None = None   # the federation's registration list (auth.pub lines)
    secagg_min_neighbours: int = 2     # SecAgg+ floors this site enforces itself
    secagg_min_contributors: int = 3
    min_report_size: int | None = None  # min-eval-split-size: smallest count reported (10)
    unlisted_labels: str | None = None  # label names a job's class list may leave out
    max_model_parameters: int | None = None     # larger job models refused (default 2e9)
    max_study_tokens: int | None = None         # backbone tokens of a study (16384)
    max_step_tokens: int | None = None          # ... of a training step (2^20)
    max_step_activations: int | None = None     # tokens x widths and heads a step (2^36)
    max_evaluations_per_run: int | None = None  # evaluate requests a run (1000)
    max_evaluations_per_day: int | None = None  # ... over every run, rolling 24 h (2000)
    max_evaluations_total: int | None = None    # ... over every run, ever (100000)

    @property
    def runtime_secret(self) -> Path:
        """Shared secret of SuperNode and launcher on the runtime port (``runtime_auth``)."""
        return self.state_dir / RUNTIME_SECRET

    @property
    def supernode_pid(self) -> Path:
        """Pid of the SuperNode the site started last (``runtime_auth.pin_supernode_pid``)."""
        return self.state_dir / SUPERNODE_PID


def node_config(s: SiteSettings) -> dict[str, object]:
    """The SuperNode's node config (what the ClientApp reads; the server cannot change it)."""
    if not re.fullmatch(wire.SITE_ID_RE, s.site_id):
        raise DeployError(f"--site-id {s.site_id!r} is not a plain name: use 1-64 letters, "
                          "digits, '.', '_' or '-', starting with a letter or digit")
    config: dict[str, object] = {wire.NODE_SITE_ID: s.site_id,
                                 wire.NODE_DATA_DIR: str(s.data_dir.resolve()),
                                 wire.NODE_DEVICE: s.device,
                                 wire.NODE_TORCH_THREADS: s.torch_threads}
    if s.decode_workers != 1:
        config[wire.NODE_DECODE_WORKERS] = s.decode_workers
    if (s.dp_epsilon is None) != (s.dp_delta is None):
        raise DeployError("set both --dp-epsilon and --dp-delta (the site's privacy budget), "
                          "or neither")
    if s.dp_epsilon is not None:
        config[wire.NODE_DP_EPSILON] = float(s.dp_epsilon)
        config[wire.NODE_DP_DELTA] = float(s.dp_delta)
    if s.dp_max_assumed_sites is not None:
        if int(s.dp_max_assumed_sites) < 1:
            raise DeployError(f"--dp-max-assumed-sites must be >= 1 (1: this site's noise share "
                              f"alone carries the round's noise), got {s.dp_max_assumed_sites}")
        config[wire.NODE_DP_MAX_ASSUMED_SITES] = int(s.dp_max_assumed_sites)
    if s.require_secagg:
        config[wire.NODE_REQUIRE_SECAGG] = True
    if s.privacy_dir:
        config[wire.NODE_PRIVACY_DIR] = s.privacy_dir
    if s.secagg_peers is not None:      # malicious-secure SecAgg+: sign with the site's key
        config[wire.NODE_SECAGG_IDENTITY] = str(s.auth_key.resolve())
        config[wire.NODE_SECAGG_PEERS] = str(s.secagg_peers.resolve())
    if s.secagg_min_neighbours != 2:
        config[wire.NODE_SECAGG_MIN_NEIGHBOURS] = int(s.secagg_min_neighbours)
    if s.secagg_min_contributors != 3:
        config[wire.NODE_SECAGG_MIN_CONTRIBUTORS] = int(s.secagg_min_contributors)
    if s.unlisted_labels:
        config[wire.NODE_UNLISTED_LABELS] = s.unlisted_labels
    for flag, key, value in (("--min-eval-split-size", wire.NODE_MIN_EVAL_SPLIT,
                              s.min_report_size),
                             ("--max-model-parameters", wire.NODE_MAX_MODEL_PARAMETERS,
                              s.max_model_parameters),
                             ("--max-study-tokens", wire.NODE_MAX_STUDY_TOKENS,
                              s.max_study_tokens),
                             ("--max-step-tokens", wire.NODE_MAX_STEP_TOKENS, s.max_step_tokens),
                             ("--max-step-activations", wire.NODE_MAX_STEP_ACTIVATIONS,
                              s.max_step_activations),
                             ("--max-evaluations-per-run", wire.NODE_MAX_EVALUATIONS,
                              s.max_evaluations_per_run),
                             ("--max-evaluations-per-day", wire.NODE_MAX_DAILY_EVALUATIONS,
                              s.max_evaluations_per_day),
                             ("--max-evaluations-total", wire.NODE_MAX_TOTAL_EVALUATIONS,
                              s.max_evaluations_total)):
        if value is not None:
            if int(value) < 1:
                raise DeployError(f"{flag} must be >= 1, got {value}")
            config[key] = int(value)
    if s.role not in wire.ROLES:
        raise DeployError(f"--role must be one of {', '.join(wire.ROLES)}, got {s.role!r}")
    if s.role != wire.ROLE_TRAIN:
        config[wire.NODE_ROLE] = s.role
    # the layout the data were checked with (start-up check): the site declares it and serves
    # jobs of it; a file by its absolute path, the ClientApp does not run in this directory
    is_file = s.layout.endswith((".yaml", ".yml")) or "/" in s.layout
    config[wire.NODE_LAYOUT] = str(Path(s.layout).resolve()) if is_file else s.layout
    if s.foundation_dir:
        config[wire.NODE_FOUNDATION_DIR] = str(Path(s.foundation_dir).resolve())
    return config


def check_secagg_peers(site_id: str, auth_key: Path, peers: Path) -> None:
    """The registration list parses and lists this site with this key (SecAgg+ peers
    verify each other against it; see deploy/README.md, threat model)."""
    from cryptography.hazmat.primitives import serialization

    from protocol.secagg_identity import IdentityError, Registry

    try:
        registry = Registry.parse(peers.read_text())
    except (OSError, IdentityError) as err:
        raise DeployError(f"--secagg-peers {peers}: {err}") from None
    key = serialization.load_ssh_private_key(auth_key.read_bytes(), None)
    listed = registry.keys.get(site_id)
    if listed is None or listed.public_numbers() != key.public_key().public_numbers():
        raise DeployError(f"--secagg-peers {peers} does not list site {site_id!r} with the "
                          "public half of --auth-key; peers would refuse this site's keys")
    log.info("[%s] SecAgg+ registration list: %d sites", site_id, len(registry.keys))


def node_config_arg(config: dict[str, object]) -> str:
    """``--node-config`` string: space-separated TOML ``key=value`` pairs. Flower cuts a
    quoted value at its first inner quote (escapes or not), so a string holding ``"`` (a JSON
    list of label names, a path) goes as a TOML literal string ``'...'``; one holding both
    quote kinds cannot go at all and is refused."""
    def value(k, v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        text = str(v)
        if '"' not in text:
            return json.dumps(text)
        if "'" in text or "\n" in text or "\r" in text:
            raise DeployError(f"node config {k!r} holds both quote kinds (or a line break): "
                              "Flower's --node-config cannot carry it; drop one of them")
        return f"'{text}'"
    return " ".join(f"{k}={value(k, v)}" for k, v in config.items())


def supernode_command(s: SiteSettings) -> list[str]:
    # Flower's SuperNode, with its 3 s idle poll capped (medfed.deploy.supernode)
    cmd = [sys.executable, "-m", "medfed.deploy.supernode",
           "--poll-interval", str(s.poll_interval),
           # it opens only approved FABs' pyproject.toml (medfed.deploy.supernode)
           *s.allow.args(),
           # and audits the CLIENT_APP_CRASHED replies it makes itself (the runner: the rest)
           "--egress-log", str(s.state_dir / EGRESS_LOG),
           "--superlink", s.superlink,
           "--root-certificates", str(s.root_cert),
           "--auth-supernode-private-key", str(s.auth_key),
           "--node-config", node_config_arg(node_config(s)),
           # process: the site starts its own launcher (launcher_command), not Flower's
           "--isolation", "process",
           "--host", "127.0.0.1", "--port", str(s.runtime_port),
           # only a caller holding the site's secret may claim a task on that port
           "--superexec-auth-secret-file", str(s.runtime_secret)]
    if s.max_retries is not None:
        cmd += ["--max-retries", str(s.max_retries)]
    if s.max_wait_time is not None:
        cmd += ["--max-wait-time", str(s.max_wait_time)]
    return cmd


def pseudonym_key(s: SiteSettings) -> bytes:
    """The site's pseudonym secret, where its ClientApp will look for it (the privacy dir),
    created 0600 on the first start; refused when group or others can reach it."""
    from client.data.pseudonyms import site_key
    from client.privacy.policy import state_dir

    return site_key(state_dir(node_config(s), s.data_dir.resolve()))


def check_data_dir(data_dir: Path, key: bytes | None = None,
                   layout: str = "brain_mri_4seq") -> str:
    """Run the ingest step on the site's data through ``layout`` (a shipped name or a YAML
    file); a one-line summary (counts only, no PHI; the fingerprint is the one the site
    reports for jobs of that layout, pseudonyms under ``key``)."""
    from client.data.layout import load_layout
    from client.data.layout_site import load_layout_site
    from client.data.site import load_site

    # each raises SiteDataError / LayoutError with a one-line reason
    if layout == "brain_mri_4seq":          # the default reader, as jobs without a layout use
        data = load_site(data_dir, None, key=key)
    else:
        data = load_layout_site(data_dir, load_layout(layout), None, key=key)
    r = data.report
    return (f"{r.studies} studies, {r.images} images, splits {dict(sorted(r.splits.items()))}, "
            f"skipped {sum(r.skipped.values())} files, fingerprint {data.fingerprint}")


class Site:
    """A site daemon: ``start`` runs the checks and launches the SuperNode; ``supervise``
    restarts it while the coordinator still holds this site's previous session (see
    ``medfed.deploy.session``)."""

    retry_every = 10.0          # seconds between two attempts to rejoin

    def __init__(self, settings: SiteSettings):
        self.settings = settings
        self.daemon: Daemon | None = None
        self.launcher: Daemon | None = None
        self.keeper: SessionKeeper | None = None
        self._refused = False            # this attempt's SuperNode was refused activation
        self._retrying_since: float | None = None
        self.refusal_error: str | None = None   # why retrying to rejoin ended without success

    def preflight(self) -> None:
        s = self.settings
        node_config(s)                        # budget arguments complete
        if not 0 < s.poll_interval <= FLOWER_IDLE_POLL:
            raise DeployError(f"--poll-interval must be in (0, {FLOWER_IDLE_POLL:g}] seconds, "
                              f"got {s.poll_interval:g}")
        check_auth_key(s.auth_key)            # before touching data: a leaked key is worse
        if s.secagg_peers is not None:        # a wrong list fails here, not mid-round
            check_secagg_peers(s.site_id, s.auth_key, s.secagg_peers)
        if s.runtime_secret.exists() or s.runtime_secret.is_symlink():
            check_runtime_secret(s.runtime_secret)   # created by start() when missing
        from client.data.site import dicom_folder
        dicom_folder(s.data_dir)              # a wrong path fails before a key is made in it
        summary = check_data_dir(s.data_dir, pseudonym_key(s), s.layout)
        log.info("[%s] data directory usable: %s", s.site_id, summary)
        self.warn_shared_privacy_dir()
        check_port_free("127.0.0.1", s.runtime_port, "site runtime API")
        check_superlink(s.superlink, s.root_cert)

    def warn_shared_privacy_dir(self) -> None:
        """One loud warning when the privacy dir (ledger, pseudonym key, query log) lies in a
        data dir other accounts can write: whoever writes the PACS export could rename it and
        so restart the site's privacy budget. A warning, not a refusal: existing sites keep
        their ledger in the default ``<data-dir>/.medfed``."""
        from client.privacy.policy import state_dir

        s = self.settings
        folder = state_dir(node_config(s), s.data_dir.resolve())
        if (why := replaceable_by_others(folder, s.data_dir)) is not None:
            log.warning("[%s] WARNING: the site's privacy dir (privacy ledger, pseudonym key, "
                        "query log) lies inside its data directory and %s: whoever can write "
                        "there can rename it and so reset the site's privacy budget. Set "
                        "--privacy-dir to a folder outside the data directory that only this "
                        "account can write, after moving the existing one there",
                        s.site_id, why)

    def start(self) -> None:
        self.preflight()
        s = self.settings
        # the site user's alone (runtime secret, session record, egress log, Flower's state):
        # made 0700, and one made wider before (by hand, an older release) tightened, said
        own_folder(s.state_dir)
        ensure_runtime_secret(s.state_dir)
        # what the runner accepts from the runtime port: exactly the SuperNode's node config
        pinned = pin_node_config(s.state_dir, node_config(s))
        self.keeper = SessionKeeper(s.state_dir, key_fingerprint(s.auth_key))
        self.start_supernode()
        self.launcher = Daemon(launcher_command(f"127.0.0.1:{s.runtime_port}", s.allow,
                                                s.site_id, s.state_dir / EGRESS_LOG,
                                                runtime_secret=s.runtime_secret,
                                                node_config=pinned,
                                                supernode_pid=s.supernode_pid),
                               tag=s.site_id, env=flower_env(s.state_dir))
        self.launcher.start()
        threading.Thread(target=self._watch_launcher, name=f"{s.site_id}-launcher",
                         daemon=True).start()
        approved = ", ".join(d[:12] for d in sorted(s.allow.digests)) or "none (every run "\
                   "is refused)"
        log.info("[%s] site daemon started: SuperLink %s, outbound TLS only; approved apps: "
                 "%s", s.site_id, s.superlink, approved)

    def start_supernode(self) -> None:
        """Start (or restart) the SuperNode and name it to launcher and runner, which talk
        to its runtime port only while this process holds it."""
        s = self.settings
        self._refused = False
        self.daemon = Daemon(supernode_command(s), tag=s.site_id, env=flower_env(s.state_dir),
                             fatal=SUPERNODE_FATAL, on_line=self._note)
        self.daemon.start()
        assert self.daemon.proc is not None
        pin_supernode_pid(s.state_dir, self.daemon.proc.pid)

    def _watch_launcher(self) -> None:
        """Without its launcher the site would accept tasks it never runs: stop it instead."""
        assert self.launcher is not None and self.daemon is not None
        self.launcher.wait()
        if not self.daemon.stopping and self.daemon.running():
            log.error("[%s] the site's task launcher exited; stopping the site",
                      self.settings.site_id)
            self.daemon.stop()

    def stop(self, grace: float = 5.0) -> None:
        for daemon in (self.launcher, self.daemon):
            if daemon is not None:
                daemon.stop(grace=grace)
        if self.keeper is not None:
            self.keeper.stop()

    def _note(self, line: str) -> None:
        if self.daemon is not None and self.daemon.stopping:
            return
        if ACTIVATION_REFUSED.search(line):
            self._refused = True
        elif (m := CONNECTED.search(line)) and self.keeper is not None:
            self.keeper.connected(int(m.group(1)))
            if self._retrying_since is not None:
                log.info("[%s] rejoined the coordinator after %.0f s: the previous session "
                         "expired", self.settings.site_id, time.monotonic() - self._retrying_since)
                self._retrying_since = None
        elif "retrying in" in line:
            log.warning("[%s] connection to the SuperLink lost; retrying with backoff",
                        self.settings.site_id)
        elif "Connection successful after" in line:
            log.info("[%s] reconnected to the SuperLink", self.settings.site_id)

    def rejoin_delay(self) -> float | None:
        """Seconds to wait before the next attempt when the coordinator refused this attempt
        only because the site's previous session is still open; None: no retry (the
        SuperNode's exit stands, and ``refusal_error`` says why when it had retried)."""
        s = self.settings
        if not self._refused or self.keeper is None:
            return None
        left = open_session_left(read_record(s.state_dir), self.keeper.key, time.time())
        if left <= 0:
            if self._retrying_since is not None:
                self.refusal_error = (
                    "the coordinator still refuses this site's key after its previous session "
                    "expired: the key is no longer registered, or another daemon with this "
                    "site's key is connected")
            return None
        now = time.monotonic()
        if self._retrying_since is None:
            self._retrying_since = now
        if s.max_wait_time is not None:
            left = min(left, self._retrying_since + s.max_wait_time - now)
            if left <= 0:
                self.refusal_error = (
                    f"the coordinator still held this site's previous session after "
                    f"--max-wait-time {s.max_wait_time:g} s; restart the site later, or raise "
                    f"--max-wait-time")
                return None
        log.warning("[%s] %s (at most %.0f s more)", s.site_id, STILL_OPEN, left)
        return min(self.retry_every, left)

    def supervise(self) -> int:
        """Block until the site stops; a SuperNode refused only because the previous session
        of this site is still open is restarted until that session expired (bounded by
        ``--max-wait-time``). A failure it recognised becomes a one-line DeployError."""
        if self.daemon is None:
            raise RuntimeError("supervise() before start()")
        try:
            while True:
                code = self.daemon.supervise()
                if self.keeper is not None:
                    self.keeper.disconnected(closed=self.daemon.stopping and code == 0)
                if self.daemon.stopping or (delay := self.rejoin_delay()) is None:
                    break
                if not sleep_unless_stopped(delay):
                    log.info("[%s] stopped while waiting to rejoin", self.settings.site_id)
                    return 0
                self.start_supernode()
            if code and (error := self.refusal_error or self.daemon.error):
                raise DeployError(error)
            return code
        finally:
            if self.launcher is not None:
                self.launcher.stop(grace=5)
            if self.keeper is not None:
                self.keeper.stop()
