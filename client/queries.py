"""The site's record of what the coordinator asked of it, so that a malicious coordinator
cannot turn training and evaluation into an unbounded query channel on the site's data.

A site cannot check that the server is honest, only what it is asked. Kept here, per Flower
run, in the site's own state directory (next to the privacy ledger, ``<data-dir>/.medfed``
unless node config ``privacy-dir`` says otherwise) so a restarted ClientApp keeps counting:

- **Evaluation is budgeted.** At most ``max-evaluations-per-run`` evaluate requests per run
  (node config; default 1000, i.e. a generous 500 rounds of two evaluations), and at most
  ``max-evaluations-per-day`` over every run in a rolling 24 hours (default 2000), kept
  site-wide in the same file, per hour, and never pruned with the runs: a new Flower run
  resets the first cap, not the second. The daily default never bites honest use (the demo
  asks one a round, 20 a run: 100 such experiments a day, or two runs at the per-run cap)
  yet bounds a coordinator that starts run after run (a simulated partition has no daily cap
  unless ``federation.site_node_config`` sets one). A request counts for at least 24 hours
  (up to 25: hour buckets); a repeat of an answered round counts toward every cap alike.
  At most ``max-evaluations-total`` ever, too (default 100000; none in simulation): an hour
  bucket leaving the day's window is added to the site's running total, not dropped, so the
  file stays bounded (25 buckets and one number) while the total keeps counting.
  And *one weight vector per (run, task, round)*: the first evaluate request of a round fixes the digest of
  the weights it carried; a repeat with the same weights is answered (it teaches nothing new),
  one with any other weights is refused. The rule the site can verify is not "evaluate only
  the weights I trained" - in FedAvg the evaluate message carries the *new* aggregate, which
  no site has seen - but it blocks the attack that matters: evaluating many crafted weight
  vectors against the same data to probe it. A coordinator that forges round numbers instead
  is stopped by the caps. External sites (never train) are held to the same rules.
- **Training is not replayed.** A train request for a (run, task, round) the site already
  answered, with the same weights and protection, gets the *cached* reply, byte for byte,
  instead of a fresh update that could be differenced against the first; one with other
  weights or weaker protection is refused, as is a request for an older round whose reply
  has left the bounded cache.
- **Ingest counts are sent once per run** (``first_message``), small ones suppressed and the
  others as ranges (``suppress_small_counts``).

The task name is part of the key because one run may hold two phases (pretraining, then the
task) whose round numbers both start at 1.

And the operator's limits on what a job may ask, checked on every message (``QueryLimits``,
no state): no count below ``min-eval-split-size`` leaves the site (small splits; small
classes, of an evaluation's figures or of the split's labels, whatever the task; a task's
own counts, such as CLIP's ``n_reports`` or segmentation's ``n_masks``, and what each leaves
of its split and of another: ``split_counts``; small training sets); a class list leaving
out the site's labels is refused (counts by difference); a job's model is sized on the meta
device before it is built (parameters, buffers, tokens).

Not covered, by design of any per-reply floor: figures of a model the coordinator crafted are
counts of that model's answers (a confusion cell, accuracy x n, a count's change between two
rounds), so each evaluation can count a subset of the coordinator's choosing. The bound on
that channel is the evaluation budget above: per Flower run, and per site over every run
(``max-evaluations-per-day``), so starting new runs buys a coordinator no more evaluations a
day, and waiting for the days to pass buys it no more than ``max-evaluations-total`` in all
(a per-time budget alone grows with the days; this one, like the privacy budget, does not).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from torch import nn

from models.backbone import Backbone, implements, token_backbone
from models.metrics import SplitMetrics
from models.task import Task
from protocol import wire

from .privacy.ledger import own_folder, write_own_file

STATE_FILE = "site-queries.json"
REPLIES_DIR = "train-replies"
KEEP_REPLIES = 3          # train replies cached per run (the last few rounds)
KEEP_RUNS = 32            # runs whose counters are kept (older runs are over)
SITE_WIDE = "site"        # the state file's entry counting over every run (never a run id:
                          # Flower's are integers), never pruned with the runs
SIMULATED_NO_CAP = 2**62  # a simulated partition's max-evaluations-per-day and -total
WINDOW_HOURS = 24         # max-evaluations-per-day's rolling window, counted in hour buckets


class QueryRefused(ValueError):
    """The site will not answer this request; the message says why (sent back as the error)."""


@dataclass(frozen=True)
class QueryLimits:
    """The operator's limits on what the coordinator may ask, from node config.

    Parameters
    ----------
    max_evaluations : int
        ``max-evaluations-per-run``: evaluate requests answered per run.
    max_daily_evaluations : int
        ``max-evaluations-per-day``: evaluate requests answered over every run in a rolling
        24 hours (``SiteQueryLog.admit_evaluation``).
    max_total_evaluations : int
        ``max-evaluations-total``: evaluate requests answered over every run, ever. 100000
        by default: 50 days at the daily default, yet 5000 demo-sized experiments (20
        requests each), years of an honest federation's use; like the privacy budget, only
        the operator raises it.
    min_split_size : int
        ``min-eval-split-size``: the smallest count of studies the site reports. An
        evaluation split with fewer (but at least one) is reported as ``suppressed`` only,
        never its metrics or its size; the site does not train on a smaller training split
        (``check_training_size``).
    unlisted_labels : frozenset of str
        ``unlisted-labels``: the site's label names a job's class list may leave out
        (comma-separated or a JSON list; default none - ``check_class_list``).
    max_parameters : int
        ``max-model-parameters``: the largest model the site builds (``check_model_size``).
    max_study_tokens, max_step_tokens : int
        ``max-study-tokens``, ``max-step-tokens``: the most tokens its backbone reads of one
        study in one pass, and in one training step (``check_model_size``).
    max_step_activations : int
        ``max-step-activations``: the most values a training step may keep for backward,
        estimated from tokens, layer widths and attention heads (``step_activations``).
    """
    max_evaluations: int = 1000
    max_daily_evaluations: int = 2000
    max_total_evaluations: int = 100_000
    min_split_size: int = 10
    unlisted_labels: frozenset[str] = frozenset()
    max_parameters: int = 2_000_000_000
    max_study_tokens: int = 16384
    max_step_tokens: int = 2**20
    max_step_activations: int = 2**36

    def check_model_size(self, build: Callable[[], tuple[nn.Module, Task | None]], *,
                         batch: int = 1, per_sample: bool = False) -> None:
        """Size the job's model before building it: ``build`` runs on the meta device
        (shapes: no memory, no weights read), and a model of more parameters and buffers
        than ``max-model-parameters`` is refused, counting every copy its task holds (an
        EMA teacher). Its widths, depth, channel count, grid, adapter rank and heads are the
        coordinator's numbers; built for real, a site would allocate them (and their
        gradients and optimiser state) before any other check. Activations are bounded by
        tokens: the backbone's tokens a study (patches per channel x channels, CLS,
        registers; attention holds their square) and in a step of ``batch`` studies (the
        job's batch size x DP's augmentation multiplicity; DP-SGD's Poisson batches run in
        chunks of that size), over every pass the task's step makes of a study
        (``Task.step_views``: MM-DINOv2's crops and teacher passes; and
        ``step_text_tokens``: CLIP's report length, a text tower's pass); and by those
        tokens times the layers' widths and heads (``step_activations``); ``per_sample``
        (DP-SGD): plus each row's gradient of every trainable weight and its square, which
        the exact clipper may hold. A ``build`` without a task sizes the backbone alone, one
        pass a study (:func:`step_size`). Every path that builds a job's model calls this
        first."""
        size = step_size(build, batch=batch, per_sample=per_sample)
        if size.parameters > self.max_parameters:
            held = f" (its task holds {size.copies} copies)" if size.copies > 1 else ""
            raise QueryRefused(f"the job's model has {size.parameters:,} parameters and "
                               f"buffers{held}, more than this site builds (node config "
                               f"{wire.NODE_MAX_MODEL_PARAMETERS!r}: {self.max_parameters:,})")
        if size.study_tokens is not None and (size.study_tokens > self.max_study_tokens
                                              or size.step_tokens > self.max_step_tokens):
            raise QueryRefused(f"the job's model reads {size.study_tokens:,} tokens in one "
                               f"pass over a study and {size.step_tokens:,} a training step, "
                               f"more than this site runs (node config "
                               f"{wire.NODE_MAX_STUDY_TOKENS!r}: {self.max_study_tokens:,}, "
                               f"{wire.NODE_MAX_STEP_TOKENS!r}: {self.max_step_tokens:,})")
        if size.activations > self.max_step_activations:
            raise QueryRefused(f"the job's model holds about {size.activations:,} activation "
                               f"values a training step (tokens and voxels x the widths and "
                               f"attention heads of its layers), more than this site runs "
                               f"(node config {wire.NODE_MAX_STEP_ACTIVATIONS!r}: "
                               f"{self.max_step_activations:,})")

    def check_class_list(self, unlisted: frozenset[str]) -> None:
        """Refuse a job whose class list leaves some of the site's labelled studies without
        a class, beyond the labels the operator lets a job leave out. The coordinator chooses
        the class list, and every count the site reports (training examples, steps, an
        evaluation split's size) is a count of the studies it names: two class lists that
        differ by one label give that label's count by difference, however small - the
        smallest-count floor holds for each count, not for their difference."""
        if unlisted - self.unlisted_labels:
            raise QueryRefused(f"the job's class list leaves out labels this site holds, so "
                               f"its counts would be of a coordinator-chosen subset; the "
                               f"site's operator lists the labels a job may leave out (node "
                               f"config {wire.NODE_UNLISTED_LABELS!r})")

    def check_training_size(self, n_train: int) -> None:
        """Refuse to train on fewer studies than the site reports: a training reply's example
        count, its steps and its DP sample rate (batch_size / n, the batch size the
        coordinator's) would each give the small count away - and the coordinator chooses the
        class list, hence which studies count as labelled. None at all is refused in the same
        words (it failed in the engine before: a different answer for "none" than "a few")."""
        if n_train < self.min_split_size:
            raise QueryRefused(f"this site holds fewer labelled training studies for this job "
                               f"than the smallest count it reports (node config "
                               f"{wire.NODE_MIN_EVAL_SPLIT!r}); it does not train")

    @classmethod
    def from_settings(cls, settings: dict, *, simulated: bool = False) -> QueryLimits:
        """Read and validate the node-config settings (defaults where unset). A simulated
        partition (synthetic sites, deliberately a few studies per split, no patient behind
        them) defaults to ``min_split_size = 1`` so development runs report metrics, and to
        no daily or total evaluation cap (its coordinator is the same user's process; a
        benchmark's sweep asks thousands a day of one synthetic folder); its node-config.toml
        can still set the real defaults."""
        values: dict = {"min_split_size": 1, "max_daily_evaluations": SIMULATED_NO_CAP,
                        "max_total_evaluations": SIMULATED_NO_CAP} if simulated else {}
        values["unlisted_labels"] = label_names(settings.get(wire.NODE_UNLISTED_LABELS, ""))
        for field, key in (("max_evaluations", wire.NODE_MAX_EVALUATIONS),
                           ("max_daily_evaluations", wire.NODE_MAX_DAILY_EVALUATIONS),
                           ("max_total_evaluations", wire.NODE_MAX_TOTAL_EVALUATIONS),
                           ("min_split_size", wire.NODE_MIN_EVAL_SPLIT),
                           ("max_parameters", wire.NODE_MAX_MODEL_PARAMETERS),
                           ("max_study_tokens", wire.NODE_MAX_STUDY_TOKENS),
                           ("max_step_tokens", wire.NODE_MAX_STEP_TOKENS),
                           ("max_step_activations", wire.NODE_MAX_STEP_ACTIVATIONS)):
            if key in settings:
                try:
                    values[field] = int(settings[key])
                except (TypeError, ValueError):
                    raise QueryRefused(f"node config {key!r} must be an integer") from None
                if values[field] < 0:
                    raise QueryRefused(f"node config {key!r} must be >= 0")
        return cls(**values)


ATTENTION_HEADS = ("heads", "num_heads", "num_attention_heads")  # our, timm/MONAI, HF names
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
         nn.ConvTranspose3d)


@dataclass(frozen=True)
class StepSize:
    """What a job's model asks of a site, sized on the meta device (:func:`step_size`)."""
    parameters: int             # parameters and buffers, every copy its task holds
    copies: int                 # copies of the model its task holds (MM-DINOv2's teacher: 2)
    study_tokens: int | None    # its backbone's tokens in one pass over a study; None: no
    step_tokens: int | None     # token layout (a SwinUNETR, sized by its own forward)
    activations: int            # values a training step keeps for backward (upper estimate)


def step_size(build: Callable[[], tuple[nn.Module, Task | None]], *, batch: int = 1,
              per_sample: bool = False) -> StepSize:
    """Size ``build``'s model on the meta device (shapes: no memory, no weights read) for a
    training step of ``batch`` studies (``QueryLimits.check_model_size``).

    Raises
    ------
    QueryRefused
        The model has neither a token layout nor an input shape: nothing sizes what a step
        of it holds, so the site refuses it rather than waving it through.
    """
    with torch.device("meta"):
        model, task = build()
    copies = 1 if task is None else task.model_copies
    n = sum(t.numel() for t in (*model.parameters(), *model.buffers())) * copies
    rows = 2 * batch * sum(p.numel() for p in model.parameters() if p.requires_grad) \
        if per_sample else 0
    backbone = token_backbone(model)
    if backbone is None:      # a whole network without a token layout (SwinUNETR): its
        # stages' shapes, counted
        shape = model.input_shape if implements(model, Backbone) else None
        if shape is None:     # nothing to size its activations by: fail closed
            raise QueryRefused(f"the job's model ({type(model).__name__}) has neither a "
                               "token layout nor an input shape, so this site cannot size "
                               "what a training step of it holds; refusing")
        return StepSize(n, copies, None, None, forward_activations(model, shape, batch) + rows)
    layout = backbone.layout        # + the registers a foundation encoder adds inside
    # read without a default: an error inside must not count 0 (token_backbone found the
    # backbone by its class, without reading a member)
    registers = backbone.register_tokens
    views, text = ((layout.img_size,), 0) if task is None else \
        (task.step_views(layout), task.step_text_tokens())
    reads = [layout.tokens(side) + registers for side in views] + [text]
    passes = [(t, side**layout.spatial_dims) for t, side in zip(reads, views)]
    return StepSize(n, copies, max(reads), sum(reads) * batch,
                    step_activations(model, passes + [(text, 0)], batch) + rows)


def step_activations(model: nn.Module, passes: list[tuple[int, int]], batch: int) -> int:
    """An estimate of the values one training step keeps for backward, from the
    meta-built model: ``batch`` studies, each making ``passes`` of ``(tokens, voxels)``.
    Every token meets every Linear layer (its input width, which it saves, and its output
    width, which what follows saves: an activation, the next Linear, attention) and every
    attention module (a score per head and token); every voxel every convolution (its output
    channels, over its stride). The widths, depth, head counts and decoder channels are the
    coordinator's numbers (an MLP ratio of 1e8, 4e8 prototypes, a head per channel, a wide
    decoder at full resolution) and no token cap sees them. An upper estimate: on every
    shipped task and family it is 1.5-4.3x what autograd keeps (``tests/client/
    test_queries.py``; SDPA keeps no scores, the teacher's no-grad passes nothing)."""
    width = sum(m.in_features + m.out_features for m in model.modules()
                if isinstance(m, nn.Linear))
    convs = [(m.out_channels, math.prod(m.stride) if isinstance(m, nn.Conv1d | nn.Conv2d
                                                               | nn.Conv3d) else 1)
             for m in model.modules() if isinstance(m, CONVS)]
    heads = sum(_heads(m) for m in model.modules())
    return batch * sum(tokens * (width + heads * tokens)
                       + sum(voxels * c // stride for c, stride in convs)
                       for tokens, voxels in passes)


def _heads(module: nn.Module) -> int:
    return next((h for h in (getattr(module, a, None) for a in ATTENTION_HEADS)
                 if isinstance(h, int)), 0)


def forward_activations(model: nn.Module, shape: tuple[int, ...], batch: int) -> int:
    """The values one training forward of ``batch`` studies of ``shape`` keeps, counted on
    the meta device (no memory): every leaf module's output, and a score per head and token
    pair of every attention module (input ``[rows, tokens, C]``) - the model's own shapes at
    every stage, for a hierarchical segmenter whose tokens no layout describes."""
    total = 0

    def count(module, args, out):
        nonlocal total
        if isinstance(out, torch.Tensor) and next(module.children(), None) is None:
            total += out.numel()
        if _heads(module) and args and isinstance(args[0], torch.Tensor) \
                and args[0].dim() == 3:
            rows, tokens = args[0].shape[:2]
            total += rows * _heads(module) * tokens * tokens
    hooks = [m.register_forward_hook(count) for m in model.modules()]
    try:
        with torch.no_grad():
            images = torch.empty(batch, *shape, device="meta")
            model.train()(images, torch.ones(batch, shape[0], dtype=torch.bool, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return total


def label_names(value) -> frozenset[str]:
    """Node config ``unlisted-labels``: label names separated by commas, or a JSON list of
    strings (``["tumour, benign", "other"]``) for names that hold a comma. Names are stripped
    as the site's label files are read."""
    key = wire.NODE_UNLISTED_LABELS
    if not isinstance(value, str):
        raise QueryRefused(f"node config {key!r} must be a string of comma-separated label "
                           "names or a JSON list of them")
    if not value.lstrip().startswith("["):
        return frozenset(n.strip() for n in value.split(",") if n.strip())
    try:
        names = json.loads(value)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise QueryRefused(f"node config {key!r} starts with '[' but is not a JSON list of "
                           "label names")
    return frozenset(n.strip() for n in names if n.strip())


def arrays_digest(content: RecordDict) -> str:
    """SHA-256 over every array the message carries (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for record_name in sorted(content.array_records):
        for key, array in sorted(content.array_records[record_name].items()):
            h.update(json.dumps([record_name, key, array.dtype, list(array.shape)]).encode())
            h.update(array.data)
    return h.hexdigest()


class SiteQueryLog:
    """What this site answered in one run, and its evaluations over every run, persisted as
    JSON in its state directory.

    Parameters
    ----------
    directory : Path
        The site's state folder (``state_dir``).
    run_id : int
        Flower's run id of the request.
    clock : callable, optional
        Seconds since the epoch (``time.time``), for the daily evaluation window.
    """

    def __init__(self, directory: Path, run_id: int, *, clock: Callable[[], float] = time.time):
        self.directory = Path(directory)
        self.run = str(run_id)
        self.path = self.directory / STATE_FILE
        self.clock = clock

    def admit_evaluation(self, task: str, server_round: int, digest: str,
                         limits: QueryLimits) -> None:
        """Count one evaluate request, in its run, in the site's rolling day and in its
        total, or refuse it (a cap reached, or other weights than the ones this round was
        already evaluated with). Raises ``QueryRefused``."""
        state = self._load()
        run = state.setdefault(self.run, {})
        done = run.setdefault("evaluated", {})
        key = f"{task}/{server_round}"
        hour = int(self.clock() // 3600)
        site = state.setdefault(SITE_WIDE, {})
        before = site.get("evaluations-before")
        if before is None:
            before = counted_before_buckets(state)
        by_hour, aged = recent_hours(site.get("evaluations-by-hour", {}), hour)
        before += aged
        if run.get("evaluations", 0) >= limits.max_evaluations:
            raise QueryRefused(f"this site answers at most {limits.max_evaluations} evaluate "
                               f"requests per run (node config {wire.NODE_MAX_EVALUATIONS!r})")
        if sum(by_hour.values()) >= limits.max_daily_evaluations:
            raise QueryRefused(f"this site answers at most {limits.max_daily_evaluations} "
                               f"evaluate requests a day over all runs (node config "
                               f"{wire.NODE_MAX_DAILY_EVALUATIONS!r})")
        if before + sum(by_hour.values()) >= limits.max_total_evaluations:
            raise QueryRefused(f"this site answers at most {limits.max_total_evaluations} "
                               f"evaluate requests in all, over every run and day (node "
                               f"config {wire.NODE_MAX_TOTAL_EVALUATIONS!r}: only its "
                               f"operator raises it)")
        if done.get(key, digest) != digest:
            raise QueryRefused(f"round {server_round} was already evaluated with other weights; "
                               "this site evaluates one model per round")
        done[key] = digest
        run["evaluations"] = run.get("evaluations", 0) + 1
        by_hour[str(hour)] = by_hour.get(str(hour), 0) + 1
        site["evaluations-by-hour"], site["evaluations-before"] = by_hour, before
        self._save(state)

    def privacy_runs(self, task: str, job_run_id: str) -> frozenset[str]:
        """Every job run id a private round of ``task`` in this Flower run asked for,
        ``job_run_id`` included (then remembered). A pretraining and a fine-tuning phase are
        two tasks with an id and a plan each, capped apart as the preflight checks them; a
        coordinator naming a new id each round of one task gets them counted as one run."""
        state = self._load()
        run = state.setdefault(self.run, {})
        seen = run.setdefault("privacy-runs", {}).setdefault(task, [])
        if job_run_id not in seen:
            seen.append(job_run_id)
            self._save(state)
        return frozenset(seen)

    def first_message(self) -> bool:
        """True for the first call in this run (then remembered), False after."""
        state = self._load()
        run = state.setdefault(self.run, {})
        if run.get("ingest-sent"):
            return False
        run["ingest-sent"] = True
        self._save(state)
        return True

    def cached_reply(self, task: str, server_round: int, admission: str) -> RecordDict | None:
        """The reply already sent for this training round, if cached. Raises ``QueryRefused``
        for a round at or before the last trained one whose reply is no longer cached, and
        for a repeat that asks for the round otherwise than it was admitted (``admission``:
        ``client.privacy.policy.admission_digest``; the cached update is the one before the
        site's mods protect it, so it goes out again only under the same protection)."""
        run = self._load().get(self.run, {})
        path = self._reply_path(self.run, task, server_round)
        key = f"{task}/{server_round}"
        if key in run.get("replies", []) and path.is_file():
            if run.get("admissions", {}).get(key) != admission:
                raise QueryRefused(f"round {server_round} was trained from other weights or "
                                   "under another privacy request, secure-aggregation mode or "
                                   "session than this repeat asks for; a training round is "
                                   "answered once, as admitted")
            return recorddict_from_proto(ProtoRecordDict.FromString(path.read_bytes()))
        last = run.get("trained", {}).get(task)
        if last is not None and server_round <= last:
            raise QueryRefused(f"round {server_round} is not after this site's last trained "
                               f"round {last} of this run; a training round is answered once")
        return None

    def store_reply(self, task: str, server_round: int, content: RecordDict,
                    admission: str) -> None:
        """Keep this round's reply (the last ``KEEP_REPLIES`` rounds of the run) and what it
        was admitted as."""
        state = self._load()
        run = state.setdefault(self.run, {})
        path = self._reply_path(self.run, task, server_round)
        own_folder(self.directory)                  # before its child
        own_folder(path.parent)
        write_own_file(path, recorddict_to_proto(content).SerializeToString())
        replies = [r for r in run.get("replies", []) if r != f"{task}/{server_round}"]
        replies.append(f"{task}/{server_round}")
        for old in replies[:-KEEP_REPLIES]:
            self._reply_path(self.run, *old.rsplit("/", 1)).unlink(missing_ok=True)
        run["replies"] = replies[-KEEP_REPLIES:]
        run["admissions"] = {r: a for r, a in (run.get("admissions", {})
                                                | {f"{task}/{server_round}": admission}).items()
                             if r in run["replies"]}
        trained = run.setdefault("trained", {})
        trained[task] = max(server_round, trained.get(task, server_round))
        self._save(state)

    def _reply_path(self, run: str, task: str, server_round) -> Path:
        name = hashlib.sha256(f"{run}/{task}/{server_round}".encode()).hexdigest()[:24]
        return self.directory / REPLIES_DIR / f"{name}.pb"

    def _load(self) -> dict:
        if not self.path.is_file():
            return {}
        return json.loads(self.path.read_text())

    def _save(self, state: dict) -> None:
        # A file from before the running total gets it before any kept run is pruned (any
        # write prunes: a coordinator starting runs that never evaluate would drop them all)
        site = state.setdefault(SITE_WIDE, {})
        if "evaluations-before" not in site:
            site["evaluations-before"] = counted_before_buckets(state)
        # Runs are kept in insertion order; the oldest go first (their rounds are over).
        for run in [r for r in state if r != SITE_WIDE][:-KEEP_RUNS]:
            for old in state.pop(run).get("replies", []):
                self._reply_path(run, *old.rsplit("/", 1)).unlink(missing_ok=True)
        own_folder(self.directory)
        write_own_file(self.path, json.dumps(state, sort_keys=False).encode())


def counted_before_buckets(state: dict) -> int:
    """Where the running total starts in a file without one (written before session 38,
    whose hour buckets were dropped after a day): the evaluations its kept runs counted
    beyond those its buckets still hold - a lower bound of what the dropped buckets held
    (the kept runs are some of the site's runs, the buckets hold some of their requests and
    of pruned runs'), so an upgraded site's total starts no lower than it can tell."""
    runs = sum(v.get("evaluations", 0) for k, v in state.items() if k != SITE_WIDE)
    buckets = sum(state.get(SITE_WIDE, {}).get("evaluations-by-hour", {}).values())
    return max(0, runs - buckets)


def recent_hours(by_hour: dict[str, int], hour: int) -> tuple[dict[str, int], int]:
    """The hour buckets of the rolling window that ends in ``hour`` (this hour and the
    ``WINDOW_HOURS`` before it), and the count of the rest, which leave the buckets (the
    history kept stays bounded) for the site's running total (``max-evaluations-total``).
    Hours after ``hour`` leave too: the clock is the site's own, set back only by its
    operator, who may raise the budget anyway; what they counted stays in the total."""
    window = {h: n for h, n in by_hour.items() if hour - WINDOW_HOURS <= int(h) <= hour}
    return window, sum(by_hour.values()) - sum(window.values())


def class_counts(metrics: SplitMetrics) -> list[int]:
    """The per-class study counts an evaluation's figures carry: the rows of its confusion
    (studies of class i), a finding's negatives and positives (multi-label)."""
    rows: list[int] = []
    if metrics.confusion is not None:
        rows += np.asarray(metrics.confusion).sum(axis=1).astype(int).tolist()
    if metrics.finding_confusions is not None:
        rows += np.asarray(metrics.finding_confusions).sum(axis=2).astype(int).ravel().tolist()
    return rows


def label_counts(labels: torch.Tensor, num_classes: int, *, multi_label: bool) -> list[int]:
    """The per-class counts of a split's labelled studies (-1: unlabelled, left out), in
    ``class_counts``'s terms: multi-label bitmasks give each finding's negatives and
    positives."""
    labels = torch.as_tensor(labels).long()
    labels = labels[labels >= 0]
    if multi_label:
        positives = [int(((labels >> k) & 1).sum()) for k in range(num_classes)]
        return [len(labels) - p for p in positives] + positives
    return torch.bincount(labels, minlength=num_classes).tolist()


def split_counts(metrics: SplitMetrics, labels: torch.Tensor, num_classes: int, *,
                 multi_label: bool) -> list[float]:
    """Every count an evaluated split's reply would give away, for the floor to check
    (``has_small_count``), whatever the task:

    - its figures' class counts (``class_counts``: a confusion row is a class's count);
    - the split's own class counts (``label_counts``): a task without a confusion still
      reads the labels (CLIP's zero-shot AUROC ranks each class's studies, its steps are
      1 / (positives x negatives)), and one that does not today may tomorrow - the site
      does not ask which, as it does not for a training split;
    - the task's own counts (``SplitMetrics.counts``: CLIP's ``n_reports``, segmentation's
      ``n_masks``, ``dice_undefined`` and ``hd95_undefined``, the last steerable by crafted
      weights), what each leaves of the split (``n - count``: the studies without a report,
      by difference with the ``n`` sent) and of each other (``n_masks - hd95_undefined``: the
      studies segmentation's HD95 averages over). A figure averaged over fewer studies than
      the floor is theirs: one masked study in a large split sends its own Dice.
    """
    own = [float(metrics.n), *metrics.counts.values()]
    apart = [abs(a - b) for i, a in enumerate(own) for b in own[:i]]
    return class_counts(metrics) + label_counts(labels, num_classes, multi_label=multi_label) \
        + list(metrics.counts.values()) + apart


def has_small_count(counts: list[float], floor: int) -> bool:
    """Whether a count is present but below the smallest the site reports (``floor``)."""
    return any(0 < c < floor for c in counts)


def suppress_small_counts(report, threshold: int = 10):
    """An ingest report fit to leave the site: every count in 1..threshold-1 becomes
    ``"<10"``-style text and every larger one the range of ``threshold`` values it falls in
    (23 -> ``"20-29"``); zero stays (it describes nobody); nested dicts are walked. Exact
    large counts would give a suppressed one back by difference: the label, split and
    sequence counts of a report each sum to its study count. ``threshold`` 1 (a simulated
    site): the exact counts."""
    if isinstance(report, dict):
        return {k: suppress_small_counts(v, threshold) for k, v in report.items()}
    if isinstance(report, int) and not isinstance(report, bool) and report > 0 and threshold > 1:
        low, high = count_range(report, threshold)
        return f"<{threshold}" if report < threshold else f"{low}-{high}"
    return report


def count_range(count: int, floor: int) -> tuple[int, int]:
    """The range ``(low, high)`` a count is reported as at the site's smallest reported count
    ``floor`` (``min-eval-split-size``): ``(1, floor - 1)`` below it, else the ``floor``
    values it falls in (23 at 10: ``(20, 29)``); zero, and any count at ``floor`` 1 (a
    simulated site), exactly. A decision the coordinator can see the outcome of and steer
    (``client.privacy.policy.authorize``) is taken on this range, never on the count."""
    if count <= 0 or floor <= 1:
        return count, count
    if count < floor:
        return 1, floor - 1
    low = count // floor * floor
    return low, low + floor - 1
