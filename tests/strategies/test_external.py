"""ExternalSites with a stand-in grid: who is asked, who trains, what is logged."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from flwr.app import ConfigRecord, MessageType, RecordDict

from protocol import wire
from strategies.external import ExternalSites
from strategies.site_names import SiteNames

ROLES = {1: "external", 2: "train", 4: "observer"}      # node 3 never answers


class Grid:
    """Nodes 1-4 answering the role query with ``ROLES``, node n as ``claims.get(n, "s<n>")``."""

    def __init__(self, claims: dict[int, str] | None = None):
        self.asked: list[list[int]] = []
        self.claims = claims or {}

    def get_node_ids(self):
        return [1, 2, 3, 4]

    def send_and_receive(self, messages, timeout):
        assert all(m.metadata.message_type == MessageType.QUERY for m in messages)
        self.asked.append([m.metadata.dst_node_id for m in messages])
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            if node not in ROLES:
                replies.append(SimpleNamespace(has_error=lambda: True))
                continue
            site = ConfigRecord({wire.SITE_ID: self.claims.get(node, f"s{node}"),
                                 wire.NODE_ROLE: ROLES[node]})
            replies.append(SimpleNamespace(has_error=lambda: False, has_content=lambda: True,
                                           content=RecordDict({wire.SITE: site}),
                                           metadata=SimpleNamespace(src_node_id=node)))
        return replies


class Inner:
    def __init__(self):
        self.train_nodes = None

    def configure_train(self, server_round, arrays, config, grid):
        self.train_nodes = grid.get_node_ids()
        return []


def test_only_answered_external_nodes_leave_training_and_silence_is_logged(caplog,
                                                                          task_identity):
    grid, inner = Grid(), Inner()
    strategy = ExternalSites(inner)
    with caplog.at_level(logging.INFO, logger="medfed.server"):
        strategy.configure_train(1, None, ConfigRecord(), grid)
    assert inner.train_nodes == [2, 3, 4]
    assert strategy.external() == {1}
    text = caplog.text
    assert "site s1 is external" in text
    assert "node 3 did not answer the role query" in text
    assert "site s4 answered the role query with 'observer'" in text
    strategy.configure_train(2, None, ConfigRecord(), grid)
    assert grid.asked == [[1, 2, 3, 4], [3]]            # the silent node is asked again


def test_attack_the_role_query_lines_name_the_node_not_the_site_it_claims(caplog,
                                                                         task_identity):
    """Attack: node 1 (external) answers the role query as "s2", the name the run bound to
    node 2, and node 4 with a forged log line for a name. The console named each by the id
    it sent: it blamed s2, and printed the forged line. With the run's binding it names
    node-1 and node-4."""
    grid = Grid({1: "s2", 2: "s9", 4: "x\nINFO forged line"})
    strategy = ExternalSites(Inner(), sites=SiteNames({2: "s2"}))
    with caplog.at_level(logging.INFO, logger="medfed.server"):
        strategy.configure_train(1, None, ConfigRecord(), grid)
    text = caplog.text
    assert "site node-1 is external" in text
    assert "site node-4 answered the role query with 'observer'" in text
    assert "s2" not in text and "forged" not in text
