"""The coordinator's one port: the Fleet API for the sites, everything else for this machine.

Flower 1.41's SuperLink serves its Fleet API (sites), Control API (submit runs, register site
keys) and Runtime API (the ServerApp's: claim a run's task, message every site as the
coordinator, read every reply) from **one** HTTP(S) port; ``--control-api-address`` is
deprecated and no longer binds anything, the open-source SuperLink has no account
authentication on Control, and with ``--isolation subprocess`` it does not check the SuperExec
secret on a Runtime task claim: whoever reaches the port and claims a run's ServerApp task
first (Flower's own claimer asks once a second) holds its token. A bind address cannot separate
the APIs, so MedFed starts the SuperLink through this module, which adds one ASGI middleware in
front of Flower's app with one rule (``ControlGuard.networks_for``):

- the Fleet routes a site's SuperNode calls (``FLEET_PATHS``, Flower's ``FleetHttpClient``)
  and ``/health`` (``medfed health``, load balancers; it says only whether the link is up)
  answer anyone; SuperNode authentication guards the Fleet API itself;
- ``/v1/control`` and under answer the coordinator's own addresses and the networks the
  operator opened (``medfed server --control-address``);
- everything else (``/v1/runtime``, ``/docs``, ``/openapi.json``, any route a Flower upgrade
  adds) answers the coordinator's own addresses only: loopback, and the bind address when it
  is one (the SuperLink's ServerApp process connects there).

Any other request is answered 403 before Flower sees it. The peer is the TCP peer uvicorn
reports (``scope["client"]``). Uvicorn rewrites it from ``X-Forwarded-For`` only when the TCP
peer is itself in ``forwarded_allow_ips`` (loopback by default), so a remote client cannot
claim to be local with a header.

Run as ``python -m medfed.deploy.control_guard --control-from NETS --own NETS --
<flower-superlink args>``.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Awaitable, Callable, Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

CONTROL_PREFIX = "/v1/control"
# every route flwr.supernode.fleet_http_client.FleetHttpClient (Flower 1.41) calls: what a site
# needs; test_control_port checks the list against Flower's client
FLEET_PATHS = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received"))
PUBLIC_PATHS = FLEET_PATHS | {"/health"}
LOOPBACK = ("127.0.0.0/8", "::1/128")
FLAG = "--control-from"
OWN_FLAG = "--own"


def parse_networks(spec: str | Iterable[str]) -> tuple[IPNetwork, ...]:
    """``"127.0.0.1,10.0.0.0/8"`` (or a list of such) -> networks; raises ValueError on junk."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    networks = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"--control-address {item!r} is not an IP address or CIDR block "
                             "(e.g. 127.0.0.1, 10.20.0.0/16)") from None
    if not networks:
        raise ValueError("--control-address names no address; leave it out to keep the "
                         "Control API on loopback")
    return tuple(networks)


def is_loopback_only(networks: Iterable[IPNetwork]) -> bool:
    """True when every network lies inside loopback (nothing outside this machine allowed)."""
    return all(net.subnet_of(ipaddress.ip_network(LOOPBACK[0 if net.version == 4 else 1]))
               for net in networks)


def _peer_allowed(client: tuple[str, int] | list | None,
                  networks: tuple[IPNetwork, ...]) -> bool:
    if not client:
        return False                       # unknown peer (e.g. a unix socket): refuse
    try:
        ip = ipaddress.ip_address(str(client[0]).split("%", 1)[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:   # ::ffff:10.0.0.5 is 10.0.0.5
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)


def is_control_path(path: str) -> bool:
    """``/v1/control`` and everything under it, however many leading slashes."""
    path = "/" + path.lstrip("/")
    return path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/")


Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class ControlGuard:
    """ASGI middleware: the Fleet routes for anyone, Control for ``allowed`` and ``own``
    peers, every other route for ``own`` peers only; 403 otherwise.

    Parameters
    ----------
    app : ASGI application
        Flower's SuperLink app.
    allowed : tuple of ip_network
        Networks whose peers may use the Control API (besides ``own``).
    own : tuple of ip_network
        The coordinator's own addresses: loopback, and its bind address when it is one.
    """

    def __init__(self, app, allowed: tuple[IPNetwork, ...] = parse_networks(LOOPBACK),
                 own: tuple[IPNetwork, ...] = parse_networks(LOOPBACK)):
        self.app = app
        self.own = tuple(own)
        self.allowed = tuple(dict.fromkeys((*allowed, *self.own)))
        self.refused = 0                   # counted, never silent

    def networks_for(self, path: str) -> tuple[IPNetwork, ...] | None:
        """The one rule: who may call ``path`` (``None``: anyone). An exact match only, so a
        variant spelling of a public route (``//v1/fleet/...``) is not public."""
        if path in PUBLIC_PATHS:
            return None
        return self.allowed if is_control_path(path) else self.own

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") in ("http", "websocket"):
            networks = self.networks_for(scope.get("path", ""))
            if networks is not None and not _peer_allowed(scope.get("client"), networks):
                self.refused += 1
                await self._refuse(scope, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: Scope, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"detail": "this coordinator serves only the Fleet API to other "
                                     "machines; the Control and Runtime APIs accept requests "
                                     "from its own machine only (medfed server "
                                     "--control-address)"}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class RequestTimer:
    """ASGI middleware, only while hop tracing is on (``protocol.hoptrace``): one trace line
    per Fleet/Runtime request, its route and how long the SuperLink took (no body, no peer)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        import time

        from protocol.hoptrace import hop

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            hop("superlink.request", route=scope.get("path", "")[-60:],
                ms=round((time.perf_counter() - start) * 1000, 2))


def guard_command(allowed: Iterable[str], own: Iterable[str],
                  flower_args: list[str]) -> list[str]:
    """Command line that starts ``flower-superlink`` with ``flower_args`` behind the guard:
    Control from ``allowed`` and ``own``, the rest but the Fleet API from ``own`` only."""
    return [sys.executable, "-m", __name__, FLAG, ",".join(allowed), OWN_FLAG, ",".join(own),
            "--", *flower_args]


def main(argv: list[str] | None = None) -> int:
    """Install the guard into Flower's app factory, then run Flower's own SuperLink CLI."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 5 or argv[0] != FLAG or argv[2] != OWN_FLAG or argv[4] != "--":
        raise SystemExit(f"usage: python -m {__name__} {FLAG} NETS {OWN_FLAG} NETS -- "
                         "FLOWER_SUPERLINK_ARGS")
    allowed, own = parse_networks(argv[1]), parse_networks(argv[3])
    from flwr.common.logger import log
    from flwr.superlink import main as flower_app
    from flwr.superlink.cli import flower_superlink

    from protocol.hoptrace import enabled as tracing

    create_app = flower_app.create_app

    def guarded_create_app(*args, **kwargs):
        app = create_app(*args, **kwargs)
        # added last = outermost: runs before Flower's own Control middlewares
        app.add_middleware(ControlGuard, allowed=allowed, own=own)
        if tracing():
            app.add_middleware(RequestTimer)
        return app

    # Flower imports create_app from this module at call time (flower_superlink.py), so
    # replacing the attribute is enough; a Flower upgrade that moves it fails the e2e test.
    flower_app.create_app = guarded_create_app
    log(20, "MedFed: Fleet API open; Control API only from %s; Runtime API and the rest "
        "only from %s", ", ".join(str(n) for n in dict.fromkeys((*allowed, *own))),
        ", ".join(str(n) for n in own))
    sys.argv = ["flower-superlink", *argv[5:]]
    flower_superlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
