"""MLflow tracking, server side only: one run per experiment, every global model registered.

Only numbers, ids, hashes and the operator's config reach MLflow: site metrics, manifest
fingerprints, ingest counts. The model's ``input_example`` is an all-zero tensor, never a
patient image. The writes happen off the round loop (``server/registration.py``); how a
global model becomes a version is ``server/versions.py``.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord

from models.tasks import build
from protocol import wire
from protocol.metrics import from_record, report_splits
from strategies.observed import RoundRecord
from strategies.pooling import pool

from .checkpoint import CheckpointError, arrays_digest, round_arrays, round_digest
from .config import ExperimentConfig
from .model_export import TRACING, ReusedExport, sweep_exports
from .registration import BackgroundWriter, RoundWrites, recover
from .versions import ensure_registered_model, prepare_export, register_version

log = logging.getLogger("medfed.server")


def tracking_uri(cfg: ExperimentConfig, run_dir: Path) -> str:
    return cfg.tracking.uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


class MlflowTracker:
    """Round observer that writes an experiment's metrics and model versions to MLflow."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path, resume_run_id: str | None = None,
                 lineage: dict[str, str] | None = None, store_dir: Path | None = None,
                 initial: ArrayRecord | None = None):
        """``initial``: the phase's initial global model, whose export template is then
        traced (:meth:`prepare`) before this tracker sets up its MLflow run (a fresh phase;
        a resumed one prepares after :meth:`recover`, which registers on this thread)."""
        self.cfg = cfg
        self.run_dir = run_dir
        self._round: RoundWrites | None = None    # this round's writes, until its end
        # The registry's slow part (export, upload, registration) off the round loop; the
        # phase's model traced once (its graph is the same every round), on the writer.
        # Its template folder lives in the run directory (a killed run's is removed here,
        # by the resume), not in the system's temp folder, where nothing would remove it.
        run_dir.mkdir(parents=True, exist_ok=True)
        if swept := sweep_exports(run_dir):       # said, not silent
            log.info("removed %d export template folder(s) a killed server left in %s",
                     swept, run_dir)
        self.export = ReusedExport(parent=run_dir)
        self._froze = False              # prepare() froze the heap (gc.freeze) for the phase
        self.writer = BackgroundWriter(run_dir, log_round=self._log_round,
                                       register=self._register)
        # The trace (~2 s of CPU) starts first: the MLflow set-up below (a new sqlite
        # store's schema, the run, its params: ~4 s wall under load) and round 1's first
        # exchanges are then its head start, and the template is kept before round 1's
        # replies need the lock (TRACING) to build its model.
        try:
            if initial is not None:
                self.prepare(initial)
            self._start_run(store_dir or run_dir, resume_run_id, lineage)
        except BaseException:
            self._close_writer()        # the trace, if any, is waited for: nothing is left
            raise

    def _start_run(self, store_dir: Path, resume_run_id: str | None,
                   lineage: dict[str, str] | None) -> None:
        import mlflow

        cfg = self.cfg
        self.mlflow = mlflow
        self.uri = tracking_uri(cfg, store_dir)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(self.uri)
        experiment = mlflow.get_experiment_by_name(cfg.tracking.experiment_name)
        if experiment is None:
            artifacts = None if cfg.tracking.uri else (store_dir / "artifacts").resolve().as_uri()
            experiment_id = mlflow.create_experiment(cfg.tracking.experiment_name,
                                                     artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        self.client = mlflow.MlflowClient(self.uri)
        if resume_run_id:           # continue the same MLflow run, never a duplicate
            self.run = mlflow.start_run(run_id=resume_run_id)
            mlflow.set_tag("medfed.resumed", "true")
        else:
            self.run = mlflow.start_run(experiment_id=experiment_id, run_name=cfg.name)
            mlflow.set_tags({"medfed.experiment": cfg.name,
                             "medfed.config_hash": cfg.fingerprint()})
            params = _flatten({k: v for k, v in cfg.to_dict().items() if k != "resume"})
            mlflow.log_params(params)
            mlflow.log_dict(cfg.to_dict(), "config/resolved.json")
        self.lineage = dict(lineage or {})      # parent model version (pretrain -> finetune)
        if self.lineage and not resume_run_id:
            mlflow.set_tags({f"medfed.{k}": v for k, v in self.lineage.items()})
        self.ingest_logged: set[str] = set()
        self.nodes_logged: dict[str, int] = {}     # site id -> the node id tagged for it
        self.privacy_rounds: list[dict] = []      # the privacy report, one entry per round
        self._source_run = None          # this MLflow run as the writer read it

    @property
    def run_id(self) -> str:
        return self.run.info.run_id

    @property
    def versions(self) -> dict[int, str]:
        """Round -> model version registered so far (all of them after :meth:`finish`)."""
        return self.writer.versions

    def prepare(self, arrays: ArrayRecord) -> None:
        """Trace the phase's export template from its initial global model ``arrays`` on the
        writer's thread, while the MLflow run is set up and round 1's sites train (a fresh
        phase: the constructor's ``initial``): the first version, registered during round 2,
        is then written as every later one is (``server/model_export.py``) instead of costing
        rounds 2-4 the trace (~2 s of server CPU, first imports included).

        Nothing is written to MLflow or the run folder: a crash meanwhile loses nothing. A
        template that cannot be made is logged and the first version is traced as before.
        """
        if not self.cfg.tracking.log_models or self.export.ready:   # ready: a recovered round
            return
        # the model is built here, on the round loop's thread (its RNG; see on_train)
        with torch.random.fork_rng(devices=[]):
            model, multi_label = self._global_model(arrays)

        def trace() -> None:
            try:
                prepare_export(self.export, model, multi_label)
            except Exception as err:        # noqa: BLE001 - the first version traces instead
                log.warning("the phase's model could not be traced ahead of its first "
                            "version (%s: %s): that version is traced when registered",
                            type(err).__name__, err)
            # The server's heap is ~0.7 M objects once torch, MLflow and the template are
            # in: a full collection then stalls every thread (the GIL) for ~0.3 s of CPU, in
            # whichever round it happens to fall. Collected once here (usually before round
            # 1 begins) and frozen for the phase (finish() unfreezes): later collections scan
            # only what the rounds allocate. Measured (3 sites, 6 rounds, twice each):
            # without it Python's own full collection fell in round 2 (0.5-0.6 s wall on the
            # writer; round 2's server CPU 0.60-0.63 s vs 0.22-0.23 s with it), and none in
            # rounds 2-6 with it. Whatever else is alive at that moment (round 1's
            # messages, if it has begun) is frozen with it, uncollected until finish().
            gc.collect()
            gc.freeze()
            self._froze = True
        self.writer.start(trace)

    def on_train(self, record: RoundRecord) -> None:
        step = record.round
        writes = RoundWrites(step)
        metrics, tags = writes.metrics, writes.run_tags
        metrics |= {f"train/{k}": v for k, v in record.train_metrics.items()}
        for reply in record.train:
            metrics |= {f"site/{reply.site_id}/train/{k}": v for k, v in reply.metrics.items()}
            writes.artifacts |= self._new_ingest(reply.site_id, reply.ingest)
        self._site_tags(record, record.train, tags)
        metrics["train/sites_ok"] = len(record.train)
        metrics["train/sites_failed"] = len(record.failures.get("train", []))
        for site in record.dropped("train"):             # which site dropped out, by name
            metrics[f"site/{site}/train/dropped"] = 1.0
            tags[f"dropped.round-{step}.{site}"] = "train"
        metrics["train/updates_rejected"] = len(record.rejected)
        metrics |= {f"site/{site}/train/update_norm": n for site, n in record.update_norms.items()}
        for rejection in record.rejected:
            metrics[f"site/{rejection.site_id}/train/update_rejected"] = 1.0
            tags[f"rejected.round-{step}.{rejection.site_id}"] = rejection.reason[:250]
        if record.secagg_clipped is not None:
            metrics["secagg/clipped_values"] = float(record.secagg_clipped)
        if record.secagg_capped is not None:
            metrics["secagg/capped_sites"] = float(record.secagg_capped)
        privacy = self._privacy(record)
        metrics |= {f"privacy/{k}": v for k, v in privacy.items() if isinstance(v, float)}
        if record.arrays is not None and self.cfg.tracking.log_models:
            # fork_rng: the build's own draws (weight init) leave the server's torch RNG as
            # it was, which is exact only while nothing on the writer's thread sets that RNG
            # meanwhile. Its export is mlflow's non-strict torch.export (torch 2.13): it
            # neither draws from nor saves/restores the global RNG (checked by
            # test_the_writers_export_leaves_the_torch_rng_alone); strict export (dynamo)
            # would restore a state it saved on entry, undoing draws made here meanwhile.
            with torch.random.fork_rng(devices=[]):     # the round's arrays, decoded once
                writes.model, writes.multi_label = self._global_model(record.values())
            writes.arrays_sha256 = round_digest(record)     # the checkpoint's too
            writes.version_tags = self._version_tags(record, privacy, writes.arrays_sha256)
        self._flush()        # a round that never reached its end (a test, a failed round)
        self._round = writes

    def _global_model(self, arrays: ArrayRecord | dict[str, np.ndarray]
                      ) -> tuple[torch.nn.Module, bool]:
        """The global model to register (``arrays``: its weights, or their values already
        decoded, which are copied, never kept), and whether its head is multi-label. Never
        while the writer traces (``TRACING``: the trace patches every module's ``__call__``)."""
        state = arrays.to_torch_state_dict() if isinstance(arrays, ArrayRecord) else \
            {k: torch.from_numpy(v) for k, v in arrays.items()}
        with TRACING:
            model, task = build(self.cfg.model.name, self.cfg.model_options(),
                                self.cfg.task.name, self.cfg.task_options(),
                                foundation_dir=self.cfg.model.foundation_dir)
            model.load_state_dict(state)
        return model, task.data_needs.multi_label

    def _version_tags(self, record: RoundRecord, privacy: dict, digest: str) -> dict[str, str]:
        sites = sorted(r.site_id for r in record.train)
        tags = {"round": str(record.round), "sites": ",".join(sites),
                "weights": f"weights/round-{record.round}",
                "config_hash": self.cfg.fingerprint(), "experiment": self.cfg.name,
                "mlflow_run_id": self.run_id, "arrays_sha256": digest}
        tags |= {f"manifest.{r.site_id}": r.manifest for r in record.train}
        return tags | self._privacy_tags(privacy) | self.lineage | {"task": self.cfg.task.name}

    def _flush(self) -> None:
        if self._round is not None:
            self.writer.submit(self._round)
            self._round = None

    def _privacy(self, record: RoundRecord) -> dict:
        """This round's guarantee: per-site epsilon from each site's ledger (as it reported),
        and for site-level DP the server accountant's epsilon."""
        p = self.cfg.privacy
        if p.mechanism == "none":
            return {}
        sites = {r.site_id: r.metrics for r in record.train if wire.DP_EPSILON in r.metrics}
        out: dict = {f"epsilon.{s}": float(m[wire.DP_EPSILON]) for s, m in sites.items()}
        out |= {f"delta.{s}": float(m[wire.DP_DELTA]) for s, m in sites.items()}
        out |= {f"noise_multiplier.{s}": float(m[wire.DP_NOISE_MULTIPLIER])
                for s, m in sites.items() if wire.DP_NOISE_MULTIPLIER in m}
        if sites:
            out["epsilon_max"] = max(float(m[wire.DP_EPSILON]) for m in sites.values())
        if record.site_level_epsilon is not None:
            out["site_level_epsilon"] = float(record.site_level_epsilon)
        self.privacy_rounds.append({"round": record.round, **out})
        return out

    def _privacy_tags(self, privacy: dict) -> dict[str, str]:
        p = self.cfg.privacy
        if p.mechanism == "none":
            return {"privacy.mechanism": "none"}
        tags = {"privacy.mechanism": p.mechanism, "privacy.accountant": p.accountant}
        if p.mechanism == "dp-sgd":
            tags["privacy.max_grad_norm"] = f"{p.max_grad_norm:g}"
        else:
            tags |= {"privacy.clipping_norm": f"{p.clipping_norm:g}",
                     "privacy.server_noise_multiplier": f"{p.noise_multiplier:g}",
                     "privacy.site_level_delta": f"{p.delta:g}"}
        tags |= {f"privacy.{k}": f"{v:.4g}" for k, v in privacy.items() if k != "epsilon_max"}
        return tags

    def on_round_end(self, record: RoundRecord) -> None:
        step = record.round
        writes = self._round if self._round is not None and self._round.round == step \
            else RoundWrites(step)
        self._round = None
        metrics = writes.metrics
        metrics |= {"round/wall_seconds": record.wall_seconds,
                    "eval/sites_ok": len(record.evaluate),
                    "eval/sites_failed": len(record.failures.get("evaluate", [])),
                    "eval/replies_rejected": len(record.evaluate_rejected)}
        self._site_tags(record, record.evaluate, writes.run_tags)
        for rejection in record.evaluate_rejected:       # as rejected updates are (on_train)
            metrics[f"site/{rejection.site_id}/evaluate/rejected"] = 1.0
            writes.run_tags[f"eval-rejected.round-{step}.{rejection.site_id}"] = \
                rejection.reason[:250]
        # training sites report val/test, external sites (evaluation only) their own split
        splits = dict.fromkeys(s for r in record.evaluate for s in report_splits(r.metrics))
        for split in splits:
            per_site = []
            for reply in record.evaluate:
                if split not in report_splits(reply.metrics):
                    continue
                local = from_record(reply.metrics, split)
                per_site.append(local)
                site = f"site/{reply.site_id}/{split}"
                # Always record how many examples a site evaluated (0 for a site with no
                # labelled data in this split); the figures themselves only when measured -
                # scalars only: confusion counts stay out of the per-site metrics.
                metrics[f"{site}/n"] = float(local.n)
                if local.n > 0:
                    metrics |= {f"{site}/{k}": v for k, v in local.scalars().items()}
                    metrics[f"{site}/seconds"] = local.seconds
            pooled = pool(per_site)
            metrics |= {f"{split}/{k}": v for k, v in pooled.items()}
            if writes.model is not None and split in ("test", wire.EXTERNAL_SPLIT):
                writes.version_tags |= {f"{split}_{key}": f"{pooled[key]:.4f}"
                                        for key in ("mcc", "auroc", "accuracy") if key in pooled}
        self.writer.submit(writes)      # journalled before the round's checkpoint is written

    def _site_tags(self, record: RoundRecord, replies: list, tags: dict[str, str]) -> None:
        """Which node each site's records come from (``site/<id>/node_id``, when first seen in
        this phase), and each site id the run refused a node (``strategies.site_names``)."""
        for reply in replies:
            if self.nodes_logged.get(reply.site_id) != reply.node_id:
                self.nodes_logged[reply.site_id] = reply.node_id
                tags[f"site/{reply.site_id}/node_id"] = str(reply.node_id)
        for refused in record.names_refused:
            tags[f"site-id-refused.round-{record.round}.node-{refused.node}"] = \
                str(refused)[:250]

    def _new_ingest(self, site_id: str, ingest: str) -> dict[str, dict]:
        """A site's ingest counts as an artifact to write, the first time it sends them."""
        if site_id in self.ingest_logged or not ingest:
            return {}
        self.ingest_logged.add(site_id)
        return {f"sites/{site_id}/ingest.json": json.loads(ingest)}

    def _close_writer(self) -> None:
        self.writer.close()
        self.export.close()
        if self._froze:             # the phase's heap is collectable again (prepare())
            gc.unfreeze()

    def _log_round(self, writes: RoundWrites) -> None:
        """One round's metrics and run tags, in as few calls as MLflow's batch limits allow
        (and the sites' ingest counts, the first time each site reports them)."""
        from mlflow.entities import Metric, RunTag

        millis = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id,
            metrics=[Metric(k, float(v), millis, writes.round) for k, v in writes.metrics.items()],
            tags=[RunTag(k, v) for k, v in writes.run_tags.items()], synchronous=True)
        for path, content in writes.artifacts.items():
            self.client.log_dict(self.run_id, content, path)

    def _register(self, writes: RoundWrites) -> str:
        if self._source_run is None:        # once per phase: the registered model, and the
            ensure_registered_model(self.client, self.cfg.tracking.registered_model)
            self._source_run = self.client.get_run(self.run_id)   # run's params, experiment
        return register_version(self.cfg, self.mlflow, self.client, self.run_id, writes,
                                self.export, self._source_run)

    def latest_version(self) -> str | None:
        """The newest version this phase registered (also when resumed after its last round);
        waits for the versions still queued."""
        self._flush()
        self.writer.drain()
        if self.versions:
            return self.versions[max(self.versions)]
        if not self.cfg.tracking.log_models:
            return None
        found = self.client.search_model_versions(
            f"name='{self.cfg.tracking.registered_model}' and tags.config_hash="
            f"'{self.cfg.fingerprint()}'")
        newest = max((int(v.version) for v in found), default=None)
        return None if newest is None else str(newest)

    def recover(self, checkpoint_round: int) -> list[int]:
        """Resuming: make this MLflow run agree with the newest checkpoint, round
        ``checkpoint_round`` (``server/registration.py``); the rounds written again."""
        name = self.cfg.tracking.registered_model
        found: dict[int, list[str]] = {}
        for v in self.client.search_model_versions(
                f"name='{name}' and tags.mlflow_run_id='{self.run_id}'"):
            if str(v.tags.get("round", "")).isdigit():
                found.setdefault(int(v.tags["round"]), []).append(str(v.version))
        return recover(self.run_dir, checkpoint_round=checkpoint_round, versions_of_run=found,
                       delete_version=lambda version: self.client.delete_model_version(
                           name, version),
                       rewrite=self._rewrite, log_round=self._log_round,
                       register=self._register, versions=self.writer.versions)

    def _rewrite(self, entry: dict) -> RoundWrites:
        """A journalled round's writes, its model from that round's checkpoint."""
        rnd = int(entry["round"])
        writes = RoundWrites(rnd, metrics=dict(entry["metrics"]), run_tags=dict(entry["run_tags"]),
                             artifacts=dict(entry.get("artifacts", {})),
                             version_tags=dict(entry["version_tags"]),
                             arrays_sha256=entry["arrays_sha256"])
        if entry["version"]:
            arrays = round_arrays(self.run_dir, rnd)
            if arrays_digest(arrays) != entry["arrays_sha256"]:
                raise CheckpointError(f"the checkpoint of round {rnd} does not hold the weights "
                                      "its queued model version was made from")
            with torch.random.fork_rng(devices=[]):    # the resumed RNG state stays as saved
                writes.model, writes.multi_label = self._global_model(arrays)
        return writes

    def finish(self, summary: str, status: str = "FINISHED") -> None:
        """End the MLflow run once everything queued is written (a failed run: what was
        queued is written still, and a write error is logged, not raised)."""
        error = None
        try:
            self._flush()
            self.writer.drain(raise_error=status == "FINISHED")
        except RuntimeError as err:         # the run's record is incomplete: it failed
            error, status = err, "FAILED"
        finally:
            self._close_writer()
        self.mlflow.log_text(summary, "summary.txt")
        if self.cfg.privacy.mechanism != "none":
            report = {"mechanism": self.cfg.privacy.mechanism,
                      "requested": dataclasses.asdict(self.cfg.privacy),
                      "note": "per-site epsilon is what each site's own ledger reported after "
                              "the round (all its runs composed); evaluation metrics are not "
                              "covered by the guarantee",
                      "rounds": self.privacy_rounds}
            self.mlflow.log_dict(report, "privacy/report.json")
        self.mlflow.end_run(status=status)
        if error is not None:
            raise error


def _flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= _flatten(v, f"{key}.")
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out
