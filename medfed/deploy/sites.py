"""``medfed sites``: the registered sites by name, online or offline, and when last seen.

The names are the ones given at registration (``medfed server`` registers ``sites/<site>/
auth.pub`` and ``medfed register-site --site-id`` as Flower's ``flwr supernode register
--name``); the SuperLink keeps them with each node (``NodeInfo.name``) but ``flwr supernode
list`` does not print them, and it needs a ``FLWR_HOME`` with the connection in it. This asks the
Control API directly (``ListNodes``, over TLS verified with the federation's CA), so it runs
where ``medfed run`` runs: on the coordinator's machine (the Control API answers loopback only).

Last seen: for an online site, its last heartbeat (the SuperLink keeps a node online
``HEARTBEAT_PATIENCE`` heartbeat intervals after it); for an offline one, when it went offline
(a graceful stop, or the moment its heartbeat expired).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .preflight import DeployError, check_superlink, require_file

SHOWN = ("online", "offline", "registered")     # Flower's statuses; "unregistered" is hidden


@dataclass(frozen=True)
class SiteStatus:
    """One registered site as the coordinator sees it."""
    name: str                    # the name it was registered with ("" when registered without)
    node_id: int
    status: str                  # online | offline | registered (never connected)
    last_seen: datetime | None   # None: never connected

    def to_dict(self) -> dict[str, object]:
        return {"site": self.name, "node-id": str(self.node_id), "status": self.status,
                "last-seen": self.last_seen.isoformat() if self.last_seen else None}


def _when(text: str) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def site_statuses(nodes: Sequence) -> list[SiteStatus]:
    """``SiteStatus`` of each registered node (Flower ``NodeInfo`` messages), by name."""
    from flwr.common.constant import HEARTBEAT_PATIENCE

    sites = []
    for node in nodes:
        if node.status not in SHOWN:
            continue
        if node.status == "online" and node.HasField("online_until"):
            seen = datetime.fromtimestamp(
                node.online_until - HEARTBEAT_PATIENCE * node.heartbeat_interval, timezone.utc)
        elif node.status == "offline":
            seen = _when(node.last_deactivated_at)
        else:
            seen = None
        sites.append(SiteStatus(name=node.name if node.HasField("name") else "",
                                node_id=node.node_id, status=node.status, last_seen=seen))
    return sorted(sites, key=lambda s: (s.name == "", s.name, s.node_id))


def _ago(seen: datetime | None, now: datetime) -> str:
    if seen is None:
        return "never connected"
    seconds = max(0, int((now - seen).total_seconds()))
    span = (f"{seconds} s" if seconds < 120 else f"{seconds // 60} min" if seconds < 7200
            else f"{seconds // 3600} h")
    return f"{seen.astimezone(timezone.utc):%Y-%m-%d %H:%M:%S} UTC ({span} ago)"


def format_sites(sites: Sequence[SiteStatus], now: datetime) -> str:
    """A plain table: site, status, last seen, node id."""
    rows = [("site", "status", "last seen", "node id")]
    rows += [(s.name or "(no name)", s.status, _ago(s.last_seen, now), str(s.node_id))
             for s in sites]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join([*(r[i].ljust(widths[i]) for i in range(3)), r[3]]) for r in rows]
    online = sum(s.status == "online" for s in sites)
    return "\n".join([*lines, f"{online} of {len(sites)} registered sites online"])


def list_nodes(superlink: str, root_cert: Path, *, timeout: float = 10.0):
    """(nodes, the coordinator's now) from the Control API's ``ListNodes``."""
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    check_superlink(superlink, root_cert, timeout=timeout)
    client = ControlHttpClient.from_server_address(
        server_address=superlink, insecure=False,
        root_certificates=require_file(root_cert, "root certificate").read_bytes(),
        interceptors=[CliClientHttpInterceptor(),
                      RuntimeVersionHttpInterceptor(component_name="flwr CLI")])
    try:
        answer = client.ListNodes(ListNodesRequest())
    except Exception as err:  # noqa: BLE001 - httpx/Flower errors: one line
        status = getattr(getattr(err, "response", None), "status_code", None)
        hint = (" (the Control API answers only on the coordinator's machine: run `medfed "
                "sites` there against 127.0.0.1)" if status == 403 else "")
        raise DeployError(f"listing the sites at {superlink} failed: "
                          f"{status or type(err).__name__}{hint}") from None
    finally:
        client.close()
    return list(answer.nodes_info), datetime.fromisoformat(answer.now)


def show_sites(superlink: str, root_cert: Path, *, as_json: bool = False, echo=print) -> int:
    """Print the registered sites (a table, or JSON with ``as_json``)."""
    nodes, now = list_nodes(superlink, root_cert)
    sites = site_statuses(nodes)
    if as_json:
        echo(json.dumps({"now": now.isoformat(), "sites": [s.to_dict() for s in sites]}))
    else:
        echo(format_sites(sites, now) if sites else "no site is registered")
    return 0
