"""Flower ClientApp: thin handlers that decode, call the engine, and encode the reply."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from models.metrics import SplitMetrics
from protocol import wire
from protocol.metrics import to_record as metrics_record
from protocol.partial import local_keys

from .data.sequences import SEQUENCES
from .data.views import WithoutSequence
from .engine import Engine
from .foundation import FoundationRefused, check_site_model, expected_arrays, site_foundation_dir
from .job import Job, decode_job
from .mods.errors import generic_errors_mod
from .mods.packing import packing_mod
from .mods.require_secagg import require_secagg_mod
from .mods.secagg import secagg_mod, update_protection
from .mods.sitedp import site_dp_clipping_mod
from .privacy.declared import declared_policy
from .privacy.policy import (admission_digest, admit_round, check_protection, node_settings,
                             releasable_metrics, state_dir)
from .queries import (QueryLimits, QueryRefused, SiteQueryLog, arrays_digest, has_small_count,
                      label_counts, split_counts, suppress_small_counts)
from .readiness import asks_for_job, job_readiness, served_layout
from .rebuilt_app import RebuiltClientApp
from .runtime import (SiteConfigError, SiteDataCache, resolve_site,
                      simulation_cache_bytes, site_logger)

# Site-owned state across rounds (node context state; never sent).
STATE_LOCAL_PARAMS = "medfed.local-params"      # FedBN-style parameters kept at the site
STATE_PERSONAL_MODEL = "medfed.personal-model"  # the model after this site's last local training
STATE_OBJECTIVE = "medfed.objective"            # + task name: e.g. DINO's teacher and centres


def load_global(model, content: RecordDict, job: Job, context: Context, *,
                site_base: bool = False) -> list[str]:
    """Load the global weights (trained and, if sent apart, frozen ones); with partial
    sharing fill the local parameters from the site's own state (first round: the model's
    seeded initial values). Returns local keys.

    ``site_base`` (a foundation model): the frozen base is this site's own, already in
    ``model``; the message must hold exactly its trainable arrays and no base weights."""
    state = dict(model.state_dict())
    local = local_keys(state.keys(), job.local_params) if job.local_params else []
    incoming = content[wire.ARRAYS].to_torch_state_dict()
    if site_base:
        if wire.FROZEN_ARRAYS in content.array_records:
            raise FoundationRefused("the coordinator sent base weights for a foundation model; "
                                    "this site uses only its own")
        expected = expected_arrays(model, local)
        if set(incoming) != expected:
            raise FoundationRefused(
                f"the global arrays are not this site's trainable set for {job.model_name}: "
                f"{len(expected - set(incoming))} missing, {len(set(incoming) - expected)} "
                "unexpected keys")
        incoming = state | incoming          # the base: this site's own, as built
    elif wire.FROZEN_ARRAYS in content.array_records:
        incoming |= content[wire.FROZEN_ARRAYS].to_torch_state_dict()
    missing = set(state) - set(incoming) - set(local)
    if missing or set(incoming) - set(state):
        raise ValueError(f"global model does not match {job.model_name}: "
                         f"{len(missing)} missing, {len(set(incoming) - set(state))} unexpected keys")
    if local and STATE_LOCAL_PARAMS in context.state:
        incoming |= context.state[STATE_LOCAL_PARAMS].to_torch_state_dict()
    state |= incoming
    model.load_state_dict(state)
    return local


def make_client_app(*, sim_data_root: Path | None = None, sim_train_sites: int | None = None,
                    mods=(), data_cache: SiteDataCache | None = None) -> ClientApp:
    """Build the site's ClientApp.

    Parameters
    ----------
    sim_data_root : Path, optional
        Simulation only: directory holding ``site-<partition-id>`` folders.
    sim_train_sites : int, optional
        Simulation only: partition ids from this one on are the ``external`` folder (an
        evaluation-only site, with ``role = "external"`` in its node-config.toml).
    mods : sequence
        Extra Flower client mods (auditing, fault drills), outermost first; site-level DP
        clipping is always installed innermost, the site's egress controls outermost.
    data_cache : SiteDataCache, optional
        The loaded sites' cache (default: a deployed site's; with ``sim_data_root`` a
        :meth:`SiteDataCache.for_simulation`, whose temp folder its caller closes:
        ``medfed.simulation.simulate`` when the simulation ends).
    """
    def site_settings(context: Context) -> dict:
        site = resolve_site(context, sim_data_root, sim_train_sites)
        return node_settings(context.node_config, site.data_dir, simulated=site.simulated)

    # Innermost first to act on the reply: site-level DP clips the update as the handler
    # produced it, then secure aggregation masks the clipped update. Outermost, the site's
    # own controls see exactly what leaves: require-secagg on the reply's arrays, then
    # generic error reasons (the coordinator never reads a site's exception text). Between
    # them, a deployed coordinator's packed tensors are unpacked on the way in and the reply
    # packed on the way out (the same arrays, one object on the wire: protocol.packing).
    # A deployed site's runner serves one site: a few entries (tasks). A simulation process
    # serves any of the simulated sites, one after the other, each round: every site it
    # meets, within a memory budget (an LRU of a few would miss every time at 40 sites).
    # Simulated sites share one decode per site through the simulation's temp folder.
    cache = data_cache if data_cache is not None else \
        SiteDataCache.for_simulation(simulation_cache_bytes()) if sim_data_root is not None \
        else SiteDataCache()
    # Pickled (a simulation, per message) as this call with the same cache: client/rebuilt_app.py
    app = RebuiltClientApp(
        mods=[generic_errors_mod, packing_mod, require_secagg_mod(site_settings), *mods,
              secagg_mod, site_dp_clipping_mod],
        rebuild=partial(make_client_app, sim_data_root=sim_data_root,
                        sim_train_sites=sim_train_sites, mods=tuple(mods), data_cache=cache))

    def prepare(msg: Message, context: Context, *, training: bool = False):
        site = resolve_site(context, sim_data_root, sim_train_sites)
        if training and site.role == wire.ROLE_EXTERNAL:
            raise SiteConfigError(f"{site.site_id} is an external site (node config "
                                  f"{wire.NODE_ROLE!r}): it evaluates, it never trains")
        job = decode_job(msg.content[wire.CONFIG], site_seed=site.seed)
        settings = node_settings(context.node_config, site.data_dir, simulated=site.simulated)
        limits = QueryLimits.from_settings(settings, simulated=site.simulated)
        build = partial(job.build, foundation_dir=site_foundation_dir(settings, site.data_dir))
        limits.check_model_size(build, batch=job.train.batch_size       # sized on the
                                * job.privacy.augmentation_multiplicity,  # meta device first
                                per_sample=job.privacy.mechanism == wire.DP_SGD)
        torch.manual_seed(job.train.seed)        # seeded init: local parameters of round 1
        model, task = build()
        site_base = check_site_model(model, job)
        layout = served_layout(job.layout, settings, simulated=site.simulated)
        data, splits = cache.get(site, job.class_names, job.image_size, task.data_needs, layout)
        if job.class_names:        # every count below is of the studies the class list names
            limits.check_class_list(data.unlisted)
        local = load_global(model, msg.content, job, context, site_base=site_base)
        return site, job, splits, model, Engine(task, site.device), data, local

    def foundation_dir(site, context: Context) -> Path | None:
        """The site's own directory of pretrained encoders (node config), never the job's."""
        settings = node_settings(context.node_config, site.data_dir, simulated=site.simulated)
        return site_foundation_dir(settings, site.data_dir)

    def site_queries(site, context: Context) -> tuple[dict, SiteQueryLog]:
        """The site's node settings and its query log for this run (in its state dir)."""
        settings = node_settings(context.node_config, site.data_dir, simulated=site.simulated)
        return settings, SiteQueryLog(state_dir(settings, site.data_dir), context.run_id)

    def site_record(site, data, queries: SiteQueryLog, limits: QueryLimits) -> ConfigRecord:
        """Who answers and its data manifest; the ingest counts (small cells suppressed, the
        others as ranges, at the site's smallest reported count) in the first reply of a run
        only - the server logs them once, so later copies would only be more chances to
        read them."""
        identity = {wire.SITE_ID: site.site_id, wire.MANIFEST: data.fingerprint}
        if queries.first_message():
            identity[wire.INGEST] = json.dumps(
                suppress_small_counts(data.report.as_dict(), limits.min_split_size),
                sort_keys=True)
        return ConfigRecord(identity)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site, job, splits, model, engine, data, local = prepare(msg, context, training=True)
        settings, queries = site_queries(site, context)
        masked, signed, session = update_protection(msg, context)
        admission = admission_digest(job, secure_aggregation=masked, survivors_signed=signed,
                                     session=session, weights=arrays_digest(msg.content))
        check_protection(job, settings, secure_aggregation=masked)
        cached = queries.cached_reply(job.task_name, job.server_round, admission)
        if cached is not None:      # a replayed round: the same bytes, never a second update
            site_logger(site.site_id).info("round %d: repeated train request answered with "
                                           "the reply already sent", job.server_round)
            return Message(content=cached, reply_to=msg)
        limits = QueryLimits.from_settings(settings, simulated=site.simulated)
        try:
            limits.check_training_size(len(splits["train"]))    # before the ledger is charged
        except QueryRefused:                # the count and a likely cause: its own log only
            site_logger(site.site_id).warning(
                "round %d: %d labelled training studies for this job's class list, fewer than "
                "%s=%d: refusing to train (are the labels in labels.csv, named as the job's "
                "classes?)", job.server_round, len(splits["train"]), wire.NODE_MIN_EVAL_SPLIT,
                limits.min_split_size)
            raise
        same_run = queries.privacy_runs(job.task_name, job.privacy.run_id) \
            if job.privacy.mechanism != wire.DP_NONE else frozenset()
        auth = admit_round(job, settings, site.data_dir, n_train=len(splits["train"]),
                           count_floor=limits.min_split_size, secure_aggregation=masked,
                           survivors_signed=signed, same_run=same_run)
        objective_key = f"{STATE_OBJECTIVE}.{job.task_name}"
        if objective_key in context.state:       # stored only for a task that keeps state
            engine.task.load_site_state(model, context.state[objective_key].to_torch_state_dict())
        private = auth is not None and auth.dpsgd is not None
        if not private and not site.simulated:
            # A deployed site's data order and augmentation are fresh each round, so two
            # rounds cannot be compared sample by sample; simulation keeps the job's seeds
            # (a resumed run is bit-identical). DP-SGD rounds keep theirs (the accountant's).
            job = replace(job, train=replace(job.train, seed=int.from_bytes(os.urandom(4), "big")))
        splits["train"].reseed(job.train.seed)
        metrics = engine.fit(model, splits["train"], job.train,
                             privacy=auth.dpsgd if auth else None)
        kept = engine.task.site_state()
        if kept is not None:                        # kept here; never part of the reply
            context.state[objective_key] = ArrayRecord(kept)
        metrics = releasable_metrics(metrics, auth)
        if has_small_count(label_counts(splits["train"].labels, len(job.class_names),
                                        multi_label=engine.task.data_needs.multi_label),
                           limits.min_split_size):
            # training loss and accuracy of weights the coordinator chose count a class's
            # studies (a head that always answers k: accuracy x n); a small class: not sent
            metrics = {k: v for k, v in metrics.items() if not k.startswith("train_")}
            site_logger(site.site_id).info(
                "round %d: training loss/accuracy not sent (a class of the training split has "
                "fewer studies than %s)", job.server_round, wire.NODE_MIN_EVAL_SPLIT)
        state = model.state_dict()
        if local:
            context.state[STATE_LOCAL_PARAMS] = ArrayRecord({k: state[k] for k in local})
        if job.personalize:
            context.state[STATE_PERSONAL_MODEL] = ArrayRecord(state)
        site_logger(site.site_id).info("round %d: trained on %d studies in %.1fs%s",
                                       job.server_round, len(splits["train"]), metrics["seconds"],
                                       " (the class head alone)" if job.train.head_only else "")
        reply = MetricRecord({k: v for k, v in metrics.items() if k != "seconds"}
                             | {wire.NUM_EXAMPLES: len(splits["train"]),
                                wire.TRAIN_SECONDS: metrics["seconds"]})
        # Only what the server sent as trainable goes back: never local or frozen weights.
        sent = set(msg.content[wire.ARRAYS].keys()) - set(local)
        shared = ArrayRecord({k: v for k, v in state.items() if k in sent})
        content = RecordDict({wire.ARRAYS: shared, wire.METRICS: reply,
                              wire.SITE: site_record(site, data, queries, limits)})
        queries.store_reply(job.task_name, job.server_round, content, admission)
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        """Score the global model (and, with personalization, the site's own) on the
        evaluation splits - a query on the site's data, so budgeted (``client.queries``):
        one weight vector per (run, task, round), at most ``max-evaluations-per-run``
        requests (and ``max-evaluations-per-day`` and ``max-evaluations-total`` over all
        runs), and splits below ``min-eval-split-size`` studies, or holding a smaller count
        (a class, a task's count: ``evaluate_split``), reported as suppressed."""
        site, job, splits, model, engine, data, _ = prepare(msg, context)
        settings, queries = site_queries(site, context)
        limits = QueryLimits.from_settings(settings, simulated=site.simulated)
        queries.admit_evaluation(job.task_name, job.server_round, arrays_digest(msg.content),
                                 limits)
        external = site.role == wire.ROLE_EXTERNAL    # scores every labelled study it has
        reply, seconds = MetricRecord(), 0.0
        models = [("", model)]
        if job.personalize and not external:   # the locally adapted model
            personal, _ = job.build(foundation_dir=foundation_dir(site, context))
            personal.load_state_dict(context.state[STATE_PERSONAL_MODEL].to_torch_state_dict()
                                     if STATE_PERSONAL_MODEL in context.state
                                     else model.state_dict())
            models.append((wire.PERSONAL_PREFIX, personal))
        names = (wire.EXTERNAL_SPLIT,) if external else wire.EVAL_SPLITS
        views = {split: splits[split] for split in names}
        if msg.content[wire.CONFIG].get(wire.EVAL_MISSING, False):   # each sequence missing
            prefix = wire.EXTERNAL_WITHOUT_PREFIX if external else wire.WITHOUT_PREFIX
            views |= {f"{prefix}{seq}": WithoutSequence(splits[names[-1]], j)   # test / external
                      for j, seq in enumerate(job.layout.input_channels if job.layout
                                              else SEQUENCES)}
        reported = 0                    # studies of the splits whose metrics are sent
        for prefix, candidate in models:
            for split, view in views.items():
                metrics, suppressed = evaluate_split(engine, candidate, view,
                                                     limits.min_split_size,
                                                     job.train.batch_size,
                                                     len(job.class_names))
                if suppressed and len(view) >= limits.min_split_size:   # why: its own log
                    site_logger(site.site_id).info(
                        "round %d: %s%s figures not sent: one of its counts (a class, or the "
                        "task's own, e.g. reports or undefined distances) is below %s=%d",
                        job.server_round, prefix, split, wire.NODE_MIN_EVAL_SPLIT,
                        limits.min_split_size)
                reply.update(metrics_record(metrics, f"{prefix}{split}", suppressed=suppressed))
                seconds += metrics.seconds
                reported += metrics.n if not prefix and split in names else 0
        # a suppressed split's size must not come back as the difference of two counts
        reply[wire.NUM_EXAMPLES] = reported
        if job.privacy.mechanism == wire.DP_SITE:   # the server weighs every reply by it
            reply[wire.DP_UNIT_WEIGHT] = 1.0
        reply[wire.EVAL_SECONDS] = seconds
        identity = site_record(site, data, queries, limits)
        return Message(content=RecordDict({wire.METRICS: reply, wire.SITE: identity}), reply_to=msg)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        """The server asks who this site is (its role) or, before a run, its policy
        (``protocol.policy``); answered from node config and the site's ledger only, and,
        asked with the run's job, whether it can serve it (``client.readiness``: flags)."""
        asked = msg.content.config_records.get(wire.CONFIG, ConfigRecord()).get(wire.QUERY)
        if asked not in (wire.QUERY_ROLE, wire.QUERY_POLICY):
            raise ValueError(f"unknown query {asked!r}")
        site = resolve_site(context, sim_data_root, sim_train_sites)
        content = RecordDict({wire.SITE: ConfigRecord({wire.SITE_ID: site.site_id,
                                                       wire.NODE_ROLE: site.role})})
        if asked == wire.QUERY_POLICY:
            settings = node_settings(context.node_config, site.data_dir, simulated=site.simulated)
            policy = declared_policy(settings, site.data_dir, site_id=site.site_id,
                                     role=site.role)
            config = msg.content[wire.CONFIG]
            if asks_for_job(config):      # what of the job it can serve: flags only
                ready = job_readiness(config, settings, site.data_dir,
                                      simulated=site.simulated)
                policy = replace(policy, layout_ok=ready.layout_ok,
                                 weights_found=ready.weights_found,
                                 weights_match=ready.weights_match,
                                 dp_refusal=ready.dp_refusal,
                                 size_refusal=ready.size_refusal)
            content[wire.POLICY] = policy.to_record()
        return Message(content=content, reply_to=msg)

    def evaluate_split(engine: Engine, model, data, min_size: int, batch_size: int,
                       num_classes: int) -> tuple[SplitMetrics, bool]:
        """The split's metrics and whether it is suppressed: 1..min_size-1 studies (never
        evaluated, its size never sent), or any other count of the split in 1..min_size-1
        (``client.queries.split_counts``: a class of its labels or of its confusion, a
        task's own count such as CLIP's ``n_reports`` or what it leaves of ``n``). An empty
        or suppressed split answers with the evaluator's ``n = 0`` result, so every site
        sends the task's full key set (Flower requires it). ``batch_size``: the job's, which
        the site's size check counted; ``num_classes``: the job's class list's length."""
        if len(data) == 0 or len(data) < min_size:
            return engine.task.evaluator().compute(), len(data) > 0
        metrics = engine.evaluate(model, data, batch_size)
        counts = split_counts(metrics, data.labels, num_classes,
                              multi_label=engine.task.data_needs.multi_label)
        if has_small_count(counts, min_size):
            return engine.task.evaluator().compute(), True
        return metrics, False

    return app


app = make_client_app()
