"""The ServerApp's preflight, driven in-process: a stand-in grid whose nodes are the real
ClientApp with each site's node config (only the policy query is answered; any other message
means training started, which the preflight must prevent), and a tracking server that is down
or up."""

from __future__ import annotations

import http.server
import re
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

    def push_messages(self, messages):
        self._replies = self.send_and_receive(messages, timeout=None)
        return [m.metadata.reply_to_message_id for m in self._replies]

    def pull_messages(self, message_ids):
        replies, self._replies = self._replies, []
        return replies

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
                replies.append(Message(Error(code=0, reason=f"{type(err)}:<'{err}'>"),
                                       reply_to=m))
        return replies


@pytest.fixture
def quiet_waits(monkeypatch):
    """The quiet window (seconds without an answer) of every policy query preflight makes."""
    import server.preflight as preflight

    waits, gather = [], preflight._gather

    def spy(grid, messages, *, quiet, first):
        waits.append(quiet)
        return gather(grid, messages, quiet=quiet, first=first)

    monkeypatch.setattr(preflight, "_gather", spy)
    return waits


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


def test_sites_that_failed_the_policy_query_are_the_cause_not_missing_sites(tmp_path):
    """Every connected site but one failed the policy query: the one line says so and why
    (each site's own line, without Flower's quoting), not 'start more sites'."""
    broken = {wire.NODE_DP_EPSILON: "eight", wire.NODE_DP_DELTA: 1e-5}
    grid = SiteGrid(tmp_path, {"site-a": {}, "site-b": broken})
    with pytest.raises(PreflightError) as refused:
        _serve(tmp_path, _cfg(tmp_path, "strategy.min_train_sites=2"), grid)
    message = str(refused.value)
    assert "1 training site(s) answered (site-a)" in message
    assert "1 more connected but gave no usable answer (the policy query failed at" in message
    assert "site-policy: the site's privacy budget in node config is invalid" in message
    assert "start more sites" not in message and "'>" not in message
    # when those sites could not make up the number anyway, both are said
    with pytest.raises(PreflightError, match=r"see those sites' logs; also start more sites"):
        _serve(tmp_path, _cfg(tmp_path, "federation.num_sites=3", "strategy.min_train_sites=3",
                              "strategy.min_available_sites=2"), grid)


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
    assert "(simulated sites: +federation.site_node_config={dp-epsilon:10,dp-delta:1e-5}" \
        in problems[1]                  # the fix in a simulation, where no operator starts it
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


def test_sites_refusing_dp_sgd_for_the_model_are_named_with_their_line(tmp_path):
    """A site whose weights match but whose DP-SGD check refuses the job's model (as round 1
    would) is a problem line: the site's own line, naming the fix, sites grouped by it."""
    from server.preflight import serving_problems

    cfg = _cfg(tmp_path, "privacy=dpsgd")
    line = ("privacy.mechanism=dp-sgd refused for this foundation model: method=full trains "
            "the encoder's class/position embeddings; use method=lora or linear_probe")
    policies = [_policy(n, weights_found=True, weights_match=True,
                        dp_refusal=line if n != "c" else None) for n in ("b", "a", "c")]
    assert serving_problems(cfg, policies) == [f"a, b: {line}"]
    problems, _ = policy_problems(cfg, policies)
    assert f"a, b: {line}" in problems


def test_sites_whose_size_caps_refuse_the_model_are_named_before_round_one(tmp_path,
                                                                          quiet_waits):
    """A site whose node config caps the model below the job's answers the preflight with
    round 1's refusal line as a flag (sized on the meta device, never built), so the
    coordinator names it and the fix before any round, and the other sites' answers stand."""
    from client.queries import QueryLimits

    grid = SiteGrid(tmp_path, {"site-a": {}, "site-b": {wire.NODE_MAX_MODEL_PARAMETERS: 1000},
                               "site-c": {wire.NODE_MAX_STEP_TOKENS: 100}})
    cfg = _cfg(tmp_path, "federation.num_sites=3")
    with pytest.raises(PreflightError) as refused:
        run_preflight(grid, cfg)
    problems = refused.value.problems
    assert len(problems) == 2 and grid.sent == [MessageType.QUERY] * 3
    assert re.fullmatch(r"site-b: the job's model has [\d,]+ parameters and buffers, more "
                        r"than this site builds \(node config 'max-model-parameters': 1,000\): "
                        r"make the model or train.batch_size smaller, or its operator raises "
                        r"that cap", problems[0]), problems
    assert problems[1].startswith("site-c: the job's model reads ") and \
        "'max-step-tokens': 100)" in problems[1]
    # the control: the same job within every cap is served (and the caps are what refused)
    QueryLimits().check_model_size(lambda: cfg.job_spec("r").build(), batch=16)
    fine = SiteGrid(tmp_path, {"site-a": {}, "site-b": {}, "site-c": {}})
    assert len(run_preflight(fine, cfg).policies) == 3


def test_sites_that_cannot_read_the_layout_are_named_with_the_fix(tmp_path, quiet_waits):
    grid = SiteGrid(tmp_path, {"site-a": {}, "site-b": {wire.NODE_LAYOUT: "chest_xray"},
                               "site-c": {wire.NODE_LAYOUT: "brain_mri_4seq"}})
    with pytest.raises(PreflightError) as refused:
        run_preflight(grid, _cfg(tmp_path, "federation.num_sites=3"))
    assert quiet_waits == [60.0]
    assert refused.value.problems == [
        "site-b: each cannot read layout 'brain_mri_4seq' (their data were checked with another "
        "layout at start, or their MedFed does not ship it): their operators restart them with "
        "--layout brain_mri_4seq (or its YAML file), or run with their layout (data/layout=...)"]
    assert grid.sent == [MessageType.QUERY] * 3


def test_sites_without_the_foundation_weights_or_with_other_ones_are_named(tmp_path,
                                                                         quiet_waits):
    """The coordinator builds its base digest and asks with the job; each site answers from
    its own foundation-dir: one line per problem, naming the sites and the fix."""
    from tests.client.test_foundation_site import save_dinov2

    encoders = tmp_path / "encoders"
    for folder, seed in (("coordinator", 0), ("same", 0), ("other", 1)):
        save_dinov2(encoders / folder / "dinov2-small", seed=seed)
    (encoders / "empty").mkdir()
    own = {name: {wire.NODE_FOUNDATION_DIR: str(encoders / name)}
           for name in ("same", "other", "empty")}
    grid = SiteGrid(tmp_path, {"hospital-a": own["same"], "hospital-b": own["empty"],
                               "hospital-c": {}, "hospital-d": own["other"]})
    cfg = _cfg(tmp_path, *_foundation(encoders), "federation.num_sites=4")
    with pytest.raises(PreflightError) as refused:
        run_preflight(grid, cfg)
    assert refused.value.problems == [
        "hospital-b, hospital-c: foundation weights 'dinov2-small' not found in their "
        "foundation-dir: copy the coordinator's directory 'dinov2-small' there (medfed site "
        "--foundation-dir DIR)",
        "hospital-d: foundation weights 'dinov2-small' differ from the coordinator's "
        "(frozen-base digest): put the coordinator's copy of 'dinov2-small' in their "
        "foundation-dir"]
    assert str(encoders) not in str(refused.value)      # no site path in the lines
    # each site builds the model to answer: it gets a round's time, not the quick answer's
    assert quiet_waits == [cfg.federation.round_timeout] != [60.0]
    fixed = SiteGrid(tmp_path, {"hospital-a": own["same"], "hospital-b": own["same"]})
    assert len(run_preflight(fixed, _cfg(tmp_path, *_foundation(encoders))).policies) == 2


def _foundation(encoders) -> tuple[str, ...]:
    return ("model=foundation", "model.options.weights=dinov2-small",
            f"model.foundation_dir={encoders / 'coordinator'}", "model.options.lora_rank=2",
            "task.image_size=32")


class _TrickleGrid:
    """Replies that come in one per pull after ``silent_pulls`` empty pulls; ``answering``
    of the nodes answer at all."""

    def __init__(self, nodes: int, answering: int, silent_pulls: int):
        self.nodes, self.answering, self.silent = nodes, answering, silent_pulls
        self.pulls = 0

    def push_messages(self, messages):
        self.ids = [f"m{i}" for i, _ in enumerate(messages)]
        return list(self.ids)

    def pull_messages(self, message_ids):
        from types import SimpleNamespace

        self.pulls += 1
        if self.pulls <= self.silent:
            return []
        due = [i for i in self.ids[:self.answering] if i in message_ids]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=due[0]))] \
            if due else []


def test_the_policy_query_waits_for_a_slow_first_answer_and_while_answers_keep_coming(
        monkeypatch):
    import server.prompt_grid as prompt
    from server.preflight import _gather

    now = [0.0]                              # a clock that only sleeping moves
    monkeypatch.setattr(prompt.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(prompt.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
                for n in range(1, 31)]
    # processes starting up: nothing for longer than the quiet window (30 polls = 3 s > 2 s),
    # then 30 in turn, one per poll (3 s in all, each within the quiet window of the last)
    slow = _TrickleGrid(30, 30, silent_pulls=30)
    assert len(_gather(slow, messages, quiet=2.0, first=60)) == 30
    # two silent sites end the wait once the others have answered: quiet seconds after the
    # last answer, not at ``first``
    now[0] = 0.0
    partial = _TrickleGrid(30, 28, silent_pulls=0)
    assert len(_gather(partial, messages, quiet=2.0, first=60)) == 28
    last = 27 * prompt.REPLY_POLL            # the 28th answer came after 27 polls
    assert 2.0 - 1e-9 <= now[0] - last < 2.0 + 2 * prompt.REPLY_POLL
    # nobody answers: the first wait ends it
    now[0] = 0.0
    assert _gather(_TrickleGrid(30, 0, silent_pulls=0), messages, quiet=2.0, first=60) == []
    assert 60.0 <= now[0] < 60.0 + 2 * prompt.REPLY_POLL


def test_secure_aggregation_with_fewer_sites_than_it_needs_is_refused_before_round_1(tmp_path):
    """SecAgg+ needs at least 3 sites; with 2 answering the run passed the preflight and
    failed in round 1 (a FAILED run dir and MLflow run). The preflight says so now."""
    two = ("strategy.min_train_sites=2", "strategy.min_available_sites=2")
    cfg = _cfg(tmp_path, "secagg.enabled=true", "federation.num_sites=3", *two)
    problems, _ = policy_problems(cfg, [_policy("a"), _policy("b")])
    assert any(p.startswith("2 training site(s) answered (a, b) and secure aggregation needs "
                            "at least 3 sites, got 2: start more sites") for p in problems)
    problems, _ = policy_problems(cfg, [_policy("a"), _policy("b"), _policy("c")])
    assert not any("secure aggregation needs" in p for p in problems)


def test_a_warning_is_logged_with_the_prefix_medfed_run_shows(tmp_path, monkeypatch, caplog):
    """A DP plan above what a site has left cannot be refused (the site decides in round 1):
    the preflight logs it as ``preflight warning: ...``, the line ``medfed run`` (and
    ``--dry-run``) picks out of the ServerApp's stream (walkthrough finding: it was logged as
    ``preflight: ...``, which the dry run never showed)."""
    import server.preflight as preflight
    from medfed.deploy.submit import PREFLIGHT_LINE

    monkeypatch.setattr(preflight, "wait_for_quorum", lambda *a, **k: None)
    monkeypatch.setattr(preflight, "ask_policies",
                        lambda *a, **k: ([_policy("site-a", epsilon_spent=6.0)], [], []))
    cfg = _cfg(tmp_path, "privacy=dpsgd", "privacy.epsilon=3", "strategy.min_train_sites=1",
               "strategy.min_available_sites=1")
    caplog.set_level("WARNING", logger="medfed.server")
    report = run_preflight(SiteGrid(tmp_path, {}), cfg)
    assert len(report.warnings) == 1 and "left of its budget" in report.warnings[0]
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert lines == [f"preflight warning: {report.warnings[0]}"]
    assert PREFLIGHT_LINE.search(f"[medfed WARNING] {lines[0]}").group(1) == lines[0]


def test_the_preflight_names_each_node_by_the_site_id_it_answered_with(tmp_path):
    """The node id -> site id map the run starts with (walkthrough finding: a site failing
    in round 1 was shown by its Flower node id only, no earlier reply of the run named it)."""
    grid = SiteGrid(tmp_path, {"site-a": {}, "site-b": {}})
    report = run_preflight(grid, _cfg(tmp_path, "federation.num_sites=2"))
    assert report.sites == {1: "site-a", 2: "site-b"}


def test_a_name_two_nodes_answered_with_or_an_odd_one_names_no_node():
    from server.preflight import site_names

    sites, problems = site_names([(1, "site-a"), (2, "site-a"), (3, "site-c"), (4, "a b/../c"),
                                  (5, ""), (6, "node-3")])
    assert sites == {3: "site-c"}
    assert [p.split(":")[0] for p in problems] == [
        "node 6 claims site id 'node-3', the name another node is shown by",
        "nodes 1, 2 all answered as site 'site-a'"]


def test_attack_a_node_answering_the_preflight_as_another_site_refuses_the_run(tmp_path):
    """Attack: node 2 (the real ClientApp) answers the preflight with site-a's name. The
    console named replies with their node ids, MLflow by the site id only, so the run would
    have recorded one of them as the other. The preflight refuses the run, naming both node
    ids and the fix; no round starts (``SiteGrid`` fails on any training message)."""
    grid = SiteGrid(tmp_path, {"site-a": {}, "site-b": {}, "site-c": {}})
    cfg = _cfg(tmp_path, "federation.num_sites=3")
    assert run_preflight(grid, cfg).sites == {1: "site-a", 2: "site-b", 3: "site-c"}
    grid.nodes[2][wire.NODE_SITE_ID] = "site-a"         # the impersonation
    with pytest.raises(PreflightError) as refused:
        run_preflight(grid, cfg)
    (problem,) = [p for p in refused.value.problems if "site-a" in p]
    assert problem.startswith("nodes 1, 2 all answered as site 'site-a': a site id names one "
                              "node for a run"), problem
    assert "medfed site --site-id" in problem
    assert set(grid.sent) == {MessageType.QUERY}


def test_the_preflights_names_reach_the_run(tmp_path, monkeypatch):
    """``make_server_app`` hands the preflight's names to the run, and each phase's
    ``run_federation`` gets them (there they seed ``ObservedStrategy``'s names)."""
    import server.app as app_module
    import server.federation as federation
    from server.preflight import PreflightReport

    got = []
    monkeypatch.setattr(app_module, "run_preflight",
                        lambda grid, cfg: PreflightReport((), (), {7: "site-a"}))
    monkeypatch.setattr(federation, "run_federation",
                        lambda *a, sites=None, **k: got.append(sites) or
                        federation.PhaseOutcome(None, ""))
    monkeypatch.setattr(app_module, "run_experiment",
                        lambda *a, **k: got.append(k["sites"]) or
                        federation.run_experiment(*a, **k))
    _serve(tmp_path, _cfg(tmp_path), SiteGrid(tmp_path, {}))
    assert got[0] == {7: "site-a"} and got[1].bound() == {7: "site-a"}


def test_run_federation_seeds_the_observed_strategy_with_them(tmp_path, monkeypatch):
    import server.federation as federation
    from strategies.guard import GuardedStrategy
    from strategies.state import chain

    class _Stop(Exception):
        pass

    class _Tracker:
        run_id = "r"

        def __init__(self, *a, **k):
            pass

        def finish(self, *a, **k):
            pass

    def observed(strategy, *_args, sites=None, **_kwargs):
        seeded.append((strategy, sites))
        raise _Stop

    seeded = []
    monkeypatch.setattr(federation, "MlflowTracker", _Tracker)
    monkeypatch.setattr(federation, "Checkpointer", lambda *a, **k: None)
    monkeypatch.setattr(federation, "ObservedStrategy", observed)
    with pytest.raises(_Stop):
        federation.run_federation(None, _cfg(tmp_path), tmp_path, sites={7: "site-a"})
    ((strategy, sites),) = seeded
    assert sites.bound() == {7: "site-a"}
    # one binding: the observer binds each phase's claims into it, the guard names by it
    guard = next(link for _, link in chain(strategy) if isinstance(link, GuardedStrategy))
    assert guard.sites is sites


def test_both_phases_of_a_pretraining_run_get_them(tmp_path, monkeypatch):
    import numpy as np
    from flwr.app import Array, ArrayRecord

    import server.federation as federation

    got = []

    def run_federation(grid, cfg, run_dir, observers=(), *, sites=None, **kwargs):
        got.append((run_dir.name, sites))
        weights = {"backbone.w": np.zeros(2, np.float32)}
        return federation.PhaseOutcome(ArrayRecord({k: Array(v) for k, v in weights.items()}),
                                       "1")

    monkeypatch.setattr(federation, "run_federation", run_federation)
    cfg = _cfg(tmp_path, "pretrain=mm_dino", "pretrain.num_rounds=2")
    federation.run_experiment(None, cfg, tmp_path, sites={7: "site-a"})
    assert [name for name, _ in got] == ["pretrain", "finetune"]
    # one binding for the run: a name a node took in phase 1 is still its own in phase 2
    assert got[0][1] is got[1][1] and got[0][1].bound() == {7: "site-a"}
