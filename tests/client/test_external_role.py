"""An external site (node config ``role = "external"``): answers the server's role query,
refuses to train, and scores the model on all its labelled studies."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import make_client_app
from client.runtime import SiteConfigError, SiteDataCache, resolve_site
from protocol import wire
from tests.conftest import CLASSES


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config={})


def _message(kind: str, config: dict) -> Message:
    return Message(RecordDict({wire.CONFIG: ConfigRecord(config)}), dst_node_id=7,
                   message_type=kind)


def test_role_comes_from_node_config_and_bad_roles_are_refused(tiny_sites):
    site = tiny_sites / "site-0"
    assert resolve_site(_context({wire.NODE_DATA_DIR: str(site)})).role == wire.ROLE_TRAIN
    external = resolve_site(_context({wire.NODE_DATA_DIR: str(site), wire.NODE_ROLE: "external"}))
    assert external.role == wire.ROLE_EXTERNAL
    with pytest.raises(SiteConfigError, match="'role' must be one of train, external"):
        resolve_site(_context({wire.NODE_DATA_DIR: str(site), wire.NODE_ROLE: "observer"}))
    # a site id names MLflow keys and console rows at the server: a plain name or refused
    with pytest.raises(SiteConfigError, match="'site-id' must be a plain name"):
        resolve_site(_context({wire.NODE_DATA_DIR: str(site), wire.NODE_SITE_ID: "a b"}))
    # simulation: partition ids from sim_train_sites on are the external/ folder
    sim = resolve_site(_context({wire.NODE_PARTITION_ID: 2}), tiny_sites, sim_train_sites=2)
    assert sim.site_id == "external" and sim.data_dir == tiny_sites / "external"
    assert resolve_site(_context({wire.NODE_PARTITION_ID: 1}), tiny_sites, 2).site_id == "site-1"


def test_external_site_answers_the_role_query_and_refuses_to_train(tiny_sites, task_identity,
                                                                  caplog):
    app = make_client_app()
    node = {wire.NODE_DATA_DIR: str(tiny_sites / "site-0"), wire.NODE_SITE_ID: "ext",
            wire.NODE_ROLE: wire.ROLE_EXTERNAL}
    reply = app(_message(MessageType.QUERY, {wire.QUERY: wire.QUERY_ROLE}), _context(node))
    assert dict(reply.content.config_records[wire.SITE]) == {wire.SITE_ID: "ext",
                                                             wire.NODE_ROLE: "external"}
    # the coordinator sees generic codes (client.mods.errors); the site's log has the reason
    with pytest.raises(Exception, match="^site-config: "):
        app(_message(MessageType.TRAIN, {}), _context(node))
    assert "never trains" in caplog.text
    with pytest.raises(Exception, match="^site-failure: "):
        app(_message(MessageType.QUERY, {wire.QUERY: "budget"}), _context(node))
    assert "unknown query" in caplog.text


def test_external_site_has_one_split_of_every_labelled_study(tiny_sites):
    node = {wire.NODE_DATA_DIR: str(tiny_sites / "site-0"), wire.NODE_ROLE: "external"}
    site = resolve_site(_context(node))
    data, splits = SiteDataCache().get(site, CLASSES, 32)
    assert set(splits) == {wire.EXTERNAL_SPLIT}
    assert len(splits[wire.EXTERNAL_SPLIT]) == sum(s.label >= 0 for s in data.studies) > 0
