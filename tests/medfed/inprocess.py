"""A federation in this process: the real server loop (or the whole ServerApp) and each site's
real ClientApp, over a grid that hands every message straight to the site's app - the Flower
simulation without Ray (seconds instead of ~35 s of Ray start-up and shut-down per run)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from flwr.app import Context, Error, Message, RecordDict

from client.app import make_client_app
from client.runtime import SiteDataCache
from protocol import wire
from server.app import make_server_app
from server.config import ExperimentConfig
from server.federation import new_run_dir


class InProcessGrid:
    """Nodes 1..n, each the real ClientApp with its own node config and persistent state.

    ``sim_data_root``: the sites are simulation partitions of that folder (node config
    ``partition-id``), as ``medfed simulate`` serves them; ``mods``: extra client mods."""

    def __init__(self, sites: dict[str, dict], *, drop_masked: int | None = None,
                 sim_data_root: Path | None = None, mods=(), run_id: int = 1):
        trained = len(sites) if sim_data_root is not None else None
        self.app = make_client_app(sim_data_root=sim_data_root, sim_train_sites=trained,
                                   mods=mods, data_cache=SiteDataCache())
        self.contexts = {i: Context(run_id=run_id, node_id=i, node_config=config,
                                    state=RecordDict(), run_config={})
                         for i, config in enumerate(sites.values(), 1)}
        self.drop_masked = drop_masked          # a node whose masked reply never arrives
        self.run = SimpleNamespace(run_id=run_id)
        self._replies: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """The preflight's half of ``send_and_receive``: the replies wait for the pull."""
        self._replies = self.send_and_receive(messages)
        return [m.metadata.reply_to_message_id for m in self._replies]

    def pull_messages(self, message_ids):
        replies, self._replies = self._replies, []
        return replies

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            try:
                reply = self.app(m, self.contexts[node])
            except Exception as err:            # what Flower sends back for a raising app
                reply = Message(Error(code=0, reason=str(err)), reply_to=m)
            config = m.content.config_records.get(wire.CONFIG) if m.has_content() else None
            if node == self.drop_masked and config is not None and \
                    config.get(wire.SECAGG_STAGE) == wire.SECAGG_MASKED:
                continue
            replies.append(reply)
        return replies


def simulate_in_process(cfg: ExperimentConfig, *, client_mods=()) -> Path:
    """``medfed.simulation.simulate`` without Ray: the ServerApp (preflight, then the run)
    over ``cfg.federation.num_sites`` simulated sites of ``cfg.data.root``, each with the
    node config ``simulate`` writes, in a Flower run of its own (a fresh run id, as Flower
    gives each simulation: a site answers each round of a run once); the run directory."""
    import uuid
    from unittest import mock

    from flwr.supercore.task_identity import TaskIdentity

    from medfed.simulation import check_sites, write_site_node_config

    root = check_sites(cfg)
    write_site_node_config(cfg, root)
    run_id = uuid.uuid4().int >> 65                 # Flower's run ids: 63 bits
    n = cfg.federation.num_sites        # node config as Flower's simulation engine sets it
    sites = {f"site-{i}": {wire.NODE_PARTITION_ID: i, "num-partitions": n} for i in range(n)}
    grid = InProcessGrid(sites, sim_data_root=root, mods=client_mods, run_id=run_id)
    run_dir = new_run_dir(cfg)
    # what Flower's process sets before an app runs (its messages are stamped with it)
    with mock.patch.multiple(TaskIdentity, _run_id=run_id, _task_id=1, _node_id=0):
        make_server_app(cfg, run_dir)(grid, Context(run_id=run_id, node_id=0, node_config={},
                                                    state=RecordDict(), run_config={}))
    return run_dir
