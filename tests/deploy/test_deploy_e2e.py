"""End to end on loopback: certificates -> coordinator (TLS + SuperNode authentication) -> three
site daemons -> two rounds of the smoke experiment tracked to a real MLflow server; a site with
an unregistered key is refused; one site is SIGKILLed during round 2 and the run finishes with
the other two, recording which site dropped; another site, SIGKILLed and restarted at once,
rejoins once the coordinator let its old session expire, and ``medfed sites`` lists them by
name. Every site approves exactly the app release ``medfed run`` submits (``--allow-app`` with
its digest); a run of a tampered copy of the app fails at every site, each saying why in its
log."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from medfed.certs import write_certs
from medfed.deploy.allowlist import digest_of
from medfed.deploy.egress import read_replies
from medfed.simulation import PROJECT_ROOT
from tests.conftest import phi_strings

from .conftest import MEDFED, Children, free_port, run_medfed

pytestmark = pytest.mark.slow

SITES = ("a", "b", "c")
HANG_GUARD = 600          # seconds; a bound on a stuck run, never a timing assertion


@pytest.fixture(scope="module")
def federation(tmp_path_factory, three_sites):
    root = tmp_path_factory.mktemp("deploy")
    certs = root / "certs"
    write_certs(certs, server_name="localhost", sites=list(SITES))
    rogue = root / "rogue"                    # a key pair the coordinator never registered
    write_certs(rogue, server_name="localhost", sites=["d"])
    port, mlflow_port = free_port(), free_port()
    procs = Children(root)
    approved = digest_of(PROJECT_ROOT)        # the FAB `medfed run` will build and submit
    try:
        procs.start("mlflow", [MEDFED[0], "-m", "mlflow", "server", "--host", "127.0.0.1",
                               "--port", str(mlflow_port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                               "--artifacts-destination", str(root / "mlartifacts")])
        procs.start("server", [*MEDFED, "server", "--certs", str(certs), "--state-dir",
                               str(root / "coordinator"), "--host", "127.0.0.1",
                               "--port", str(port)])
        procs.wait_for("server", "site c: public key registered", timeout=HANG_GUARD)
        # the registration list each hospital gets out of band, for malicious-secure SecAgg+
        peers = root / "secagg-peers.pub"
        peers.write_text("".join((certs / "sites" / s / "auth.pub").read_text() for s in SITES))
        commands = {site: [*MEDFED, "site", "--site-id", site,
                           "--data-dir", str(three_sites / f"site-{i}"),
                           "--superlink", f"localhost:{port}",
                           "--root-cert", str(certs / "sites" / site / "ca.pem"),
                           "--auth-key", str(certs / "sites" / site / "auth.key"),
                           "--state-dir", str(root / f"node-{site}"),
                           "--runtime-port", str(free_port()), "--max-wait-time", "60",
                           "--allow-app", approved, "--secagg-peers", str(peers),
                           "--min-eval-split-size", "1"]      # synthetic sites of ~8 studies
                    for i, site in enumerate(SITES)}
        for site in SITES:
            procs.start(site, commands[site])
        for site in SITES:
            procs.wait_for(site, "SuperNode ID:", timeout=HANG_GUARD)
        yield {"root": root, "certs": certs, "rogue": rogue, "port": port,
               "mlflow": f"http://127.0.0.1:{mlflow_port}", "procs": procs,
               "data": three_sites, "site_commands": commands}
    finally:
        procs.cleanup()


def test_unregistered_site_is_refused(federation):
    f = federation
    result = run_medfed("site", "--site-id", "d", "--data-dir", str(f["data"] / "site-0"),
                        "--superlink", f"localhost:{f['port']}",
                        "--root-cert", str(f["certs"] / "ca.pem"),
                        "--auth-key", str(f["rogue"] / "sites" / "d" / "auth.key"),
                        "--state-dir", str(f["root"] / "node-d"),
                        "--runtime-port", str(free_port()), "--max-wait-time", "20",
                        timeout=HANG_GUARD)
    assert result.returncode == 2, result.stdout[-3000:]
    assert result.stderr.count("\n") == 1 and "not registered" in result.stderr
    assert "Failed to activate SuperNode" in result.stdout      # the SuperLink said no
    # its teardown is quiet: no traceback of the runner stopped mid-import (walkthrough)
    assert "Traceback" not in result.stdout and "KeyboardInterrupt" not in result.stdout, \
        result.stdout[-3000:]


def test_a_tampered_app_is_refused_at_every_site(federation, tmp_path):
    """The coordinator submits a modified copy of the app: no site runs it."""
    import shutil

    f, procs = federation, federation["procs"]
    tampered = tmp_path / "app"
    shutil.copytree(PROJECT_ROOT, tampered, symlinks=True,
                    ignore=shutil.ignore_patterns(".venv", ".git", "runs", ".flwr", "mlruns"))
    with open(tampered / "client" / "app.py", "a") as fh:
        fh.write("\n# a coordinator's addition: read /data/** and send it home\n")
    result = run_medfed("run", "experiment=smoke", "federation.num_sites=3",
                        "federation.num_rounds=1", "federation.round_timeout=120",
                        "--app-dir", str(tampered), "--superlink", f"localhost:{f['port']}",
                        "--root-cert", str(f["certs"] / "ca.pem"),
                        "--flwr-home", str(f["root"] / "tampered-runner"), "--wait-sites", "3",
                        timeout=HANG_GUARD)
    digest = digest_of(tampered)
    for site in SITES:
        procs.wait_for(site, f"app {digest[:12]} not approved by this site",
                       timeout=HANG_GUARD)
        assert "starting the site's installed ClientApp" not in procs.log(site)
    assert re.search(r"run \d+ started; its log follows", result.stdout)   # it was submitted


def test_dry_run_checks_the_sites_policies_and_trains_nothing(federation):
    """``medfed run --dry-run``: each site answers the policy query; a DP experiment against
    sites with no privacy budget is refused naming them (exit 2), a plain one passes."""
    f = federation
    connect = ("--superlink", f"localhost:{f['port']}", "--root-cert", str(f["certs"] / "ca.pem"),
               "--flwr-home", str(f["root"] / "dry-run"), "--wait-sites", "3")
    refused = run_medfed("run", "--dry-run", "experiment=smoke", "federation.num_sites=3",
                         "privacy=dpsgd", *connect, timeout=HANG_GUARD)
    assert refused.returncode == 2, refused.stdout[-3000:] + refused.stderr[-3000:]
    problems = [ln for ln in refused.stdout.splitlines() if ln.startswith("preflight problem:")]
    assert len(problems) == 1 and "a, b, c: each has no privacy budget" in problems[0], \
        refused.stdout[-3000:]
    ok = run_medfed("run", "--dry-run", "experiment=smoke", "federation.num_sites=3", *connect,
                    timeout=HANG_GUARD)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    assert "preflight ok: 3 sites (a, b, c train)" in ok.stdout
    for site in SITES:
        assert "trained on" not in f["procs"].log(site)


def test_a_secure_round_with_signed_keys_between_deployed_sites(federation):
    """One SecAgg+ round between the three deployed sites, each signing its round keys with
    its auth.key and checking its peers against the registration list (--secagg-peers): the
    run completes, and every training reply a site let out (its egress log) is the masked
    vector or a protocol message, never the plaintext weights."""
    f = federation
    result = run_medfed("run", "experiment=smoke", "federation.num_sites=3",
                        "federation.num_rounds=1", "federation.round_timeout=240",
                        "secagg.enabled=true", "--superlink", f"localhost:{f['port']}",
                        "--root-cert", str(f["certs"] / "ca.pem"),
                        "--flwr-home", str(f["root"] / "secure"), "--wait-sites", "3",
                        timeout=HANG_GUARD)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(r"INFO\s+1 GLOBAL ", result.stdout + result.stderr), result.stdout[-4000:]
    for site in SITES:
        lines = read_replies(f["root"] / f"node-{site}" / "egress.jsonl")
        train = [ln for ln in lines if ln["message_type"] == "train"]
        train = [ln for ln in train if ln["run_id"] == train[-1]["run_id"]]   # this run's
        # setup, share keys, masked input, consistency signature, unmask shares
        assert len(train) >= 5 and not any(ln["error_code"] for ln in train), train
        # each was pushed by the runner and sent on by the SuperNode (whose line for the
        # last reply may follow the run's end by a moment: read again, bounded)
        for _ in range(100):
            if all(ln["outcomes"] == ["pushed", "sent"] for ln in train):
                break
            time.sleep(0.1)
            train = [ln for ln in read_replies(f["root"] / f"node-{site}" / "egress.jsonl")
                     if ln["message_type"] == "train" and ln["run_id"] == train[-1]["run_id"]]
        assert all(ln["outcomes"] == ["pushed", "sent"] for ln in train), train
        arrays = [rec for ln in train for rec in ln["records"].values()
                  if rec["kind"] == "arrays"]
        # one masked uint32 vector (the model's tensors would be many entries), sent once
        assert [rec["entries"] for rec in arrays] == [1], train


def test_two_rounds_with_a_site_killed_mid_run(federation):
    from mlflow import MlflowClient

    f, procs = federation, federation["procs"]
    started = "starting the site's installed ClientApp"
    before = procs.log("c").count(started)         # earlier tests' ClientApp processes
    run = procs.start("run", [*MEDFED, "run", "experiment=smoke", "federation.num_sites=3",
                              "federation.num_rounds=2", "federation.round_timeout=240",
                              "tracking=server", f"tracking.uri={f['mlflow']}",
                              "--superlink", f"localhost:{f['port']}",
                              "--root-cert", str(f["certs"] / "ca.pem"),
                              "--flwr-home", str(f["root"] / "runner"), "--wait-sites", "3"])
    # c's fourth ClientApp task of this run (the preflight's policy query, train 1,
    # evaluate 1, train 2) is round 2's training: the site dies mid-round, holding the message.
    # The log is read every 20 ms: a round-2 step of this tiny task, with replies forwarded
    # promptly, can finish within the default 0.5 s (the kill then came after the reply).
    procs.wait_for("c", started, timeout=HANG_GUARD, count=before + 4, poll=0.02)
    procs.kill("c")
    assert run.wait(timeout=HANG_GUARD) == 0, procs.log("run")[-4000:]
    assert '"status": "finished:completed"' in procs.log("run")
    # `medfed run` shows the table `medfed simulate` shows (sites by id, with seconds), the
    # drop once by site id, where the results are; Flower's raw dump only with --verbose.
    shown = procs.log("run")
    assert re.search(r"INFO\s+round site\s+train_loss .* train_s\s+eval_s\n", shown), shown[-4000:]
    for site in SITES:
        assert re.search(rf"INFO\s+1 {site}\s+\d+\.\d+ .* \d+\.\d\s+\d+\.\d\n", shown)
    assert re.search(r"INFO\s+2 GLOBAL ", shown)
    assert "round 2: training reply failed: c (node " in shown
    assert "Received error in reply" not in shown and "Traceback" not in shown
    assert "'train_loss':" not in shown and "Aggregated ClientApp-side" not in shown
    assert f"results: MLflow tracking server {f['mlflow']}" in shown

    client = MlflowClient(f["mlflow"])
    versions = {int(v.tags["round"]): v for v in
                client.search_model_versions("name='medfed-classifier'")}
    assert sorted(versions) == [1, 2]
    assert versions[1].tags["sites"] == "a,b,c"
    assert versions[2].tags["sites"] == "a,b"            # c dropped in round 2
    run_id = versions[2].tags["mlflow_run_id"]
    history = {k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
               for k in ("train/sites_ok", "train/sites_failed", "eval/sites_ok")}
    assert history["train/sites_ok"] == {1: 3.0, 2: 2.0}
    assert history["train/sites_failed"] == {1: 0.0, 2: 1.0}   # c's round-2 reply: node gone
    assert history["eval/sites_ok"] == {1: 3.0, 2: 2.0}
    metrics = client.get_run(run_id).data.metrics
    for site in SITES:
        assert f"site/{site}/train/num-examples" in metrics
        assert f"site/{site}/test/n" in metrics
    c_steps = [m.step for m in client.get_metric_history(run_id, "site/c/train/num-examples")]
    assert c_steps == [1]
    # The dropped site is named (from its earlier replies), not just counted.
    assert [m.step for m in client.get_metric_history(run_id, "site/c/train/dropped")] == [2]
    assert client.get_run(run_id).data.tags.get("dropped.round-2.c") == "train"

    # Every site log line names its site; no PHI and no DICOM file name in any log.
    phi = phi_strings(f["data"])
    names = {p.name for p in f["data"].rglob("*.dcm")}
    for name in (*SITES, "server", "run"):
        text = procs.log(name)
        leaked = [s for s in phi | names if s in text]
        assert not leaked, f"{name} log leaks {leaked[:3]}"
    for site in ("a", "b"):
        lines = [ln for ln in procs.log(site).splitlines() if re.match(r"\d{4}-\d\d-\d\d ", ln)]
        assert lines and all(f"[{site}]" in ln for ln in lines)


def test_a_killed_site_restarted_at_once_rejoins(federation):
    """Site b is SIGKILLed (its SuperNode never closes its session) and started again at once:
    the coordinator still holds b's session (~60 s of heartbeat), so the site says so and
    retries until it expired, instead of the false 'not registered'. ``medfed sites`` then
    lists the sites by the names they were registered with, a and b online."""
    f, procs = federation, federation["procs"]
    procs.kill("b")
    procs.procs["b"].wait(timeout=60)
    command = list(f["site_commands"]["b"])
    command[command.index("--max-wait-time") + 1] = "150"   # the old session: up to ~80 s
    procs.start("b-restarted", command)
    procs.wait_for("b-restarted", "SuperNode ID:", timeout=HANG_GUARD)
    log = procs.log("b-restarted")
    assert "not registered" not in log
    # The coordinator keeps a node online until 30-60 s after its last heartbeat; the restart
    # reaches it ~15 s after the kill here. On a box so slow that the session expired first,
    # the site joins at its first attempt and there is nothing to retry.
    if "Failed to activate SuperNode" in log:
        assert "previous session of this site is still open at the coordinator" in log, log
        assert "rejoined the coordinator" in log

    listed = run_medfed("sites", "--superlink", f"127.0.0.1:{f['port']}",
                        "--root-cert", str(f["certs"] / "ca.pem"), "--json")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    status = {s["site"]: s["status"] for s in json.loads(listed.stdout)["sites"]}
    assert set(status) == set(SITES) and status["a"] == status["b"] == "online"


def test_health_graceful_sigterm_and_sites_retry_with_backoff(federation):
    """Runs after the federation above: the coordinator answers ``medfed health``, stops
    cleanly on SIGTERM, and the surviving sites say they retry with backoff."""
    f = federation
    procs = f["procs"]
    health = ["health", "--superlink", f"localhost:{f['port']}",
              "--root-cert", str(f["certs"] / "ca.pem")]
    up = run_medfed(*health)
    assert up.returncode == 0, up.stdout + up.stderr
    server = procs.procs["server"]
    server.send_signal(signal.SIGTERM)          # medfed server only; it stops its SuperLink
    assert server.wait(timeout=HANG_GUARD) == 0, procs.log("server")[-3000:]
    assert "SIGTERM received: shutting down" in procs.log("server")
    procs.wait_for("a", "retrying with backoff", timeout=HANG_GUARD)
    down = run_medfed(*health)
    assert down.returncode != 0 and "medfed: error" in down.stderr
