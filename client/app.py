"""Flower ClientApp: thin handlers that decode, call the engine, and encode the reply."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from strategies import wire

from .engine import Engine
from .job import decode_job
from .runtime import SiteDataCache, resolve_site, site_logger


def make_client_app(*, sim_data_root: Path | None = None, mods=()) -> ClientApp:
    """Build the site's ClientApp.

    Parameters
    ----------
    sim_data_root : Path, optional
        Simulation only: directory holding ``site-<partition-id>`` folders.
    mods : sequence
        Flower client mods (privacy, secure aggregation, auditing), applied in order.
    """
    app = ClientApp(mods=list(mods))
    cache = SiteDataCache()

    def prepare(msg: Message, context: Context):
        site = resolve_site(context, sim_data_root)
        job = decode_job(msg.content[wire.CONFIG], site_seed=site.seed)
        data, splits = cache.get(site, job.class_names, job.image_size)
        model = job.build_model()
        model.load_state_dict(msg.content[wire.ARRAYS].to_torch_state_dict())
        identity = ConfigRecord({wire.SITE_ID: site.site_id, wire.MANIFEST: data.fingerprint,
                                 wire.INGEST: json.dumps(data.report.as_dict(), sort_keys=True)})
        return site, job, splits, model, Engine(job.build_task(), site.device), identity

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site, job, splits, model, engine, identity = prepare(msg, context)
        splits["train"].reseed(job.train.seed)
        metrics = engine.fit(model, splits["train"], job.train)
        site_logger(site.site_id).info("round %d: trained on %d studies in %.1fs",
                                       job.server_round, len(splits["train"]), metrics["seconds"])
        reply = MetricRecord({k: v for k, v in metrics.items() if k != "seconds"}
                             | {wire.NUM_EXAMPLES: len(splits["train"]),
                                wire.TRAIN_SECONDS: metrics["seconds"]})
        content = RecordDict({wire.ARRAYS: ArrayRecord(model.state_dict()), wire.METRICS: reply,
                              wire.SITE: identity})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site, job, splits, model, engine, identity = prepare(msg, context)
        reply, seconds = MetricRecord(), 0.0
        for split in wire.EVAL_SPLITS:
            for key, value in evaluate_split(engine, model, splits[split]).items():
                reply[f"{split}-{key}"] = value
            seconds += reply[f"{split}-seconds"]
        reply[wire.NUM_EXAMPLES] = sum(len(splits[s]) for s in wire.EVAL_SPLITS)
        reply[wire.EVAL_SECONDS] = seconds
        return Message(content=RecordDict({wire.METRICS: reply, wire.SITE: identity}), reply_to=msg)

    def evaluate_split(engine: Engine, model, data) -> dict[str, float]:
        """Fixed key set for every site (Flower requires it), even for an empty split."""
        if len(data) == 0:
            n_classes = engine.task.config.num_classes
            empty = {"loss": 0.0, "accuracy": 0.0, "balanced_accuracy": 0.0, "mcc": 0.0,
                     "f1": 0.0, "auroc": 0.0, "seconds": 0.0}
            cells = {f"cm_{i}_{j}": 0.0 for i in range(n_classes) for j in range(n_classes)}
            return empty | cells | {"n": 0.0, wire.AUROC_DEFINED: 0.0}
        metrics = engine.evaluate(model, data)
        defined = "auroc" in metrics
        return metrics | {"n": float(len(data)), "auroc": metrics.get("auroc", 0.0),
                          wire.AUROC_DEFINED: float(defined)}

    return app


app = make_client_app()
