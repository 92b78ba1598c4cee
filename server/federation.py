"""The phase runner: build the initial model and strategy, run the rounds, record everything."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from models.foundation import base_digest, site_owned_base
from models.tasks import backbone_weights, build, frozen_keys
from models.weights import load_pretrained
from protocol import wire
from strategies.external import ExternalSites
from strategies.guard import GuardedStrategy
from strategies.partial import FrozenSharing, PartialSharing
from strategies.secagg import SecAggPlus, SumNoise
from protocol.secagg_encoding import Encoding, noisy_encoding
from protocol.secagg_protocol import SecAggConfig
from protocol.skellam import NoiseShare
from strategies.sitedp import DistributedNoise, SiteLevelDP
from strategies.observed import ObservedStrategy, RoundObserver
from strategies.registry import build_strategy as build_flower_strategy
from strategies.site_names import SiteNames

from .checkpoint import CheckpointError, Checkpointer, latest_checkpoint, mark_final, read_final
from .config import ExperimentConfig
from .console import ConsoleTable, results_hint
from .resume import (DONE, FINETUNE_DIR, PRETRAIN_DIR, RESUME, PhaseResume, find_run_dir,
                     resolve_resume)
from .tracking import MlflowTracker, tracking_uri

log = logging.getLogger("medfed.server")


def build_strategy(cfg: ExperimentConfig, frozen: list[str] = (), *,
                   send_frozen: bool = True, sites: SiteNames | None = None) -> Strategy:
    """The configured Flower strategy inside the fault guard (quorum wait, sanitization);
    ``frozen`` weights (linear probe, LoRA) are never aggregated, and sent to sites unless
    ``send_frozen`` is false (a foundation model: each site holds its own base); with
    ``federation.external_sites`` external sites evaluate and never train. ``sites``: the
    run's site-id binding, by which the guard and external sites name a reply's node (the
    observer around the chain binds it: pass it the same object)."""
    strategy = _training_strategy(cfg, frozen, send_frozen, sites)
    if cfg.federation.external_sites:
        return ExternalSites(strategy, query_timeout=cfg.federation.round_timeout,
                             sites=sites)
    return strategy


def _training_strategy(cfg: ExperimentConfig, frozen: list[str], send_frozen: bool,
                       sites: SiteNames | None) -> Strategy:
    s, p = cfg.strategy, cfg.privacy
    site_dp = p.mechanism == wire.DP_SITE
    inner = build_flower_strategy(
        s.name, dict(s.options), fraction_train=s.fraction_train,
        fraction_evaluate=s.fraction_evaluate, min_train_nodes=s.min_train_sites,
        min_evaluate_nodes=s.min_evaluate_sites, min_available_nodes=s.min_available_sites,
        # site-level DP noise is calibrated to equal weights: one vote per site
        weighted_by_key=wire.DP_UNIT_WEIGHT if site_dp else wire.NUM_EXAMPLES)
    if site_dp and not cfg.secagg.enabled:  # around FedAvg: Flower's accountant checks it
        inner = SiteLevelDP(inner, noise_multiplier=float(p.noise_multiplier),
                            clipping_norm=p.clipping_norm, num_sites=cfg.federation.num_sites,
                            delta=p.delta)
    guarded = GuardedStrategy(inner, min_available_sites=s.min_available_sites,
                              min_train_sites=s.min_train_sites,
                              quorum_timeout=cfg.federation.quorum_timeout,
                              max_update_norm=s.max_update_norm,
                              max_norm_ratio=s.max_norm_ratio, sites=sites)
    if cfg.secagg.enabled:          # outside the guard: it sees the summed update only
        sa = cfg.secagg
        noise, encoding = _secure_site_dp(cfg) if site_dp else (None, Encoding(
            clip_range=sa.clip_range, max_sites=cfg.federation.num_sites,
            max_weight=sa.max_weight))
        secure = SecAggPlus(guarded, SecAggConfig(
            degree=sa.degree, threshold=sa.threshold, authenticated=sa.authenticated,
            encoding=encoding), stage_timeout=cfg.federation.round_timeout, site_dp=noise)
        return FrozenSharing(secure, list(frozen), send_frozen=send_frozen) if frozen else secure
    if frozen:
        return FrozenSharing(guarded, list(frozen), send_frozen=send_frozen)
    return PartialSharing(guarded, list(s.local_params)) if s.local_params else guarded


def _secure_site_dp(cfg: ExperimentConfig) -> tuple[SumNoise | DistributedNoise, Encoding]:
    """Site-level DP inside secure aggregation: the sites' own noise (the default; the
    encoding gets the headroom bits for it) or, with ``privacy.noise=server``, the server's."""
    p, sa, n = cfg.privacy, cfg.secagg, cfg.federation.num_sites
    if p.noise == wire.DP_NOISE_SERVER:
        return SumNoise(noise_multiplier=float(p.noise_multiplier),
                        clipping_norm=p.clipping_norm, num_sites=n, delta=p.delta), \
            Encoding(clip_range=sa.clip_range, max_sites=n, max_weight=sa.max_weight)
    m = p.min_contributors or n                     # what job_spec sends the sites
    return DistributedNoise(noise_multiplier=float(p.noise_multiplier),
                            clipping_norm=p.clipping_norm, num_sites=n, min_contributors=m,
                            delta=p.delta), \
        noisy_encoding(clip_range=sa.clip_range, max_sites=n, share=NoiseShare(
            noise_multiplier=float(p.noise_multiplier), clip_norm=p.clipping_norm,
            min_contributors=m))


def job_config(cfg: ExperimentConfig, run_id: str = "", base_digest: str = "") -> ConfigRecord:
    """What every site needs to build the model and task and to train (no site specifics):
    the experiment's ``JobSpec`` in its wire form (``base_digest``: a foundation model's
    frozen base as built here, which each site checks its own copy against)."""
    return cfg.job_spec(run_id, base_digest).to_record()


RUN_LOG = "medfed.log"          # the run's own log (console lines and what the console omits)
FAILED_MARKER = "FAILED"        # in a run directory whose run did not finish: why


def new_run_dir(cfg: ExperimentConfig) -> Path:
    """A fresh run directory, or with ``resume`` the existing one to continue (its
    :data:`FAILED_MARKER`, if an earlier attempt left one, is removed: this attempt decides)."""
    if cfg.resume:
        run_dir = find_run_dir(cfg)
        (run_dir / FAILED_MARKER).unlink(missing_ok=True)
        return run_dir
    run_dir = Path(cfg.runs_dir) / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir.mkdir(parents=True, exist_ok=False)
    return run_dir


def abandon_run_dir(run_dir: Path, reason: str) -> bool:
    """A run that failed leaves no empty folder behind: remove ``run_dir`` if nothing but its
    log was written, else write :data:`FAILED_MARKER` saying why (checkpoints stay, resumable).

    Returns
    -------
    bool
        True if the directory was removed.
    """
    if not run_dir.is_dir():
        return False
    if all(p.name in (RUN_LOG, FAILED_MARKER) for p in run_dir.iterdir()):
        shutil.rmtree(run_dir)
        return True
    (run_dir / FAILED_MARKER).write_text(
        f"this run failed: {reason}\nits log: {RUN_LOG}; a run with checkpoints continues "
        "with resume=<this directory>\n")
    return False


@dataclass(frozen=True)
class PhaseOutcome:
    """The final global model of a phase and its registered MLflow version (None if none)."""
    arrays: ArrayRecord
    registered_version: str | None


def run_experiment(grid: Grid, cfg: ExperimentConfig, run_dir: Path,
                   observers: tuple[RoundObserver, ...] = (), *,
                   sites: SiteNames | dict[int, str] | None = None) -> PhaseOutcome:
    """One experiment: with ``pretrain.objective``, phase 1 (federated pretraining, under
    ``run_dir/pretrain``) then phase 2 (the task, under ``run_dir/finetune``) starting from
    phase 1's global backbone; otherwise the task alone in ``run_dir``.

    With ``resume``, each phase continues as ``resolve_resume`` says: a completed phase is
    skipped, an interrupted one continues after its newest checkpoint, a later one starts.
    The last line says where the results are and how to open them (simulated or deployed).
    ``sites``: node id -> site id from the preflight's answers (a site failing in round 1 is
    named by it; see ``server.preflight.site_names``): they bind each site id to one node
    for the run, both phases (``strategies.site_names.SiteNames``).
    """
    names = SiteNames.of(sites)
    outcome = _run_phases(grid, cfg, run_dir, observers, names)
    log.info("%s", results_hint(tracking_uri(cfg, run_dir)))
    return outcome


def _run_phases(grid: Grid, cfg: ExperimentConfig, run_dir: Path,
                observers: tuple[RoundObserver, ...], sites: SiteNames) -> PhaseOutcome:
    point = resolve_resume(cfg, run_dir)
    start = None
    if cfg.model.pretrained is not None:     # validated at config load
        start = load_pretrained(cfg.model.pretrained)[1]
        log.info("starting from the pretrained backbone in %s", cfg.model.pretrained)
    if cfg.pretrain.objective is None:
        return _run_phase(grid, cfg, run_dir, point.task if point else None, observers,
                          backbone=start, sites=sites)
    first = cfg.pretrain_phase()
    log.info("phase 1 of 2: federated pretraining (%s, %d rounds)", cfg.pretrain.objective,
             cfg.pretrain.num_rounds)
    pre_dir = run_dir / PRETRAIN_DIR
    pre_dir.mkdir(exist_ok=True)
    result = _run_phase(grid, first, pre_dir, point.pretrain if point else None, observers,
                        run_id=f"{run_dir.name}.pretrain", store_dir=run_dir, backbone=start,
                        sites=sites)
    backbone = backbone_weights(result.arrays.to_torch_state_dict())
    parent = {"parent.model": first.tracking.registered_model,
              "parent.version": result.registered_version or "",
              "parent.config_hash": first.fingerprint()}
    log.info("phase 2 of 2: %s from the pretrained backbone (%s version %s)", cfg.task.name,
             parent["parent.model"], parent["parent.version"] or "?")
    fine_dir = run_dir / FINETUNE_DIR
    fine_dir.mkdir(exist_ok=True)
    return _run_phase(grid, cfg, fine_dir, point.task if point else None, observers,
                      run_id=f"{run_dir.name}.finetune", backbone=backbone, lineage=parent,
                      store_dir=run_dir, sites=sites)


def _run_phase(grid: Grid, cfg: ExperimentConfig, phase_dir: Path, resume: PhaseResume | None,
               observers: tuple[RoundObserver, ...], **kwargs) -> PhaseOutcome:
    """Run one phase fresh, continue it, or (completed) take its recorded outcome."""
    if resume is not None and resume.state == DONE:
        log.info("%s: all %d rounds completed before; skipped", phase_dir,
                 cfg.federation.num_rounds)
        return completed_phase(cfg, phase_dir)
    return run_federation(grid, cfg, phase_dir, observers,
                          resume=resume is not None and resume.state == RESUME, **kwargs)


def completed_phase(cfg: ExperimentConfig, phase_dir: Path) -> PhaseOutcome:
    """A completed phase's final global model and registered version, from its checkpoints
    (no MLflow run is reopened: its record is complete)."""
    final = read_final(phase_dir)
    if final is None:
        raise CheckpointError(f"{phase_dir} has not completed")
    checkpoint = latest_checkpoint(phase_dir, cfg.fingerprint())
    if final["config_hash"] != cfg.fingerprint() or checkpoint.round != final["rounds"]:
        raise CheckpointError(f"{phase_dir}: its completion record does not match its newest "
                              f"checkpoint (round {checkpoint.round}) or this configuration")
    return PhaseOutcome(checkpoint.arrays, final["registered_version"])


def run_federation(grid: Grid, cfg: ExperimentConfig, run_dir: Path,
                   observers: tuple[RoundObserver, ...] = (), *, run_id: str | None = None,
                   backbone: dict | None = None, lineage: dict | None = None,
                   store_dir: Path | None = None, resume: bool = False,
                   sites: SiteNames | dict[int, str] | None = None) -> PhaseOutcome:
    """Run ``cfg.federation.num_rounds`` rounds of federated training and evaluation.

    ``backbone``: initial backbone weights (phase 2 of a pretrain->finetune run); ``lineage``:
    tags naming the parent model version, set on every model version this phase registers;
    ``store_dir``: where the default MLflow store lives (both phases of a run share one);
    ``resume``: continue after the newest checkpoint in ``run_dir``, in the same MLflow run;
    ``sites``: the run's site-id bindings (``SiteNames``), or node id -> site id known before
    round 1 (the preflight's answers).
    On success the phase is marked complete (``checkpoint.mark_final``).
    """
    run_id = run_id or run_dir.name
    sites = SiteNames.of(sites)      # one binding: the observer binds it, the guard reads it
    torch.manual_seed(cfg.seed)
    model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options(),
                     backbone_state=backbone, foundation_dir=cfg.model.foundation_dir)
    initial = ArrayRecord(model.state_dict())
    # A foundation model's frozen base is each site's own copy: it never travels; the job
    # carries its digest instead.
    site_base = site_owned_base(model)
    digest = base_digest(model) if site_base else ""
    guarded = build_strategy(cfg, frozen_keys(model), send_frozen=not site_base, sites=sites)
    checkpoint = latest_checkpoint(run_dir, cfg.fingerprint()) if resume else None
    done = 0
    if checkpoint is not None:
        checkpoint.restore(guarded)
        initial, done = checkpoint.arrays, checkpoint.round
        log.info("resuming %s after round %d of %d", run_dir, done, cfg.federation.num_rounds)
    remaining = cfg.federation.num_rounds - done
    console = ConsoleTable(run_dir)
    # A fresh phase's export template is traced from here on, while the MLflow run is set
    # up and round 1 trains; a resumed one's after recover(), which registers on this thread.
    tracker = MlflowTracker(cfg, run_dir, lineage=lineage, store_dir=store_dir,
                            resume_run_id=checkpoint.manifest["mlflow_run_id"] if checkpoint else None,
                            initial=initial if checkpoint is None and remaining > 0 else None)
    try:            # from here the tracker may hold a trace and a frozen heap: end it on a raise
        if checkpoint is not None:      # what a crash left queued, or registered too early
            tracker.recover(checkpoint.round)
        checkpointer = Checkpointer(run_dir, guarded, config_hash=cfg.fingerprint(),
                                    mlflow_run_id=tracker.run_id)
        strategy = ObservedStrategy(guarded, [console, tracker, checkpointer, *observers],
                                    round_offset=done, sites=sites)
        log.info("experiment %s: %d sites, rounds %d-%d, run dir %s, MLflow run %s", cfg.name,
                 cfg.federation.num_sites, done + 1, cfg.federation.num_rounds, run_dir,
                 tracker.run_id)
        if remaining > 0:
            if checkpoint is not None:      # a fresh phase's started with the tracker
                tracker.prepare(initial)   # the phase's export template, while round 1 trains
            result = strategy.start(
                grid=grid, initial_arrays=initial, num_rounds=remaining,
                timeout=cfg.federation.round_timeout,
                train_config=job_config(cfg, run_id, digest),
                evaluate_config=job_config(cfg, run_id, digest),
            )
    except BaseException:
        tracker.finish(console.summary(), status="FAILED")
        raise
    if remaining <= 0:
        outcome = PhaseOutcome(initial, tracker.latest_version())
        tracker.finish(console.summary())
        log.info("nothing to do: all %d rounds are complete", cfg.federation.num_rounds)
        _mark_complete(run_dir, cfg, outcome)
        return outcome
    summary = console.summary()
    outcome = PhaseOutcome(result.arrays, tracker.latest_version())
    tracker.finish(summary)
    log.info("summary (pooled over sites):\n%s", summary)
    log.info("MLflow: %d model versions of %r in %s (run %s)", len(tracker.versions),
             cfg.tracking.registered_model, tracker.uri, tracker.run_id)
    _mark_complete(run_dir, cfg, outcome)
    return outcome


def _mark_complete(run_dir: Path, cfg: ExperimentConfig, outcome: PhaseOutcome) -> None:
    mark_final(run_dir, rounds=cfg.federation.num_rounds,
               registered_version=outcome.registered_version, config_hash=cfg.fingerprint())
