"""The ServerApp's preflight, driven in-process: a stand-in grid whose nodes are the real
ClientApp with each site's node config (only the policy query is answered; any other message
means training started, which the preflight must prevent), and a tracking server that is down
or up."""

from __future__ import annotations

import http.server
import socket
import threading
import time

import pytest
from flwr.app import Context, Error, Message, MessageType, RecordDict

from client.app import make_client_app
from protocol import wire
from protocol.policy import SitePolicy
from server.app import make_server_app
from server.config import load_experiment
from server.preflight import PreflightError, policy_problems, run_preflight
from server.tracking_store import check_tracking_store

pytestmark = pytest.mark.usefixtures("task_identity")

DP_SITE = {wire.NODE_DP_EPSILON: 8.0, wire.NODE_DP_DELTA: 1e-5}


class SiteGrid:
    """Nodes 1..n, each the real ClientApp with its own node config."""

    def __init__(self, tmp_path, sites: dict[str, dict]):
        self.app = make_client_app()
        self.nodes = {i: {wire.NODE_DATA_DIR: str(tmp_path / name), wire.NODE_SITE_ID: name,
                          **config} for i, (name, config) in enumerate(sites.items(), 1)}
        self.sent: list[str] = []

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout):
        replies = []
        for m in messages:
            self.sent.append(m.metadata.message_type)
            assert m.metadata.message_type == MessageType.QUERY, "a round started"
            node = m.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, node_config=self.nodes[node],
                              state=RecordDict(), run_config={})
            try:
                replies.append(self.app(m, context))
            except Exception as err:     # what Flower sends back for a raising ClientApp
                replies.append(Message(Error(code=0, reason=str(err)), reply_to=m))
        return replies


def _cfg(tmp_path, *overrides):
    return load_experiment(["experiment=smoke", f"runs_dir={tmp_path / 'runs'}",
                            f"data.root={tmp_path}", "federation.quorum_timeout=1",
                            *overrides])


def _serve(tmp_path, cfg, grid, run_config=None):
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config or {})
    make_server_app(cfg)(grid, context)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_server_that_is_down_fails_first_with_one_line(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"
    grid = SiteGrid(tmp_path, {"site-a": {}, "site-b": {}})
    started = time.monotonic()
    with pytest.raises(PreflightError) as refused:
        _serve(tmp_path, _cfg(tmp_path, "tracking=server", f"tracking.uri={uri}"), grid)
    message = str(refused.value)
    print(f"refused in {time.monotonic() - started:.2f} s: {message}")
    assert "\n" not in message and uri in message
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow server" in message
    assert "--port " + uri.rsplit(":", 1)[1] in message
    assert grid.sent == []                          # before any site is asked anything
    assert not (tmp_path / "runs").exists()         # no run folder, no MLflow run


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [200, 503])
def test_a_tracking_server_that_answers_health_passes(status):
    handler = type("Health", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://user:secret@127.0.0.1:{server.server_port}"
        problem = check_tracking_store(uri)
    finally:
        server.shutdown()
    if status == 200:
        assert problem is None
    else:
        assert "HTTP 503" in problem and "secret" not in problem


def test_a_local_store_needs_a_writable_folder(tmp_path):
    assert check_tracking_store(None) is None
    assert check_tracking_store(f"sqlite:///{tmp_path}/new/mlflow.db") is None
    (tmp_path / "file").write_text("")
    assert "not a folder" in check_tracking_store(f"sqlite:///{tmp_path}/file/mlflow.db")


def test_a_non_private_experiment_is_refused_by_dp_requiring_sites(tmp_path):
    grid = SiteGrid(tmp_path, {"site-a": DP_SITE, "site-b": DP_SITE, "site-c": {}})
    with pytest.raises(PreflightError) as refused:
        _serve(tmp_path, _cfg(tmp_path), grid)
    message = str(refused.value)
    assert "\n" not in message
    assert "site-a, site-b: each requires differential privacy" in message and "site-c" not in message
    assert "privacy=dpsgd privacy.epsilon=<at most 8>" in message
    assert grid.sent == [MessageType.QUERY] * 3 and not (tmp_path / "runs").exists()


def test_a_private_experiment_passes_and_dry_run_stops_after_the_preflight(tmp_path, caplog):
    grid = SiteGrid(tmp_path, {"site-a": DP_SITE, "site-b": DP_SITE})
    cfg = _cfg(tmp_path, "privacy=dpsgd", "privacy.epsilon=4")
    caplog.set_level("INFO", logger="medfed.server")
    _serve(tmp_path, cfg, grid, run_config={wire.RUN_PREFLIGHT_ONLY: "true"})
    assert "preflight ok: 2 sites (site-a, site-b train)" in caplog.text
    assert grid.sent == [MessageType.QUERY] * 2 and not (tmp_path / "runs").exists()


def test_secagg_budget_and_site_count_problems(tmp_path):
    grid = SiteGrid(tmp_path, {"site-a": {wire.NODE_REQUIRE_SECAGG: True},
                               "site-b": DP_SITE | {wire.NODE_REQUIRE_DP: False},
                               "ext": {wire.NODE_ROLE: wire.ROLE_EXTERNAL,
                                       wire.NODE_REQUIRE_SECAGG: True}})
    cfg = _cfg(tmp_path, "privacy=dpsgd", "privacy.epsilon=9", "federation.num_sites=3",
               "strategy.min_train_sites=3")
    with pytest.raises(PreflightError) as refused:
        run_preflight(grid, cfg)
    problems = refused.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith("2 training site(s) answered (site-a, site-b), the strategy "
                                  "needs 3")
    assert problems[1].startswith("site-a: each has no privacy budget and refuses dp-sgd")
    assert problems[2].startswith("site-a: each requires secure aggregation")   # not ext: evaluates
    assert problems[3].startswith("site-b: smoke plans epsilon 9 over 1 rounds > its budget 8")


def _policy(name="s", **kw) -> SitePolicy:
    return SitePolicy(name, require_dp=True, epsilon=8.0, delta=1e-5, **kw)


def test_budget_checks_refuse_only_what_a_site_would_surely_refuse(tmp_path):
    two = "strategy.min_train_sites=1", "strategy.min_available_sites=1"
    dpsgd = _cfg(tmp_path, "privacy=dpsgd", "privacy.epsilon=3", *two)
    assert policy_problems(dpsgd, [_policy()]) == ([], [])
    # more than is left, but RDP composition may still fit: a warning, the site decides
    problems, warnings = policy_problems(dpsgd, [_policy(epsilon_spent=6.0)])
    assert problems == [] and "may still fit" in warnings[0]
    assert "is spent" in policy_problems(dpsgd, [_policy(epsilon_spent=8.0)])[0][0]
    assert "per-run cap 2" in policy_problems(dpsgd, [_policy(max_run_epsilon=2.0)])[0][0]
    # site-level DP: the run's epsilon at the site's delta, as the site computes it
    sitedp = _cfg(tmp_path, "privacy=sitedp", "privacy.noise_multiplier=0.5",
                  "federation.num_rounds=20", "strategy.min_train_sites=2")
    trusting = dict(trust_server=True)           # privacy=sitedp: the server adds the noise
    problems, _ = policy_problems(sitedp, [_policy("a", **trusting), _policy("b", **trusting)])
    assert len(problems) == 2 and "> its budget 8" in problems[0]
    floor = _policy("a", min_noise_multiplier=1.0, **trusting)
    quiet = _cfg(tmp_path, "privacy=sitedp", "privacy.noise_multiplier=0.9",
                 "strategy.min_train_sites=2")
    assert "below its floor 1" in policy_problems(quiet, [floor, _policy("b", **trusting)])[0][0]
    # a site that does not trust the server refuses server noise, not distributed noise
    distrust = policy_problems(quiet, [_policy("a", **trusting), _policy("b")])[0]
    assert len(distrust) == 1 and distrust[0].startswith("b: privacy.noise=server")
    ddp = _cfg(tmp_path, "federation=sim3", "privacy=ddp", "secagg.enabled=true",
               "privacy.noise_multiplier=3", "strategy.min_train_sites=3")
    assert policy_problems(ddp, [_policy("a"), _policy("b"), _policy("c")]) == ([], [])
