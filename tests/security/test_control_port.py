"""Attacker: anyone on the network who reaches the coordinator's port (the Fleet port sites
connect to). Flower 1.41 serves the Control API (submit a run = code every site executes,
register a site key) on that same port without account authentication; MedFed's guard must
refuse Control requests from every peer outside loopback unless the operator opened it."""

from __future__ import annotations

import importlib
import inspect

import pytest
from starlette.testclient import TestClient

from medfed.cli import build_parser
from medfed.deploy import control_guard
from medfed.deploy.control_guard import ControlGuard, parse_networks
from medfed.deploy.coordinator import CoordinatorSettings, superlink_command

REMOTE = ("10.0.0.5", 40000)            # a host on the hospital/coordinator network
CONTROL = "/v1/control/list-runs"
PROTOBUF = {"content-type": "application/protobuf"}


@pytest.fixture(scope="module")
def flower_app():
    """Flower's real SuperLink app (in-memory state, no server started) behind the guard."""
    from flwr.superlink.main import create_app

    app = create_app()
    app.add_middleware(ControlGuard, allowed=parse_networks(control_guard.LOOPBACK))
    return app


def _post(app, client, path=CONTROL, headers=None):
    return TestClient(app, client=client, raise_server_exceptions=False).post(
        path, content=b"", headers={**PROTOBUF, **(headers or {})})


def test_remote_peer_cannot_use_the_control_api(flower_app):
    answer = _post(flower_app, REMOTE)
    assert answer.status_code == 403 and "own machine only" in answer.text
    # the operator, on the coordinator itself, still can (medfed run, register-site)
    assert _post(flower_app, ("127.0.0.1", 40000)).status_code == 200


@pytest.mark.parametrize("path", ["/v1/control", "/v1/control/start-run",
                                  "/v1/control/register-supernode"])
def test_path_variants_are_refused(flower_app, path):
    assert _post(flower_app, REMOTE, path).status_code == 403


def test_doubled_slashes_still_count_as_control():
    # an HTTP client would read //v1/... as a host name, so this is checked on the ASGI path
    assert control_guard.is_control_path("//v1/control/start-run")
    assert not control_guard.is_control_path("/v1/controller")


@pytest.mark.parametrize("peer", ["::ffff:10.0.0.5", "fe80::1%eth0", "not-an-ip"])
def test_ipv6_mapped_scoped_and_unknown_peers_are_refused(flower_app, peer):
    assert _post(flower_app, (peer, 1)).status_code == 403


def test_a_forwarded_for_header_does_not_make_a_remote_peer_local(flower_app):
    spoof = {"x-forwarded-for": "127.0.0.1", "x-real-ip": "127.0.0.1",
             "forwarded": "for=127.0.0.1"}
    assert _post(flower_app, REMOTE, headers=spoof).status_code == 403


def test_fleet_requests_pass_the_guard(flower_app):
    answer = _post(flower_app, REMOTE, "/v1/fleet/register-node")
    assert "own machine only" not in answer.text        # Flower answered, not the guard


def test_an_opened_network_is_allowed_and_others_still_refused():
    seen = []

    async def inner(scope, receive, send):
        seen.append(scope["client"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = ControlGuard(inner, parse_networks("10.0.0.0/24"))
    assert _post(app, REMOTE).status_code == 200
    assert _post(app, ("10.0.1.5", 1)).status_code == 403
    assert seen == [REMOTE] and app.refused == 1


def test_server_starts_flower_behind_the_guard_on_loopback_by_default(tmp_path):
    args = build_parser().parse_args(["server", "--certs", str(tmp_path), "--state-dir",
                                      str(tmp_path / "s")])
    assert args.control_address is None
    cmd = superlink_command(CoordinatorSettings(certs=tmp_path, state_dir=tmp_path / "s"))
    assert cmd[1:3] == ["-m", "medfed.deploy.control_guard"]
    assert parse_networks(cmd[cmd.index("--control-from") + 1]) == parse_networks(
        ["127.0.0.0/8", "::1/128"])
    assert "--enable-supernode-auth" in cmd[cmd.index("--"):]


def test_guard_main_installs_the_guard_into_flowers_app_factory(monkeypatch):
    import flwr.superlink.cli as flower_cli
    import flwr.superlink.main as flower_main

    built = []
    monkeypatch.setattr(flower_main, "create_app", flower_main.create_app)   # restored after
    monkeypatch.setattr(flower_cli, "flower_superlink",
                        lambda: built.append(flower_main.create_app()))
    control_guard.main(["--control-from", "127.0.0.1", "--", "--port", "1"])
    assert _post(built[0], REMOTE).status_code == 403
    # Flower 1.41 imports create_app from flwr.superlink.main when it starts the HTTP API:
    # the attribute the guard replaces. A Flower upgrade that moves it must fail here.
    module = importlib.import_module("flwr.superlink.cli.flower_superlink")
    source = inspect.getsource(module._run_superlink_http_api)
    assert "from flwr.superlink.main import" in source and "create_app" in source


def test_opening_the_control_api_is_loud_and_junk_is_refused(tmp_path, caplog):
    from medfed.deploy.coordinator import Coordinator
    from medfed.deploy.preflight import DeployError

    opened = CoordinatorSettings(certs=tmp_path, state_dir=tmp_path / "s",
                                 control_from=("10.20.0.0/24",))
    assert opened.control_open
    cmd = superlink_command(opened)
    assert cmd[cmd.index("--control-from") + 1] == "10.20.0.0/24"
    with caplog.at_level("WARNING", logger="medfed.deploy"), pytest.raises(DeployError):
        Coordinator(opened).start()                 # no certificates here: stops after warning
    assert "Control API is OPEN to 10.20.0.0/24" in caplog.text
    assert not CoordinatorSettings(certs=tmp_path, state_dir=tmp_path).control_open
    with pytest.raises(ValueError, match="--control-address 'coordinator' is not an IP"):
        CoordinatorSettings(certs=tmp_path, state_dir=tmp_path,
                            control_from=("coordinator",)).control_open


def test_a_specific_bind_address_may_reach_its_own_control_api(tmp_path):
    """Bound to one address, the coordinator registers sites through that address."""
    bound = CoordinatorSettings(certs=tmp_path, state_dir=tmp_path, host="10.0.0.5")
    cmd = superlink_command(bound)
    allowed = parse_networks(cmd[cmd.index("--control-from") + 1])
    assert any(n.overlaps(parse_networks("10.0.0.5")[0]) for n in allowed)
    assert not bound.control_open                  # only this machine's own addresses
    app = ControlGuard(None, allowed)
    assert control_guard._peer_allowed(("10.0.0.5", 1), app.allowed)
    assert not control_guard._peer_allowed(("10.0.0.6", 1), app.allowed)
