"""Distributed site-level DP on a deployed federation, on loopback: a coordinator and three
``medfed site`` daemons, each with its own privacy budget, its auth.key and the registration
list (``--secagg-peers``), run ``experiment=sitedp`` - Skellam noise shares added at each site
before malicious-secure SecAgg+ masking, nothing added by the server. The run completes; each
site's own ledger books the distributed guarantee (``site-dp``, trusting ``sites>=3``: the
noise of at least three honest sites, no server) once per round; and every training reply a
site let out (its egress log) is a protocol message or the one masked vector."""

from __future__ import annotations

import re

import pytest

from client.privacy.ledger import PrivacyLedger
from medfed.certs import write_certs
from medfed.deploy.allowlist import digest_of
from medfed.deploy.egress import read_replies
from medfed.simulation import PROJECT_ROOT
from tests.conftest import fixed_pseudonym_key

from .conftest import MEDFED, Children, free_port, run_medfed

pytestmark = pytest.mark.slow

SITES = ("a", "b", "c")
ROUNDS = 2
HANG_GUARD = 600          # seconds; a bound on a stuck run, never a timing assertion


@pytest.fixture(scope="module")
def ddp_federation(tmp_path_factory, three_sites):
    root = tmp_path_factory.mktemp("deploy-ddp")
    certs = root / "certs"
    write_certs(certs, server_name="localhost", sites=list(SITES))
    port = free_port()
    procs = Children(root)
    try:
        procs.start("server", [*MEDFED, "server", "--certs", str(certs), "--state-dir",
                               str(root / "coordinator"), "--host", "127.0.0.1",
                               "--port", str(port)])
        procs.wait_for("server", "site c: public key registered", timeout=HANG_GUARD)
        peers = root / "secagg-peers.pub"          # handed to every hospital out of band
        peers.write_text("".join((certs / "sites" / s / "auth.pub").read_text() for s in SITES))
        for i, site in enumerate(SITES):
            # the privacy dir holds the pseudonym key: the fixed one keeps the splits of every
            # other test (a random one left site c with no labelled training study 1 run in 13)
            fixed_pseudonym_key(root / f"ledger-{site}", f"site-{i}")
            procs.start(site, [*MEDFED, "site", "--site-id", site,
                               "--data-dir", str(three_sites / f"site-{i}"),
                               "--superlink", f"localhost:{port}",
                               "--root-cert", str(certs / "sites" / site / "ca.pem"),
                               "--auth-key", str(certs / "sites" / site / "auth.key"),
                               "--state-dir", str(root / f"node-{site}"),
                               "--privacy-dir", str(root / f"ledger-{site}"),
                               "--dp-epsilon", "50", "--dp-delta", "1e-5",
                               "--require-secagg", "--secagg-peers", str(peers),
                               "--runtime-port", str(free_port()), "--max-wait-time", "60",
                               "--allow-app", digest_of(PROJECT_ROOT),
                               "--min-eval-split-size", "1"])   # synthetic sites, ~8 studies
        for site in SITES:
            procs.wait_for(site, "SuperNode ID:", timeout=HANG_GUARD)
        yield {"root": root, "certs": certs, "port": port, "procs": procs}
    finally:
        procs.cleanup()


def test_distributed_dp_between_deployed_sites(ddp_federation):
    f = ddp_federation
    result = run_medfed("run", "experiment=sitedp", "model=mmvit_tiny", "federation=sim3",
                        f"federation.num_rounds={ROUNDS}", "federation.round_timeout=240",
                        "train.local_epochs=1", "train.batch_size=8",
                        "--superlink", f"localhost:{f['port']}",
                        "--root-cert", str(f["certs"] / "ca.pem"),
                        "--flwr-home", str(f["root"] / "runner"), "--wait-sites", "3",
                        timeout=HANG_GUARD)
    out = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert re.search(rf"INFO\s+{ROUNDS} GLOBAL ", out), out[-4000:]
    for site in SITES:
        log = f["procs"].log(site)
        # its own noise share, every round, for a sum of at least 3 (min_contributors: null)
        assert log.count("distributed DP: adding a Skellam share") == ROUNDS, log[-3000:]
        assert "assuming 3 contributors" in log
        entries = PrivacyLedger(f["root"] / f"ledger-{site}" / "privacy-ledger.sqlite").entries()
        assert [(e.mechanism, e.sample_rate, e.steps, e.trust) for e in entries] == \
            [("site-dp", 1.0, 1, "sites>=3")] * ROUNDS, entries
        lines = read_replies(f["root"] / f"node-{site}" / "egress.jsonl")
        train = [ln for ln in lines if ln["message_type"] == "train"]
        assert train and not any(ln["error_code"] for ln in train), train
        # per round: setup, share keys, masked input, consistency signature, unmask shares
        assert len(train) == 5 * ROUNDS, train
        arrays = [rec for ln in train for rec in ln["records"].values()
                  if rec["kind"] == "arrays"]
        # one masked uint32 vector per round (the model's tensors would be many entries)
        assert [rec["entries"] for rec in arrays] == [1] * ROUNDS, train
