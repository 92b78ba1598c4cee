"""Attacker: anyone on the network who reaches the coordinator's port (the Fleet port sites
connect to). Flower 1.41 serves the Control API (submit a run = code every site executes,
register a site key) and the Runtime API (claim a run's ServerApp task, then message every site
as the coordinator) on that same port, without account authentication and, with
``--isolation subprocess``, without checking the SuperExec secret on a task claim. MedFed's
guard must refuse every route but the sites' Fleet API (and ``/health``) from every peer outside
the coordinator's own addresses, Control also open to networks the operator named."""

from __future__ import annotations

import importlib
import inspect
import re

import pytest
from starlette.testclient import TestClient

from medfed.cli import build_parser
from medfed.deploy import control_guard
from medfed.deploy.control_guard import ControlGuard, parse_networks
from medfed.deploy.coordinator import CoordinatorSettings, superlink_command

REMOTE = ("10.0.0.5", 40000)            # a host on the hospital/coordinator network
LOCAL = ("127.0.0.1", 40000)
CONTROL = "/v1/control/list-runs"
ACQUIRE = "/v1/runtime/acquire-task"
PROTOBUF = {"content-type": "application/protobuf"}


@pytest.fixture(scope="module")
def flower_app():
    """Flower's real SuperLink app (in-memory state, no server started) behind the guard."""
    from flwr.superlink.main import create_app

    app = create_app()
    app.add_middleware(ControlGuard, allowed=parse_networks(control_guard.LOOPBACK))
    return app


def _post(app, client, path=CONTROL, headers=None, content=b""):
    return TestClient(app, client=client, raise_server_exceptions=False).post(
        path, content=content, headers={**PROTOBUF, **(headers or {})})


@pytest.fixture
def pending_run():
    """What `medfed run` leaves: a run whose ServerApp task waits for Flower's claimer."""
    from flwr.superlink.main import create_app
    from flwr.supercore.constant import NOOP_FEDERATION_ID, TaskType

    app = create_app()
    app.add_middleware(ControlGuard, allowed=parse_networks(control_guard.LOOPBACK))
    run_id = app.state.linkstate_factory.state().create_run(
        None, None, "ab" * 32, {}, NOOP_FEDERATION_ID, None, None,
        primary_task_type=TaskType.SERVER_APP)
    return app, run_id


def _acquire(app, peer):
    """Claim the ServerApp task as Flower's SuperExec does; (status, answer or None)."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, AcquireTaskResponse
    from flwr.supercore.constant import TaskType
    from flwr.supercore.runtime_version_compatibility import RuntimeVersionMetadata

    version = dict(RuntimeVersionMetadata.from_local_component("SuperExec").as_metadata())
    answer = _post(app, peer, ACQUIRE, version, AcquireTaskRequest(
        supported_task_types=[TaskType.SERVER_APP]).SerializeToString())
    return answer.status_code, (AcquireTaskResponse.FromString(answer.content)
                                if answer.status_code == 200 else answer.text)


def test_remote_peer_cannot_use_the_control_api(flower_app):
    answer = _post(flower_app, REMOTE)
    assert answer.status_code == 403 and "own machine only" in answer.text
    # the operator, on the coordinator itself, still can (medfed run, register-site)
    assert _post(flower_app, LOCAL).status_code == 200


def test_remote_peer_cannot_claim_a_runs_serverapp_task(pending_run):
    """The review's attack: poll acquire-task from outside and win the run's ServerApp task
    (its token messages every site as the coordinator) before Flower's claimer does."""
    app, run_id = pending_run
    status, text = _acquire(app, REMOTE)
    assert status == 403 and "own machine only" in text
    # the coordinator's own SuperExec, on loopback, still gets the task the attacker did not
    status, answer = _acquire(app, LOCAL)
    assert status == 200 and answer.task.run_id == run_id and answer.token


@pytest.mark.parametrize("path", [
    "/v1/runtime/get-nodes", "/v1/runtime/pull-task-input", "/v1/runtime/push-messages",
    "/v1/runtime/responses", "/v1/runtime", "/docs", "/docs/oauth2-redirect", "/openapi.json",
    "/redoc", "/", "/v1/fleet", "/v1/fleet/pull-messages/", "/v1/fleetx/pull-messages",
    "/v1/something-flower-adds-later"])
def test_every_route_but_the_sites_fleet_api_is_refused_to_a_remote_peer(flower_app, path):
    client = TestClient(flower_app, client=REMOTE, raise_server_exceptions=False)
    for answer in (client.get(path), client.post(path, content=b"", headers=PROTOBUF)):
        assert answer.status_code == 403 and "own machine only" in answer.text
    assert client.get("/openapi.json", headers={"x-forwarded-for": "127.0.0.1"}
                      ).status_code == 403
    # from the coordinator itself the guard lets them through to Flower
    assert "own machine only" not in _post(flower_app, LOCAL, path).text


def test_the_guards_fleet_list_is_what_a_flower_site_calls():
    """A Flower upgrade that adds a Fleet route the SuperNode needs must fail here, not at
    the sites; a path on the list that Flower's SuperLink does not serve as well."""
    from fastapi.routing import iter_route_contexts
    from flwr.superlink.main import create_app
    from flwr.supernode import fleet_http_client

    called = set(re.findall(r'path="(/v1/fleet/[^"]+)"', inspect.getsource(fleet_http_client)))
    assert called == control_guard.FLEET_PATHS
    served = {getattr(c.route, "path", None) for c in iter_route_contexts(create_app().routes)}
    assert control_guard.PUBLIC_PATHS <= served


def test_a_remote_site_still_connects_and_polls(pending_run):
    """The sites' side: a SuperNode's own Fleet client, from a remote address, registers,
    activates, heartbeats and pulls; every other Fleet route reaches Flower, not the guard."""
    from flwr.proto.fleet_pb2 import (ActivateNodeRequest, PullMessagesRequest,
                                      RegisterNodeFleetRequest)
    from flwr.proto.heartbeat_pb2 import SendNodeHeartbeatRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
    from flwr.supercore.primitives.asymmetric import generate_key_pairs, public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    app, _ = pending_run
    private, public = generate_key_pairs()
    site = FleetHttpClient("http://testserver", interceptors=[
        RuntimeVersionHttpInterceptor(component_name="SuperNode"),
        NodeAuthHttpInterceptor(private, public)])
    site._client = TestClient(app, client=REMOTE, raise_server_exceptions=False)
    key = public_key_to_bytes(public)
    site.RegisterNode(RegisterNodeFleetRequest(public_key=key))
    node = Node(node_id=site.ActivateNode(ActivateNodeRequest(
        public_key=key, heartbeat_interval=30)).node_id)
    assert site.SendNodeHeartbeat(SendNodeHeartbeatRequest(node=node,
                                                          heartbeat_interval=30)).success
    assert not site.PullMessages(PullMessagesRequest(node=node)).messages_list
    for path in sorted(control_guard.PUBLIC_PATHS):
        assert "own machine only" not in _post(app, REMOTE, path).text, path
    assert TestClient(app, client=REMOTE).get("/health").status_code == 200


@pytest.mark.parametrize("path", ["/v1/control", "/v1/control/start-run",
                                  "/v1/control/register-supernode"])
def test_path_variants_are_refused(flower_app, path):
    assert _post(flower_app, REMOTE, path).status_code == 403


def test_doubled_slashes_still_count_as_control():
    # an HTTP client would read //v1/... as a host name, so this is checked on the ASGI path
    assert control_guard.is_control_path("//v1/control/start-run")
    assert not control_guard.is_control_path("/v1/controller")
    guard = ControlGuard(None)
    assert guard.networks_for("//v1/fleet/pull-messages") == guard.own      # not public
    assert guard.networks_for("/v1/fleet/pull-messages") is None


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
    loopback = parse_networks(["127.0.0.0/8", "::1/128"])
    assert parse_networks(cmd[cmd.index("--control-from") + 1]) == loopback
    assert parse_networks(cmd[cmd.index("--own") + 1]) == loopback
    assert "--enable-supernode-auth" in cmd[cmd.index("--"):]


def test_guard_main_installs_the_guard_into_flowers_app_factory(monkeypatch):
    import flwr.superlink.cli as flower_cli
    import flwr.superlink.main as flower_main

    built = []
    monkeypatch.setattr(flower_main, "create_app", flower_main.create_app)   # restored after
    monkeypatch.setattr(flower_cli, "flower_superlink",
                        lambda: built.append(flower_main.create_app()))
    control_guard.main(["--control-from", "127.0.0.1", "--own", "127.0.0.1", "--",
                        "--port", "1"])
    assert _post(built[0], REMOTE).status_code == 403
    assert _post(built[0], REMOTE, ACQUIRE).status_code == 403
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


def test_an_opened_control_network_gets_control_only_and_loopback_keeps_it(tmp_path):
    """--control-address opens Control, never the Runtime API (the ServerApp's task token);
    the coordinator's own machine keeps Control (it registers sites on 127.0.0.1)."""
    cmd = superlink_command(CoordinatorSettings(certs=tmp_path, state_dir=tmp_path,
                                                control_from=("10.20.0.0/24",)))
    guard = ControlGuard(None, parse_networks(cmd[cmd.index("--control-from") + 1]),
                         parse_networks(cmd[cmd.index("--own") + 1]))
    opened, local = ("10.20.0.7", 1), ("127.0.0.1", 1)
    assert control_guard._peer_allowed(opened, guard.networks_for(CONTROL))
    assert not control_guard._peer_allowed(opened, guard.networks_for(ACQUIRE))
    assert control_guard._peer_allowed(local, guard.networks_for(CONTROL))
    assert control_guard._peer_allowed(local, guard.networks_for(ACQUIRE))


def test_a_specific_bind_address_may_reach_its_own_control_api(tmp_path):
    """Bound to one address, the coordinator registers sites, and its ServerApp claims its
    task, through that address (Flower's SuperExec connects to the bind address)."""
    bound = CoordinatorSettings(certs=tmp_path, state_dir=tmp_path, host="10.0.0.5")
    cmd = superlink_command(bound)
    own = parse_networks(cmd[cmd.index("--own") + 1])
    assert any(n.overlaps(parse_networks("10.0.0.5")[0]) for n in own)
    assert not bound.control_open                  # only this machine's own addresses
    guard = ControlGuard(None, parse_networks(cmd[cmd.index("--control-from") + 1]), own)
    for path in (CONTROL, ACQUIRE):
        assert control_guard._peer_allowed(("10.0.0.5", 1), guard.networks_for(path))
        assert not control_guard._peer_allowed(("10.0.0.6", 1), guard.networks_for(path))
