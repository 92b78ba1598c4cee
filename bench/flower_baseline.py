"""A plain Flower app: the anchor that MedFed's framework cost is measured against.

The same model (built from the same config), the same number of sites, studies per site,
local epochs, batch size and learning rate, in Flower's simulation engine with the same
backend settings - but nothing of MedFed around it: Flower's ``FedAvg`` on the server, a
ClientApp that trains on tensors already in memory (random images of the real input shape)
and evaluates on others. No DICOM, no privacy checks, no MLflow, no checkpoints, no console.
Each round is timed exactly as MedFed's ``RoundRecord.wall_seconds``: from sampling sites for
training to the end of aggregating their evaluations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from models.serving import servable
from models.tasks import build
from server.config import ExperimentConfig


@dataclass(frozen=True)
class SiteSize:
    """How many studies a site trains and evaluates on (from the MedFed run it mirrors)."""

    train: int
    evaluate: int


def _model(cfg: ExperimentConfig):
    model, task = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options())
    return model


def input_shape(cfg: ExperimentConfig) -> tuple[int, ...]:
    """One study's input as the model takes it (sequences, then spatial dimensions)."""
    return tuple(servable(_model(cfg)).input_shape)


class TimedFedAvg(FedAvg):
    """FedAvg that records each round's wall time and its sites' compute seconds."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rounds: list[dict] = []
        self._started = 0.0
        self._cpu = 0.0
        self._train: dict[int, float] = {}

    def configure_train(self, server_round, arrays, config, grid):
        now, cpu = time.perf_counter(), time.process_time()
        if self.rounds:     # the previous round, start to start, and this process's CPU
            self.rounds[-1] |= {"cycle_s": now - self._started, "server_cpu_s": cpu - self._cpu}
        self._started, self._cpu = now, cpu
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self._train = {m.metadata.src_node_id: float(m.content["metrics"]["train-seconds"])
                       for m in replies if m.has_content()}
        return super().aggregate_train(server_round, replies)

    def aggregate_evaluate(self, server_round, replies):
        replies = list(replies)
        out = super().aggregate_evaluate(server_round, replies)
        evals = {m.metadata.src_node_id: float(m.content["metrics"]["eval-seconds"])
                 for m in replies if m.has_content()}
        compute = {n: self._train.get(n, 0.0) + evals.get(n, 0.0)
                   for n in set(self._train) | set(evals)}
        wall = time.perf_counter() - self._started
        slowest = max(compute.values(), default=0.0)
        self.rounds.append({"round": server_round, "wall_s": wall, "slowest_site_s": slowest,
                            "sum_site_s": sum(compute.values()), "sites": len(compute),
                            "overhead": (wall - slowest) / wall if wall > 0 else 0.0})
        return out


def make_apps(cfg: ExperimentConfig, sizes: list[SiteSize], rounds: int, mods=()
              ) -> tuple[ServerApp, ClientApp, TimedFedAvg]:
    """The plain ServerApp and ClientApp for ``len(sizes)`` sites (partition i has sizes[i]);
    ``mods``: client mods (a benchmark's own meters)."""
    shape = input_shape(cfg)
    classes = len(cfg.task.class_names)
    train_cfg = cfg.train
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=1.0,
                           min_train_nodes=len(sizes), min_evaluate_nodes=len(sizes),
                           min_available_nodes=len(sizes))
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(cfg.seed)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(_model(cfg).state_dict()),
                       num_rounds=rounds, timeout=cfg.federation.round_timeout,
                       train_config=ConfigRecord({"lr": float(train_cfg.lr)}))

    client = ClientApp(mods=list(mods))

    def site(context: Context) -> tuple[torch.nn.Module, SiteSize, torch.Generator]:
        pid = int(context.node_config["partition-id"])
        return _model(cfg), sizes[pid], torch.Generator().manual_seed(pid)

    def batches(n: int, gen: torch.Generator):
        for start in range(0, n, train_cfg.batch_size):
            b = min(train_cfg.batch_size, n - start)
            yield (torch.randn(b, *shape, generator=gen), torch.ones(b, shape[0], dtype=torch.bool),
                   torch.randint(classes, (b,), generator=gen))

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        model, size, gen = site(context)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        started = time.perf_counter()
        optimizer = torch.optim.AdamW(model.parameters(), lr=float(train_cfg.lr))
        model.train()
        loss = torch.zeros(())
        for _ in range(train_cfg.local_epochs):
            for image, present, label in batches(size.train, gen):
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(image, present), label)
                loss.backward()
                optimizer.step()
        seconds = time.perf_counter() - started
        metrics = MetricRecord({"train_loss": float(loss), "num-examples": size.train,
                                "train-seconds": seconds})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                   "metrics": metrics}), reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        model, size, gen = site(context)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        started = time.perf_counter()
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for image, present, label in batches(size.evaluate, gen):
                total += float(torch.nn.functional.cross_entropy(model(image, present), label,
                                                                 reduction="sum"))
                n += len(label)
        metrics = MetricRecord({"loss": total / max(n, 1), "num-examples": max(n, 1),
                                "eval-seconds": time.perf_counter() - started})
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return server, client, strategy


def run_plain_flower(cfg: ExperimentConfig, sizes: list[SiteSize], rounds: int, mods=()
                     ) -> list[dict]:
    """Run the plain app in Flower's simulation (MedFed's backend settings); its rounds."""
    import os

    from flwr.simulation import run_simulation

    from medfed.simulation import offline_environment

    offline_environment()
    torch.set_num_threads(1)
    server, client, strategy = make_apps(cfg, sizes, rounds, mods)
    fed = cfg.federation
    run_simulation(server_app=server, client_app=client, num_supernodes=len(sizes),
                   backend_config={
                       "client_resources": {"num_cpus": fed.cpus_per_site,
                                            "num_gpus": fed.gpus_per_site},
                       "init_args": {"include_dashboard": False,
                                     "num_cpus": max(os.cpu_count() or 1, 1),
                                     "logging_level": "ERROR"}})
    return strategy.rounds
