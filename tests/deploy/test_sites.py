"""``medfed sites``: registered sites by the names they were registered with, online/offline
and last seen, from Flower's own ``NodeInfo`` messages (the Control API's ``ListNodes``)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from medfed import cli
from medfed.deploy import sites as sites_module
from medfed.deploy.sites import format_sites, site_statuses

from .conftest import free_port

NOW = datetime(2026, 12, 2, 20, 0, 0, tzinfo=timezone.utc)


def nodes():
    from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611

    return [
        NodeInfo(node_id=11, name="site-b", status="offline", heartbeat_interval=30,
                 registered_at="2026-12-02T18:00:00+00:00",
                 last_activated_at="2026-12-02T19:00:00+00:00",
                 last_deactivated_at="2026-12-02T19:50:00+00:00",
                 online_until=datetime(2026, 12, 2, 19, 50, tzinfo=timezone.utc).timestamp()),
        NodeInfo(node_id=10, name="site-a", status="online", heartbeat_interval=30,
                 registered_at="2026-12-02T18:00:00+00:00",
                 last_activated_at="2026-12-02T19:00:00+00:00",
                 online_until=NOW.timestamp() + 50),        # last heartbeat 10 s ago
        NodeInfo(node_id=12, name="site-c", status="registered", heartbeat_interval=0,
                 registered_at="2026-12-02T18:00:00+00:00"),
        NodeInfo(node_id=13, name="site-old", status="unregistered", heartbeat_interval=30,
                 registered_at="2026-12-01T18:00:00+00:00",
                 unregistered_at="2026-12-01T19:00:00+00:00"),
        NodeInfo(node_id=14, status="online", heartbeat_interval=30,     # no --name given
                 registered_at="2026-12-02T18:00:00+00:00", online_until=NOW.timestamp() + 60),
    ]


def test_sites_are_listed_by_name_with_status_and_last_seen():
    sites = site_statuses(nodes())
    assert [(s.name, s.status) for s in sites] == [
        ("site-a", "online"), ("site-b", "offline"), ("site-c", "registered"), ("", "online")]
    a, b, c, _ = sites
    assert a.last_seen == datetime(2026, 12, 2, 19, 59, 50, tzinfo=timezone.utc)
    assert b.last_seen == datetime(2026, 12, 2, 19, 50, tzinfo=timezone.utc)
    assert c.last_seen is None


def test_the_table_names_every_site_and_counts_the_online_ones():
    table = format_sites(site_statuses(nodes()), NOW).splitlines()
    assert table[0].split() == ["site", "status", "last", "seen", "node", "id"]
    assert table[1].split()[:2] == ["site-a", "online"] and "(10 s ago)" in table[1]
    assert table[2].split()[:2] == ["site-b", "offline"] and "19:50:00 UTC (10 min ago)" in table[2]
    assert "site-c" in table[3] and "never connected" in table[3]
    assert table[4].startswith("(no name)") and table[4].endswith("14")
    assert "site-old" not in "\n".join(table)
    assert table[-1] == "2 of 4 registered sites online"


def test_cli_prints_the_table_or_json(monkeypatch, capsys, tmp_path):
    calls = []

    def fake_list_nodes(superlink, root_cert, **_):
        calls.append((superlink, root_cert))
        return nodes(), NOW

    monkeypatch.setattr(sites_module, "list_nodes", fake_list_nodes)
    args = ["sites", "--superlink", "127.0.0.1:9093", "--root-cert", str(tmp_path / "ca.pem")]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "site-a" in out and "2 of 4 registered sites online" in out
    assert cli.main([*args, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert [s["site"] for s in answer["sites"]] == ["site-a", "site-b", "site-c", ""]
    assert answer["sites"][0]["status"] == "online"
    assert calls[0][0] == "127.0.0.1:9093"


def test_an_unreachable_coordinator_is_one_line(capsys, tmp_path):
    from medfed.certs import write_certs

    write_certs(tmp_path / "certs", server_name="localhost", sites=[])
    code = cli.main(["sites", "--superlink", f"127.0.0.1:{free_port()}",
                     "--root-cert", str(tmp_path / "certs" / "ca.pem")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "medfed: error:" in err
