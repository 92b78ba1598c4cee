"""Distributed site-level DP through the real server loop and the real ClientApp, in process.

``run_federation`` drives the configured strategy chain (SecAgg+ with ``DistributedNoise``)
over a grid that hands each message to the site's real ClientApp (its mods: egress, SecAgg+,
site-level DP clipping; its train handler with the policy and ledger), one persistent node
state per site - the Flower simulation without Ray (``tests.medfed.inprocess``).
"""

from __future__ import annotations

import logging
import shutil
import numpy as np
import pytest

from client.privacy.ledger import PrivacyLedger
from medfed.certs import site_keygen
from protocol import wire
from protocol.secagg_protocol import SecAggError
from server.config import load_experiment
from server.federation import run_federation

from .inprocess import InProcessGrid

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("task_identity")]


def _sites(three_sites, tmp_path) -> dict[str, dict]:
    """Three deployed-style sites, each with its own identity key (``medfed site keygen``)
    on one registration list (``--secagg-peers``), as malicious-secure SecAgg+ needs."""
    root = tmp_path / "sites"
    shutil.copytree(three_sites, root)
    names = ("site-0", "site-1", "site-2")
    keys = {name: site_keygen(tmp_path / "keys" / name, site=name) for name in names}
    peers = tmp_path / "secagg-peers.pub"
    peers.write_text("".join(k.public.read_text() for k in keys.values()))
    return {name: {wire.NODE_DATA_DIR: str(root / name), wire.NODE_SITE_ID: name,
                   wire.NODE_DP_EPSILON: 100.0, wire.NODE_DP_DELTA: 1e-5,
                   wire.NODE_SECAGG_IDENTITY: str(keys[name].private),
                   wire.NODE_SECAGG_PEERS: str(peers),
                   wire.NODE_MIN_EVAL_SPLIT: 1}       # synthetic sites of a few studies
            for name in names}


def _cfg(tmp_path, *extra):
    return load_experiment(["experiment=smoke", "federation=sim3", "privacy=ddp",
                            "secagg.enabled=true", "privacy.noise_multiplier=1.0",
                            "privacy.clipping_norm=0.5", "privacy.delta=1e-3",
                            "federation.num_rounds=2", "strategy.min_train_sites=3",
                            "federation.quorum_timeout=1", "tracking.log_models=false",
                            f"runs_dir={tmp_path / 'runs'}", *extra])


def test_a_ddp_run_books_every_site_and_the_server_adds_nothing(three_sites, tmp_path, caplog):
    sites = _sites(three_sites, tmp_path)
    cfg = _cfg(tmp_path)
    with caplog.at_level(logging.INFO, logger="client.privacy.ddp"):
        run_federation(InProcessGrid(sites), cfg, tmp_path / "run")
    shares = [r for r in caplog.records if "adding a Skellam share" in r.getMessage()]
    assert len(shares) == 3 * 2                           # every site, every round
    for config in sites.values():
        entries = PrivacyLedger(f"{config[wire.NODE_DATA_DIR]}/.medfed/"
                                "privacy-ledger.sqlite").entries()
        assert [(e.mechanism, e.noise_multiplier, e.sample_rate, e.steps, e.trust)
                for e in entries] == [("site-dp", 1.0, 1.0, 1, "sites>=3")] * 2
    final = np.load(next((tmp_path / "run").rglob("arrays.npz")))
    assert all(np.isfinite(final[k]).all() for k in final.files)


def test_a_sum_short_of_min_contributors_is_never_unmasked(three_sites, tmp_path, caplog):
    """One site's masked update never arrives: the other two refuse to reveal shares, so the
    round fails instead of releasing a sum with 2/3 of the noise (min_contributors=3). With
    three sites the malicious-secure SecAgg+ floor (secagg-min-contributors 3, and t of 2
    neighbours) refuses first, at the consistency stage; distributed DP's own floor behind it
    is attacked directly in tests/client/test_ddp.py."""
    sites = _sites(three_sites, tmp_path)
    cfg = _cfg(tmp_path, "federation.num_rounds=1")
    with caplog.at_level(logging.WARNING):
        with pytest.raises(SecAggError, match="nothing is unmasked"):
            run_federation(InProcessGrid(sites, drop_masked=2), cfg, tmp_path / "run")
    assert "2 survivors; this site requires at least 3" in caplog.text


def test_server_noise_runs_only_where_the_operator_trusts_the_server(three_sites, tmp_path):
    sites = _sites(three_sites, tmp_path)
    for config in sites.values():
        config[wire.NODE_DP_TRUST_SERVER] = True
    cfg = _cfg(tmp_path, "privacy=sitedp", "privacy.noise_multiplier=1.0",
               "privacy.clipping_norm=0.5", "federation.num_rounds=1")
    assert cfg.privacy.noise == wire.DP_NOISE_SERVER
    run_federation(InProcessGrid(sites), cfg, tmp_path / "run")
    ledger = PrivacyLedger(f"{sites['site-0'][wire.NODE_DATA_DIR]}/.medfed/"
                           "privacy-ledger.sqlite")
    assert [e.trust for e in ledger.entries()] == ["server"]
    distrust = _sites(three_sites, tmp_path / "second")
    for name, config in distrust.items():
        config[wire.NODE_DP_TRUST_SERVER] = name != "site-1"   # this operator does not
    # site-1 refuses the round, so the secure sum of three cannot complete: nothing released
    with pytest.raises(SecAggError, match="nothing is unmasked"):
        run_federation(InProcessGrid(distrust), cfg, tmp_path / "run2")
    charged = {name: len(PrivacyLedger(f"{c[wire.NODE_DATA_DIR]}/.medfed/privacy-ledger."
                                       "sqlite").entries()) for name, c in distrust.items()}
    assert charged == {"site-0": 1, "site-1": 0, "site-2": 1}
