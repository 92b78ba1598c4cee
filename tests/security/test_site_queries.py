"""Attacks by a malicious coordinator on the site's query channels: evaluation as an oracle,
replayed training rounds, hostile DICOM headers and the ingest counts. Each test plays the
attacker and fails when the site's protection is taken out."""

from __future__ import annotations

import csv
import json
import re
import shutil

import numpy as np
import pydicom
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.serde import recorddict_to_proto

from client.app import make_client_app
from client.data.dicom import ReadCounts, read_file
from client.engine import Engine
from client.job import decode_job
from client.mods.errors import SiteError
from client.privacy.policy import node_settings
from client.queries import REPLIES_DIR, STATE_FILE, suppress_small_counts
from protocol import wire
from protocol.metrics import from_record
from server.config import load_experiment
from server.federation import job_config
from server.tracking import MlflowTracker
from strategies.pooling import aggregate_evaluate_records

SMALL = ["model=mmvit_tiny", "task.image_size=32", "train.local_epochs=1", "train.batch_size=8"]


@pytest.fixture
def site_dir(tiny_sites, tmp_path):
    """A private copy of one synthetic site (its pseudonym key and cache included: the same
    splits), without the shared site's query log: what other tests asked of it (this hour's
    evaluations count toward a daily budget) is not this test's."""
    return shutil.copytree(tiny_sites / "site-0", tmp_path / "site-0",
                           ignore=shutil.ignore_patterns(STATE_FILE, REPLIES_DIR))


def _context(site_dir, **node) -> Context:
    return Context(run_id=11, node_id=7, node_config={wire.NODE_DATA_DIR: str(site_dir)} | node,
                   state=RecordDict(), run_config={})


def _message(kind: str, server_round: int = 1, weights: dict | None = None,
             overrides: tuple[str, ...] = (), clip: bool = False,
             run_id: str = "run-q") -> Message:
    """``clip``: the job's task is CLIP, zero-shot over the job's class names."""
    record = job_config(load_experiment([*SMALL, *overrides]), run_id=run_id)
    record[wire.SERVER_ROUND] = server_round
    if clip:
        record[wire.TASK_NAME] = "clip"
        record[wire.TASK_OPTIONS] = json.dumps({"class_names": list(record[wire.CLASS_NAMES])})
    model, _ = decode_job(record, site_seed=0).build()
    state = weights if weights is not None else model.state_dict()
    if callable(weights):                 # the attacker's edit of the model's own weights
        state = weights(model.state_dict())
    content = RecordDict({wire.CONFIG: record, wire.ARRAYS: ArrayRecord(state)})
    return Message(content, dst_node_id=7, message_type=kind)


def _crafted(seed: int) -> dict:
    """A weight vector of the attacker's choosing (same keys and shapes as the model's)."""
    model, _ = decode_job(job_config(load_experiment(SMALL)), site_seed=0).build()
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g).to(v.dtype) if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def test_many_crafted_weight_vectors_for_one_round_are_refused_after_the_first(
        site_dir, task_identity):
    """The oracle attack: evaluate chosen weights against the same data, round after round
    number held fixed. Only the first is answered; a restarted site process still refuses."""
    app = make_client_app()
    first = app(_message(MessageType.EVALUATE, 1, _crafted(0)), _context(site_dir))
    assert not first.has_error(), first.error
    for seed in (1, 2, 3):
        with pytest.raises(SiteError, match="site-policy: .*already evaluated with other weights"):
            app(_message(MessageType.EVALUATE, 1, _crafted(seed)), _context(site_dir))
    restarted = make_client_app()      # counters live in the site's state dir, not the process
    with pytest.raises(SiteError, match="site-policy: .*already evaluated with other weights"):
        restarted(_message(MessageType.EVALUATE, 1, _crafted(4)), _context(site_dir))
    # the same weights again teach nothing new and are answered identically
    same = restarted(_message(MessageType.EVALUATE, 1, _crafted(0)), _context(site_dir))
    assert not same.has_error()
    timeless = lambda m: {k: v for k, v in m.items() if "seconds" not in k}  # noqa: E731
    assert timeless(same.content[wire.METRICS]) == timeless(first.content[wire.METRICS])


def test_forged_round_numbers_hit_the_evaluation_cap(site_dir, task_identity):
    app = make_client_app()
    context = lambda: _context(site_dir, **{wire.NODE_MAX_EVALUATIONS: 2})  # noqa: E731
    for server_round in (1, 2):
        assert not app(_message(MessageType.EVALUATE, server_round, _crafted(server_round)),
                       context()).has_error()
    with pytest.raises(SiteError, match="site-policy: .*at most 2 evaluate requests per run"):
        app(_message(MessageType.EVALUATE, 3, _crafted(3)), context())


@pytest.mark.parametrize("role", wire.ROLES)
def test_attack_a_new_flower_run_does_not_reset_the_sites_daily_evaluation_budget(
        site_dir, task_identity, role):
    """The per-run cap resets with each Flower run, so a coordinator that starts run after
    run (and forges rounds within each) would get as many crafted evaluations as it likes.
    The site's daily budget counts over every run, in its state dir: a restarted site
    process with the next run id is still refused once the day's budget is spent. An
    external site (it only evaluates) is held to the same budget."""
    caps = {wire.NODE_MAX_EVALUATIONS: 2, wire.NODE_MAX_DAILY_EVALUATIONS: 4,
            wire.NODE_ROLE: role}

    def context(run_id):
        c = _context(site_dir, **caps)
        c.run_id = run_id
        return c
    app, seed = make_client_app(), iter(range(100))
    for run_id in (11, 12):
        for server_round in (1, 2):
            assert not app(_message(MessageType.EVALUATE, server_round, _crafted(next(seed))),
                           context(run_id)).has_error()
        with pytest.raises(SiteError, match="site-policy: .*at most 2 evaluate requests per "
                                            "run"):
            app(_message(MessageType.EVALUATE, 3, _crafted(next(seed))), context(run_id))
    for run_id in (13, 14):              # rotated again, each time by a fresh process
        with pytest.raises(SiteError, match=r"site-policy: this site answers at most 4 evaluate "
                                            r"requests a day over all runs \(node config "
                                            r"'max-evaluations-per-day'\)"):
            make_client_app()(_message(MessageType.EVALUATE, 1, _crafted(next(seed))),
                              context(run_id))


def test_attack_waiting_out_the_days_does_not_renew_the_sites_evaluation_budget(
        site_dir, task_identity):
    """The daily budget renews every day, so a coordinator that comes back day after day
    (a new run each time) gets evaluations without end: the channel grows with the days.
    The site's total budget counts every request it ever answered, across runs, restarts
    and days. Two days pass between visits here (the site's state file aged by 48 hours:
    what its clock would find); the daily cap of 2 is renewed each visit, the total of 5 is
    not, and is still spent a visit later."""
    caps = {wire.NODE_MAX_EVALUATIONS: 2, wire.NODE_MAX_DAILY_EVALUATIONS: 2,
            wire.NODE_MAX_TOTAL_EVALUATIONS: 5}
    state_file = site_dir / ".medfed" / STATE_FILE
    total = (r"site-policy: this site answers at most 5 evaluate requests in all, over every "
             r"run and day \(node config 'max-evaluations-total'")
    seed, answered = iter(range(100)), 0
    for visit in range(4):
        for server_round in (1, 2):
            context = _context(site_dir, **caps)
            context.run_id = 20 + visit               # a new run, by a fresh process
            try:
                reply = make_client_app()(_message(MessageType.EVALUATE, server_round,
                                                   _crafted(next(seed))), context)
                assert not reply.has_error(), reply.error
                answered += 1
            except SiteError as err:
                assert visit >= 2 and re.match(total, str(err)), err
        state = json.loads(state_file.read_text())   # two days pass
        site = state["site"]
        site["evaluations-by-hour"] = {str(int(h) - 48): n
                                       for h, n in site["evaluations-by-hour"].items()}
        state_file.write_text(json.dumps(state))
    assert answered == 5


def test_small_splits_report_suppressed_only_never_their_size_and_pooling_skips_them(
        site_dir, task_identity):
    """A split below the site's floor sends no metric and no size: not as its ``n``, not as
    the difference of the reply's example count and the other splits' (before: ``n`` was the
    split's exact size, e.g. 1 study of a class the coordinator singled out)."""
    app = make_client_app()
    normal = app(_message(MessageType.EVALUATE), _context(site_dir, **{wire.NODE_MIN_EVAL_SPLIT: 1}))
    other_run = _context(site_dir)                      # default min-eval-split-size: 10
    other_run.run_id = 12
    small = app(_message(MessageType.EVALUATE), other_run)
    assert not normal.has_error() and not small.has_error(), (normal.error, small.error)
    plain, held = normal.content[wire.METRICS], small.content[wire.METRICS]
    assert set(plain) == set(held)                       # Flower needs one key set
    for split in wire.EVAL_SPLITS:     # the tiny site's val and test: 6 and 5 studies
        n = plain[f"{split}-{wire.EVAL_N}"]
        assert 0 < n < 10 and held[f"{split}-{wire.EVAL_N}"] == 0
        assert held[f"{split}-{wire.EVAL_SUPPRESSED}"] == 1.0
        assert plain[f"{split}-{wire.EVAL_SUPPRESSED}"] == 0.0
        assert sum(held[f"{split}-{wire.EVAL_CONFUSION}"]) == 0      # no measured counts
        assert sum(plain[f"{split}-{wire.EVAL_CONFUSION}"]) == n
        assert from_record(held, split).n == 0              # decodes as "not measured"
    assert plain[wire.NUM_EXAMPLES] == sum(plain[f"{s}-{wire.EVAL_N}"] for s in wire.EVAL_SPLITS)
    assert held[wire.NUM_EXAMPLES] == 0                  # no size in the example count either
    # the server pools the other site's figures and leaves the suppressed one out
    pooled = aggregate_evaluate_records([normal.content, small.content], wire.NUM_EXAMPLES)
    alone = aggregate_evaluate_records([normal.content], wire.NUM_EXAMPLES)
    assert dict(pooled) == pytest.approx(dict(alone), nan_ok=True)


def test_a_class_list_leaving_out_a_label_is_refused_so_no_count_differs_by_that_label(
        site_dir, task_identity):
    """Attack: two jobs whose class lists differ by one label: the difference of their
    training example counts (or evaluation split sizes) is that label's count at the site,
    however small - each count alone is above the smallest-count floor. The site refuses a
    class list that leaves out labels it holds, unless its operator lists them."""
    all_three = _message(MessageType.TRAIN)
    without_cyst = ("task.class_names=[high_grade_glioma,low_grade_glioma]",)
    small_site = {wire.NODE_MIN_EVAL_SPLIT: 1}         # so only the class list can refuse
    for kind in (MessageType.TRAIN, MessageType.EVALUATE):
        with pytest.raises(SiteError, match=r"site-policy: the job's class list leaves out "
                                            r"labels this site holds"):
            make_client_app()(_message(kind, overrides=without_cyst),
                              _context(site_dir, **small_site))
    # the control: the operator lets a job leave "cyst" out - the difference is its count
    both = make_client_app()(all_three, _context(site_dir, **small_site))
    lenient = _context(site_dir, **small_site, **{wire.NODE_UNLISTED_LABELS: " cyst, other"})
    lenient.run_id = 12                                 # a new run: not a replayed round
    allowed = make_client_app()(_message(MessageType.TRAIN, overrides=without_cyst), lenient)
    n_all, n_two = (m.content[wire.METRICS][wire.NUM_EXAMPLES] for m in (both, allowed))
    assert 0 < n_all - n_two < 10


def test_the_operators_unlisted_labels_may_name_labels_holding_a_comma():
    """``unlisted-labels`` is comma-separated, so a label such as "tumour, benign" could not
    be listed (the operator's only choices: refuse every job leaving it out, or list two
    labels the site does not hold). A JSON list names it whole; anything else starting with
    '[' is refused rather than read as comma-separated names."""
    from client.queries import QueryLimits, QueryRefused

    def listed(value):
        return QueryLimits.from_settings({wire.NODE_UNLISTED_LABELS: value}).unlisted_labels
    assert listed(" cyst, other") == {"cyst", "other"}
    assert listed('["tumour, benign", " other ", ""]') == {"tumour, benign", "other"}
    for bad in ('["tumour, benign"', '[1, 2]', '[["a"]]', 7):
        with pytest.raises(QueryRefused, match="unlisted-labels"):
            listed(bad)


def test_a_class_list_singling_out_a_few_studies_gets_no_training_and_no_count(
        site_dir, task_identity, caplog):
    """Attack: the coordinator names one real class and a made-up one, so that only that
    class's studies count as labelled - a handful - and reads their number from the train
    reply (its example count; its steps and DP sample rate with batch_size=1). Even where the
    operator lets a job leave the other labels out, the site refuses to train on fewer
    studies than it reports, and says nothing of how many."""
    record = _message(MessageType.TRAIN, overrides=(
        "train.batch_size=1", "task.class_names=[high_grade_glioma,not-a-class]"))
    lenient = {wire.NODE_UNLISTED_LABELS: "low_grade_glioma,cyst"}
    with pytest.raises(SiteError, match=r"site-policy: .*fewer labelled training studies .* "
                                        r"it does not train") as refused:
        make_client_app()(record, _context(site_dir, **lenient))
    assert not any(ch.isdigit() for ch in str(refused.value).split("(node config")[0])
    # a class list naming no class it holds: none at all is refused in the same words (a
    # failure here instead would tell "none" from "a few"), and trains nothing
    nothing = _message(MessageType.TRAIN, overrides=(
        "train.batch_size=1", "task.class_names=[not-a-class,nor-this]"))
    every = {wire.NODE_UNLISTED_LABELS: "low_grade_glioma,high_grade_glioma,cyst"}
    with pytest.raises(SiteError) as none:
        make_client_app()(nothing, _context(site_dir, **every))
    assert str(none.value) == str(refused.value)
    # the count and the likely cause go to the site's own log (its operator), not the reply
    assert "0 labelled training studies for this job's class list" in caplog.text
    # the same site, its operator reporting counts from 1 (as in simulation): the count
    # the refusal withheld
    n = make_client_app()(record, _context(site_dir, **lenient,
                                           **{wire.NODE_MIN_EVAL_SPLIT: 1}))
    assert 0 < n.content[wire.METRICS][wire.NUM_EXAMPLES] < 10


def test_a_class_of_few_studies_is_not_counted_by_a_confusion_row_or_a_training_metric(
        site_dir, task_identity, caplog):
    """Attack: an evaluated split's confusion matrix has a row per class - that class's
    exact count in the split, however small, even where the split is large enough to report;
    and a training reply's accuracy and loss under weights the coordinator chose (a head
    that always answers class k) give class k's count in the training split. The site
    (floor 3 here; the tiny site: val 3 + 2 studies of two classes, test 3 of one, train
    6 + 1 + 8 of three) suppresses a split with a class below its floor and sends no
    training metrics when a class of its training split is below it."""
    floor = {wire.NODE_MIN_EVAL_SPLIT: 3}
    metrics = make_client_app()(_message(MessageType.EVALUATE),
                                _context(site_dir, **floor)).content[wire.METRICS]
    val, test = (from_record(metrics, split) for split in ("val", "test"))
    assert metrics[f"val-{wire.EVAL_SUPPRESSED}"] == 1.0 and val.n == 0
    assert metrics[f"test-{wire.EVAL_SUPPRESSED}"] == 0.0 and test.n == 3
    rows = np.asarray(test.confusion).sum(axis=1)
    assert not any(0 < r < 3 for r in rows)
    with caplog.at_level("INFO"):
        trained = make_client_app()(_message(MessageType.TRAIN), _context(site_dir, **floor))
    assert not any(k.startswith("train_") for k in trained.content[wire.METRICS])
    assert "training loss/accuracy not sent" in caplog.text      # the site's log says so
    other_run = _context(site_dir, **{wire.NODE_MIN_EVAL_SPLIT: 1})
    other_run.run_id = 12                 # the control: a floor of 1 sends them
    trained = make_client_app()(_message(MessageType.TRAIN), other_run)
    assert "train_accuracy" in trained.content[wire.METRICS]


def test_class_counts_read_alike_from_labels_and_from_a_confusion():
    """The training rule counts classes from labels, the evaluation rule from labels and
    figures (``split_counts``): both in the same terms (a finding's negatives and positives,
    multi-label)."""
    from client.queries import class_counts, label_counts
    from models.metrics import SplitMetrics

    single = torch.tensor([0, 2, 2, -1, 2])
    confusion = np.array([[1, 0, 0], [0, 0, 0], [1, 1, 1]])
    assert label_counts(single, 3, multi_label=False) == [1, 0, 3] == \
        class_counts(SplitMetrics(n=4, loss=0.0, confusion=confusion))
    bits = torch.tensor([0b01, 0b11, 0b00, -1])           # 2 findings over 3 studies
    findings = np.array([[[1, 0], [1, 1]], [[2, 0], [0, 1]]])    # [F, true, predicted]
    assert label_counts(bits, 2, multi_label=True) == [1, 2, 2, 1]
    assert sorted(class_counts(SplitMetrics(n=3, loss=0.0, finding_confusions=findings))) \
        == sorted(label_counts(bits, 2, multi_label=True))


def _uids_by_split(site_dir) -> dict[str, list[str]]:
    """The site's study UIDs, as its files name them, by the split the site draws them into
    (the fixture's fixed pseudonym key): for tests that thin one split's reports or masks."""
    from client.data.pseudonyms import pseudonym, site_key
    from client.data.site import load_site

    key = site_key(site_dir / ".medfed")
    split = {s.key: s.split for s in load_site(site_dir, key=key).studies}
    with open(site_dir / "labels.csv") as f:
        uids = [row["study_instance_uid"] for row in csv.DictReader(f)]
    out: dict[str, list[str]] = {}
    for uid in uids:
        out.setdefault(split[pseudonym("study", uid, key)], []).append(uid)
    return out


def _keep_rows(path, drop: set[str], *, jsonl: bool) -> None:
    """Rewrite a site file without the rows of the studies in ``drop``."""
    lines = path.read_text().splitlines()
    if jsonl:
        kept = [line for line in lines if json.loads(line)["study_instance_uid"] not in drop]
    else:
        kept = [line for line in lines if line.split(",")[0] not in drop]
    path.write_text("\n".join(kept) + "\n")


def _sent_counts(metrics, name: str) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.endswith(f"-{wire.EVAL_COUNT}{name}")}


def test_clip_report_counts_below_the_floor_never_leave_nor_by_difference_with_n(
        site_dir, task_identity):
    """Attack: a CLIP evaluation sends ``<split>-count-n_reports``, the studies of the split
    that have a report - a count the floor never checked (before: 1 came back where the same
    splits under classification were suppressed). And ``n - n_reports`` is the split's
    studies without a report. The tiny site (val 5 studies, test 3) keeps 4 of its val
    reports and 1 of its test ones; at floor 2 both splits are suppressed."""
    splits = _uids_by_split(site_dir)
    assert (len(splits["val"]), len(splits["test"])) == (5, 3)
    _keep_rows(site_dir / "reports.jsonl", {splits["val"][0], *splits["test"][1:]}, jsonl=True)
    control = _context(site_dir, **{wire.NODE_MIN_EVAL_SPLIT: 1})
    plain = make_client_app()(_message(MessageType.EVALUATE, clip=True), control)
    sent = plain.content[wire.METRICS]           # the counts a floor of 1 lets out
    assert _sent_counts(sent, "n_reports") == {f"val-{wire.EVAL_COUNT}n_reports": 4.0,
                                                f"test-{wire.EVAL_COUNT}n_reports": 1.0}
    floor = _context(site_dir, **{wire.NODE_MIN_EVAL_SPLIT: 2})
    floor.run_id = 12
    held = make_client_app()(_message(MessageType.EVALUATE, clip=True), floor)
    metrics = held.content[wire.METRICS]
    assert set(metrics) == set(sent)
    for split in wire.EVAL_SPLITS:
        assert metrics[f"{split}-{wire.EVAL_SUPPRESSED}"] == 1.0
        assert metrics[f"{split}-{wire.EVAL_N}"] == 0
    assert set(_sent_counts(metrics, "n_reports").values()) == {0.0}


def test_a_clip_split_holding_a_small_class_is_suppressed_though_it_has_no_confusion(
        site_dir, task_identity, caplog):
    """Attack: a task without a confusion matrix still reads the split's labels - CLIP's
    zero-shot AUROC ranks each class's studies against the others, whose number its values'
    steps give away - but the floor checked only confusion rows, so a split that
    classification suppresses for a small class went out under CLIP. The tiny site's val
    split (3 + 2 studies of two classes) is suppressed at floor 3, its test split (3 of one)
    is not."""
    control = _context(site_dir, **{wire.NODE_MIN_EVAL_SPLIT: 1})
    plain = make_client_app()(_message(MessageType.EVALUATE, clip=True), control)
    assert plain.content[wire.METRICS][f"val-{wire.EVAL_N}"] == 5     # sent at floor 1
    floor = _context(site_dir, **{wire.NODE_MIN_EVAL_SPLIT: 3})
    floor.run_id = 12
    metrics = make_client_app()(_message(MessageType.EVALUATE, clip=True),
                                floor).content[wire.METRICS]
    assert metrics[f"val-{wire.EVAL_SUPPRESSED}"] == 1.0 and metrics[f"val-{wire.EVAL_N}"] == 0
    assert metrics[f"test-{wire.EVAL_SUPPRESSED}"] == 0.0 and metrics[f"test-{wire.EVAL_N}"] == 3
    # the site's own log says why (the reply says only that the split is suppressed)
    assert "val figures not sent: one of its counts" in caplog.text
    assert "test figures not sent" not in caplog.text


def _background_only(state: dict) -> dict:
    """Crafted segmenter weights: the output layer answers background at every voxel, so
    every study with a mask has an empty prediction and an undefined HD95."""
    out = {k: v.clone() for k, v in state.items()}
    weights = [k for k in out if k.startswith("out.") and k.endswith(".weight")]
    biases = [k for k in out if k.startswith("out.") and k.endswith(".bias")]
    assert len(weights) == len(biases) == 1, sorted(out)
    out[weights[0]].zero_()
    out[biases[0]].copy_(torch.tensor([50.0, -50.0]))
    return out


def test_a_segmentation_count_steered_by_crafted_weights_below_the_floor_never_leaves(
        site_dir, task_identity):
    """Attack: segmentation sends ``<split>-count-hd95_undefined``, which weights that
    predict no lesion make the number of the split's studies with a mask - a count the floor
    never checked. The tiny site keeps the mask of one of its 3 test studies; under the
    crafted weights the count is 1 at floor 1 and the split suppressed at floor 3."""
    splits = _uids_by_split(site_dir)
    _keep_rows(site_dir / "segmentations.csv", set(splits["test"][1:]), jsonl=False)
    seg = ("task=lesion_seg", "task.image_size=32")
    control = _context(site_dir, **{wire.NODE_MIN_EVAL_SPLIT: 1})
    plain = make_client_app()(_message(MessageType.EVALUATE, weights=_background_only,
                                       overrides=seg), control)
    assert plain.content[wire.METRICS][f"test-{wire.EVAL_COUNT}hd95_undefined"] == 1.0
    floor = _context(site_dir, **{wire.NODE_MIN_EVAL_SPLIT: 3})
    floor.run_id = 12
    metrics = make_client_app()(_message(MessageType.EVALUATE, weights=_background_only,
                                         overrides=seg), floor).content[wire.METRICS]
    assert metrics[f"test-{wire.EVAL_SUPPRESSED}"] == 1.0 and metrics[f"test-{wire.EVAL_N}"] == 0
    assert not any(0 < v < 3 for v in _sent_counts(metrics, "hd95_undefined").values())


def test_segmentation_figures_of_fewer_masked_studies_than_the_floor_never_leave(
        site_dir, task_identity):
    """Attack: segmentation's loss, Dice and HD95 are means over the split's studies with a
    mask, not over its ``n``: a split large enough to report whose masks are one study's
    sent that study's own Dice and HD95 (and ``n`` minus the masked count, sent or not, is
    the studies without one). The tiny site (val 5 studies, test 3) keeps the masks of 4 of
    its val studies and 1 of its test ones; at floor 2 both splits are suppressed - test for
    its one masked study, val for the one without - though each holds enough studies."""
    splits = _uids_by_split(site_dir)
    assert (len(splits["val"]), len(splits["test"])) == (5, 3)
    _keep_rows(site_dir / "segmentations.csv", {splits["val"][0], *splits["test"][1:]},
               jsonl=False)
    seg = ("task=lesion_seg", "task.image_size=32")
    control = _context(site_dir, **{wire.NODE_MIN_EVAL_SPLIT: 1})
    sent = make_client_app()(_message(MessageType.EVALUATE, overrides=seg),
                             control).content[wire.METRICS]      # what a floor of 1 lets out
    assert _sent_counts(sent, "n_masks") == {f"val-{wire.EVAL_COUNT}n_masks": 4.0,
                                             f"test-{wire.EVAL_COUNT}n_masks": 1.0}
    assert (sent[f"val-{wire.EVAL_N}"], sent[f"test-{wire.EVAL_N}"]) == (5, 3)
    floor = _context(site_dir, **{wire.NODE_MIN_EVAL_SPLIT: 2})
    floor.run_id = 12
    metrics = make_client_app()(_message(MessageType.EVALUATE, overrides=seg),
                                floor).content[wire.METRICS]
    assert set(metrics) == set(sent)
    for split in wire.EVAL_SPLITS:
        assert metrics[f"{split}-{wire.EVAL_SUPPRESSED}"] == 1.0, split
        assert metrics[f"{split}-{wire.EVAL_N}"] == 0
        for figure in ("dice", "hd95"):        # the evaluator's empty result, nothing measured
            assert metrics[f"{split}-{wire.EVAL_MEAN}{figure}"] == 0.0
    assert set(_sent_counts(metrics, "n_masks").values()) == {0.0}


def test_a_figure_averaged_over_the_difference_of_two_task_counts_is_checked():
    """Attack: HD95 is a mean over the masked studies where it is defined, ``n_masks -
    hd95_undefined`` - a count no single field carries, but the two sent give it by
    difference (crafted weights steer ``hd95_undefined``). 12 masks and 11 undefined in a
    split of 30: every count sent and what each leaves of ``n`` is above the floor of 10,
    the one HD95 averages over is 1."""
    from client.queries import has_small_count, split_counts
    from models.metrics import SplitMetrics

    counts = {"n_masks": 12.0, "dice_undefined": 0.0, "hd95_undefined": 11.0}
    labels = torch.zeros(30, dtype=torch.long)
    one = SplitMetrics(n=30, loss=0.0, means={"dice": 0.5, "hd95": 3.0}, counts=counts)
    assert has_small_count(split_counts(one, labels, 2, multi_label=False), 10)
    enough = SplitMetrics(n=30, loss=0.0, means={"dice": 0.5, "hd95": 3.0},
                          counts=counts | {"hd95_undefined": 0.0})      # the control
    assert not has_small_count(split_counts(enough, labels, 2, multi_label=False), 10)


def _unbuilt(kind: str, options: dict) -> Message:
    """A job message without weights (the site refuses before it reads any) whose model
    options the coordinator set (past its own config checks): building the attacker's
    model in the test would be the allocation under test."""
    record = job_config(load_experiment(SMALL), run_id="run-q")
    record[wire.MODEL_OPTIONS] = json.dumps(json.loads(record[wire.MODEL_OPTIONS]) | options)
    record[wire.SERVER_ROUND] = 1
    return Message(RecordDict({wire.CONFIG: record, wire.ARRAYS: ArrayRecord({})}),
                   dst_node_id=7, message_type=kind)


def test_a_model_sized_by_the_coordinator_beyond_the_sites_cap_is_never_allocated(
        site_dir, task_identity, meta_builds_only):
    """Attack: the coordinator's model options are sizes - a ViT 4096 wide and 48 deep is
    6.5e9 parameters, 26 GB in float32 before gradients and optimiser state; one on a
    4096^2 grid of 1-pixel patches holds a 1.7e10-value position buffer (69 GB) with only
    ~1e7 parameters: a site building either runs out of memory. The site sizes the model on
    the meta device, parameters and buffers, and refuses it (default cap 2e9), for train and
    evaluate, without building it for real."""
    for huge, size in (({"dim": 4096, "depth": 48, "heads": 16}, r"6,\d{3},\d{3},\d{3}"),
                       ({"img_size": 4096, "patch_size": 1, "dim": 1024, "heads": 16},
                        r"17,\d{3},\d{3},\d{3}")):
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            with pytest.raises(SiteError, match=rf"site-policy: the job's model has {size} "
                                                r"parameters and buffers, more than this "
                                                r"site builds"):
                make_client_app()(_unbuilt(kind, huge), _context(site_dir))


def test_a_step_whose_activations_exceed_the_sites_means_is_refused_before_any_build(
        site_dir, task_identity, meta_builds_only):
    """Attack: activations, not parameters - a ViT on 1-pixel patches of a 256^2 image
    reads 4 x 65536 tokens a study (attention holds their square: ~7e10 values a layer and
    head) with 2e6 parameters and buffers; the small model with batch_size 65536 reads 1.1e6
    tokens a step. The site counts its backbone's tokens on the meta build and refuses both
    (defaults: 16384 a study, 2^20 a step)."""
    def refused(message: Message, study: str, step: str) -> None:
        with pytest.raises(SiteError, match=rf"site-policy: the job's model reads {study} "
                                            rf"tokens in one pass over a study and {step} a "
                                            r"training step"):
            make_client_app()(message, _context(site_dir))
    refused(_unbuilt(MessageType.TRAIN, {"img_size": 256, "patch_size": 1}),
            "262,145", "2,097,160")
    wide_batch = _unbuilt(MessageType.TRAIN, {})
    wide_batch.content[wire.CONFIG][wire.BATCH_SIZE] = 65536
    refused(wide_batch, "17", "1,114,112")


def _mm_dino(kind: str, **options) -> Message:
    """An MM-DINOv2 job on the small model, unbuilt (see ``_unbuilt``)."""
    message = _unbuilt(kind, {})
    message.content[wire.CONFIG][wire.TASK_NAME] = "mm_dino"
    message.content[wire.CONFIG][wire.TASK_OPTIONS] = json.dumps({"num_classes": 3} | options)
    return message


def test_a_dp_sample_rate_beyond_the_batch_size_never_puts_more_studies_in_one_pass(
        site_dir, task_identity):
    """Attack: under DP-SGD a step draws each training study with the coordinator's sample
    rate q, ``q * n`` studies on average, not ``train.batch_size`` - the number the site's
    size check counted. ``batch_size=1, sample_rate=1.0``: every step would put the whole
    training split through the model at once. The site runs a Poisson batch in physical
    chunks of at most ``batch_size`` studies (x the augmentation multiplicity), whose clipped
    sums add up before the noise: no forward pass holds more."""
    from models.vit import MultiModalViT

    rows, forward = [], MultiModalViT.forward_features

    def counted(self, images, *args, **kwargs):
        rows.append(images.shape[0])
        return forward(self, images, *args, **kwargs)
    dp = ("privacy=dpsgd", "privacy.epsilon=50", "privacy.sample_rate=1.0",
          "privacy.augmentation_multiplicity=2", "train.batch_size=1")
    node = {wire.NODE_DP_EPSILON: 100.0, wire.NODE_DP_DELTA: 1e-5, wire.NODE_MIN_EVAL_SPLIT: 1,
            wire.NODE_DP_SECURE_MODE: False}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MultiModalViT, "forward_features", counted)
        reply = make_client_app()(_message(MessageType.TRAIN, overrides=dp),
                                  _context(site_dir, **node))
    assert not reply.has_error(), reply.error
    trained = reply.content[wire.METRICS]
    assert trained["steps"] == 1 and trained[wire.NUM_EXAMPLES] > 2   # q = 1: one full step
    assert len(rows) >= trained[wire.NUM_EXAMPLES] and max(rows) == 2  # one study, two views


def test_attack_the_train_handler_takes_the_sample_rate_rule_on_the_reported_range(
        site_dir, task_identity):
    """Attack: under secure aggregation the example count is masked, yet a sample rate below
    1/n is refused, and the coordinator chooses q: probing it would find n
    (``tests/client/test_policy.py`` plays the search). The train handler takes the rule on
    the range the site reports n in at its ``min-eval-split-size``: at a floor of n - 1 the
    range's low end is n - 1, so q = 1/n, which the exact count allows, is refused."""
    plain = make_client_app()(_message(MessageType.TRAIN),
                              _context(site_dir, **{wire.NODE_MIN_EVAL_SPLIT: 1}))
    assert not plain.has_error(), plain.error
    n = int(plain.content[wire.METRICS][wire.NUM_EXAMPLES])
    assert n >= 3                               # a floor of n - 1 >= 2: a range, not n
    dp = ("privacy=dpsgd", "privacy.epsilon=50", f"privacy.sample_rate={1 / n!r}")
    context = _context(site_dir, **{wire.NODE_DP_EPSILON: 100.0, wire.NODE_DP_DELTA: 1e-5,
                                    wire.NODE_MIN_EVAL_SPLIT: n - 1,
                                    wire.NODE_DP_SECURE_MODE: False})
    context.run_id = 12
    with pytest.raises(SiteError, match=r"site-policy: sample rate .* \(below 1/n, n the low "
                                        r"end of the range"):
        make_client_app()(_message(MessageType.TRAIN, overrides=dp), context)


def test_evaluation_and_pseudo_labels_ask_the_model_no_more_studies_at_once_than_training(
        site_dir, task_identity):
    """Attack: the site sizes a job at its batch size, but evaluated every split and
    pseudo-labelled the unlabelled studies 64 at a time: a coordinator choosing
    ``batch_size=1`` got 64x past every activation cap. Evaluation and pseudo-labelling now
    run the job's batch size too."""
    from models.vit import MultiModalViT

    rows, forward = [], MultiModalViT.forward_features

    def counted(self, images, *args, **kwargs):
        rows.append(images.shape[0])
        return forward(self, images, *args, **kwargs)
    small = ("train.batch_size=1", "task.options.pseudo_label_threshold=0.34",
             "task.options.label_fraction=0.5")
    node = {wire.NODE_MIN_EVAL_SPLIT: 1}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MultiModalViT, "forward_features", counted)
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            rows.clear()
            reply = make_client_app()(_message(kind, overrides=small),
                                      _context(site_dir, **node))
            assert not reply.has_error(), reply.error
            assert len(rows) > 2 and max(rows) == 1, (kind, rows)


def test_mm_dino_crops_and_teacher_passes_count_toward_the_sites_step_cap(
        site_dir, task_identity, meta_builds_only):
    """Attack: the step cap counted one pass a study, but an MM-DINOv2 step passes each
    study through the backbone 6 times at full size (the teacher's and the student's two
    global crops, the class terms) and once per local crop - ``local_crops`` is the
    coordinator's number (up to 16). Batch 8 of the small model: 8 x 17 = 136 tokens as
    one pass; with 16 local crops of 5 tokens 8 x (6 x 17 + 16 x 5) = 1,456. A site
    capping steps at 1,000 tokens refuses that job; with 2 local crops (8 x 112 = 896) it
    runs it."""
    from client.queries import QueryLimits

    cap = {wire.NODE_MAX_STEP_TOKENS: 1000}
    with pytest.raises(SiteError, match=r"site-policy: the job's model reads 17 tokens in one "
                                        r"pass over a study and 1,456 a training step"):
        make_client_app()(_mm_dino(MessageType.TRAIN, local_crops=16), _context(site_dir, **cap))
    job = decode_job(_mm_dino(MessageType.TRAIN, local_crops=2).content[wire.CONFIG],
                     site_seed=0)
    QueryLimits(max_step_tokens=1000).check_model_size(job.build, batch=8)      # the control


def test_mm_dino_teacher_copy_counts_toward_the_sites_parameter_cap(
        site_dir, task_identity, meta_builds_only):
    """Attack: the parameter cap counted the student only, but MM-DINOv2 keeps an EMA
    teacher, a deep copy of it: a model just under the cap is twice the cap in memory. The
    small model has 81,283 parameters and buffers; a site capping at 100,000 trains it as a
    classifier and refuses it as MM-DINOv2 (162,566)."""
    from client.queries import QueryLimits

    cap = {wire.NODE_MAX_MODEL_PARAMETERS: 100_000}
    with pytest.raises(SiteError, match=r"site-policy: the job's model has 162,566 parameters "
                                        r"and buffers \(its task holds 2 copies\)"):
        make_client_app()(_mm_dino(MessageType.TRAIN), _context(site_dir, **cap))
    job = decode_job(_unbuilt(MessageType.TRAIN, {}).content[wire.CONFIG], site_seed=0)
    QueryLimits(max_parameters=100_000).check_model_size(job.build, batch=8)    # the control


def test_a_report_length_beyond_the_sites_means_is_refused_before_any_build(
        site_dir, task_identity, meta_builds_only):
    """Attack: CLIP's ``max_length`` is the coordinator's number, and every report is padded
    to it: 65,536 tokens a report is ~4e9 attention values a layer and head in the text
    tower, for 8.4e6 more parameters (its position embeddings, far under the parameter
    cap). The site counts the text tower's tokens like a pass of the image backbone; the
    default length (128) runs."""
    from client.queries import QueryLimits

    message = _unbuilt(MessageType.TRAIN, {})
    message.content[wire.CONFIG][wire.TASK_NAME] = "clip"
    message.content[wire.CONFIG][wire.TASK_OPTIONS] = json.dumps({"num_classes": 3,
                                                                  "max_length": 65536})
    with pytest.raises(SiteError, match=r"site-policy: the job's model reads 65,536 tokens in "
                                        r"one pass over a study and 524,424 a training step"):
        make_client_app()(message, _context(site_dir))
    message.content[wire.CONFIG][wire.TASK_OPTIONS] = json.dumps({"num_classes": 3})
    job = decode_job(message.content[wire.CONFIG], site_seed=0)
    QueryLimits().check_model_size(job.build, batch=8)                          # the control


@pytest.mark.parametrize("task, model, options", [
    ("classification", {"dim": 2, "depth": 1, "heads": 1, "mlp_ratio": 1.9e8}, {}),
    ("classification", {"img_size": 128, "patch_size": 4, "dim": 512, "depth": 1,
                        "heads": 512}, {}),
    ("mm_dino", {}, {"out_dim": 400_000_000, "hidden_dim": 1, "bottleneck_dim": 1}),
    ("clip", {}, {"hidden_size": 4, "num_heads": 1, "intermediate_size": 100_000_000}),
], ids=["mlp", "heads", "prototypes", "text-mlp"])
def test_widths_the_coordinator_chose_count_toward_the_sites_activation_cap(
        site_dir, task_identity, meta_builds_only, task, model, options):
    """Attack: widths, not tokens or parameters. An MLP ratio of 1.9e8 on a 2-wide ViT (1.9e9
    parameters, under the 2e9 cap; the small job's 17 tokens a study) makes an MLP layer of
    5.2e10 values at batch 8 (207 GB in float32); 512 heads on a 512-wide ViT of 4,097 tokens
    a study (under both token caps) hold 512 attention scores per token pair, 6.9e10 values;
    4e8 MM-DINOv2 prototypes (0.8e9 parameters, twice with the teacher) score every token of
    a crop 4e8 ways; a 1e8-wide text MLP in CLIP's tower. The site estimates what a step
    keeps - every pass's tokens x the Linear widths and attention heads of the meta-built
    model - and refuses above ``max-step-activations`` (default 2^36, ~275 GB in float32);
    the small job itself holds ~2.5e5, and the 512-wide ViT with 8 heads is accepted."""
    from client.queries import QueryLimits

    message = _unbuilt(MessageType.TRAIN, model)
    if task != "classification":
        message.content[wire.CONFIG][wire.TASK_NAME] = task
        message.content[wire.CONFIG][wire.TASK_OPTIONS] = json.dumps({"num_classes": 3}
                                                                      | options)
    with pytest.raises(SiteError, match=r"site-policy: the job's model holds about [\d,]+ "
                                        r"activation values a training step"):
        make_client_app()(message, _context(site_dir))
    job = decode_job(_unbuilt(MessageType.TRAIN, {}).content[wire.CONFIG], site_seed=0)
    QueryLimits(max_step_activations=300_000).check_model_size(job.build, batch=8)  # control
    if model.get("heads") == 512:             # the same ViT with 8 heads: what a site trains
        eight = decode_job(_unbuilt(MessageType.TRAIN, model | {"heads": 8}).content[
            wire.CONFIG], site_seed=0)
        QueryLimits().check_model_size(eight.build, batch=8)


def test_a_segmenters_full_resolution_maps_count_toward_the_sites_activation_cap(
        site_dir, task_identity, meta_builds_only, tmp_path):
    """Attack: a segmenter's decoder works at full resolution, where tokens say nothing. A
    UNETR on 64-pixel patches of a 1024^2 image (1,025 tokens a study) with feature_size 64
    keeps ~2e11 values at batch 8; a SwinUNETR - no token layout at all - asked for 1024^3
    volumes keeps ~1e13. The site counts a UNETR's convolutions over every voxel, and a
    SwinUNETR's every stage by running its forward on the meta device (leaf outputs and
    window attention scores); the same models at sizes a site trains are accepted."""
    from monai.networks.nets import SwinUNETR

    from client.queries import QueryLimits, QueryRefused
    from models.foundation.monai_nets import SWIN_UNETR_TYPE, save_monai
    from models.tasks import build

    refused = r"site-policy: the job's model holds about [\d,]+ activation values"
    message = _unbuilt(MessageType.TRAIN, {"img_size": 1024, "patch_size": 64})
    message.content[wire.CONFIG][wire.TASK_NAME] = "segmentation"
    message.content[wire.CONFIG][wire.TASK_OPTIONS] = json.dumps({"num_classes": 3,
                                                                  "feature_size": 64})
    with pytest.raises(SiteError, match=refused):
        make_client_app()(message, _context(site_dir))
    args = dict(in_channels=1, out_channels=2, feature_size=12, depths=[2, 1, 1, 1],
                num_heads=[1, 1, 2, 2], window_size=2, spatial_dims=3)
    save_monai(SwinUNETR(**args), args, tmp_path / "swin", model_type=SWIN_UNETR_TYPE)

    def swin(side):
        return lambda: build("foundation_swin", {"weights": "swin", "num_channels": 1,
                                                 "image_size": side, "spatial_dims": 3},
                             "segmentation", {}, foundation_dir=tmp_path)
    with pytest.raises(QueryRefused, match="activation values"):
        QueryLimits().check_model_size(swin(1024), batch=2)
    QueryLimits().check_model_size(swin(96), batch=2)                              # controls
    job = decode_job(_unbuilt(MessageType.TRAIN, {}).content[wire.CONFIG], site_seed=0)
    QueryLimits().check_model_size(job.build, batch=8)


def test_dp_sgd_per_sample_gradients_count_toward_the_sites_activation_cap(
        site_dir, task_identity, meta_builds_only):
    """Attack: under DP-SGD the exact clipper may hold each row's gradient of a trainable
    weight (and its square): a UNETR decoder of feature_size 1024 (3.9e8 trainable weights,
    under the parameter cap; ~2.6e9 activation values at batch 64, under the default cap)
    holds ~5e10 per-sample gradient values. The site counts 2 x rows x trainable weights
    for a DP-SGD job; the same job without DP-SGD is accepted."""
    from client.queries import QueryLimits

    def job(*privacy: str) -> ConfigRecord:
        record = job_config(load_experiment([*SMALL, "train.batch_size=64", *privacy]),
                            run_id="run-q")
        record[wire.MODEL_OPTIONS] = json.dumps(json.loads(record[wire.MODEL_OPTIONS]) | {
            "img_size": 32, "patch_size": 8, "dim": 64, "depth": 4, "heads": 2})
        record[wire.TASK_NAME] = "segmentation"
        record[wire.TASK_OPTIONS] = json.dumps({"num_classes": 3, "feature_size": 1024})
        record[wire.SERVER_ROUND] = 1
        return record
    message = Message(RecordDict({wire.CONFIG: job("privacy=dpsgd"),
                                  wire.ARRAYS: ArrayRecord({})}),
                      dst_node_id=7, message_type=MessageType.TRAIN)
    node = {wire.NODE_DP_EPSILON: 100.0, wire.NODE_DP_DELTA: 1e-5}
    with pytest.raises(SiteError, match=r"site-policy: the job's model holds about [\d,]+ "
                                        r"activation values"):
        make_client_app()(message, _context(site_dir, **node))
    QueryLimits().check_model_size(decode_job(job(), site_seed=0).build, batch=64)  # control


def test_the_operators_parameter_cap_refuses_a_model_it_would_otherwise_train(
        site_dir, task_identity):
    wider = ("model.options.dim=64", "model.options.depth=2")
    cap = {wire.NODE_MAX_MODEL_PARAMETERS: 50_000, wire.NODE_MIN_EVAL_SPLIT: 1}
    with pytest.raises(SiteError, match=r"more than this site builds .*50,000"):
        make_client_app()(_message(MessageType.TRAIN, overrides=wider),
                          _context(site_dir, **cap))
    trained = make_client_app()(_message(MessageType.TRAIN, overrides=wider),
                                _context(site_dir, **{wire.NODE_MIN_EVAL_SPLIT: 1}))
    assert not trained.has_error()


def test_a_replayed_train_round_gets_the_same_bytes_and_no_second_training(
        site_dir, task_identity, monkeypatch):
    calls = []
    fit = Engine.fit

    def counted(self, *args, **kwargs):
        calls.append(1)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "fit", counted)
    message = _message(MessageType.TRAIN)
    first = make_client_app()(message, _context(site_dir))
    assert not first.has_error(), first.error
    replay = make_client_app()(message, _context(site_dir))  # restarted ClientApp
    assert not replay.has_error(), replay.error
    assert len(calls) == 1
    assert (recorddict_to_proto(replay.content).SerializeToString()
            == recorddict_to_proto(first.content).SerializeToString())
    # other weights for the same round: refused, never trained again (the site-DP attack
    # below is why the cached update does not go out against them either)
    with pytest.raises(SiteError, match="from other weights"):
        make_client_app()(_message(MessageType.TRAIN, 1, _crafted(5)), _context(site_dir))
    assert len(calls) == 1


def test_a_replay_asking_for_weaker_protection_is_refused_not_answered(
        site_dir, task_identity, tmp_path):
    """The cached reply is the update before the site's mods clip, noise and mask it; a
    coordinator replaying a site-level DP round without DP (or with a looser clipping norm)
    must get a refusal, not the unclipped update. (Before: the cached update went out under
    the replay's weaker request - norm ~150 instead of the admitted 0.01.)"""
    node = {wire.NODE_DP_EPSILON: 8.0, wire.NODE_DP_DELTA: 1e-5, wire.NODE_DP_TRUST_SERVER: True,
            wire.NODE_PRIVACY_DIR: str(tmp_path / "privacy"),
            wire.NODE_MIN_EVAL_SPLIT: 1}       # a synthetic site of a few studies
    private = ("privacy=sitedp", "strategy.min_train_sites=3", "privacy.clipping_norm=0.01",
               "privacy.noise_multiplier=5.0")
    # A replay is the same message again (one model: two built apart differ unless an
    # earlier test happened to seed torch alike - alone this test failed before).
    request = _message(MessageType.TRAIN, overrides=private)
    first = make_client_app()(request, _context(site_dir, **node))
    assert not first.has_error(), first.error
    again = make_client_app()(request, _context(site_dir, **node))
    assert not again.has_error() and (recorddict_to_proto(again.content).SerializeToString()
                                      == recorddict_to_proto(first.content).SerializeToString())
    # the same request against other reference weights: the site-DP clipping mod would clip
    # the cached update's difference to them, a second direction of the same update (two
    # give its unclipped length, and so the update, away: a review recovered the length 1.3068
    # of an update the site had clipped to 0.1); one ledger row would stand for both releases
    with pytest.raises(SiteError, match="answered once, as admitted"):
        make_client_app()(_message(MessageType.TRAIN, weights=_crafted(5), overrides=private),
                          _context(site_dir, **node))
    for weaker in (("privacy=none",),
                   ("privacy=sitedp", "strategy.min_train_sites=3", "privacy.clipping_norm=100.0",
                    "privacy.noise_multiplier=5.0")):
        with pytest.raises(SiteError, match="answered once, as admitted"):
            make_client_app()(_message(MessageType.TRAIN, overrides=weaker),
                              _context(site_dir, **node))


def test_attack_a_new_job_run_id_each_round_does_not_restart_the_per_run_cap(
        site_dir, task_identity, tmp_path):
    """The job's run id is the coordinator's. With the operator's per-run cap, a review got
    three DP rounds out of one Flower run by naming a new run id each round (epsilon 3.78
    under a cap of 3). The site counts every run id it saw in that Flower run as one run."""
    node = {wire.NODE_DP_EPSILON: 30.0, wire.NODE_DP_DELTA: 1e-5,
            wire.NODE_DP_MAX_RUN_EPSILON: 3.0, wire.NODE_PRIVACY_DIR: str(tmp_path / "ledger"),
            wire.NODE_MIN_EVAL_SPLIT: 1}       # a synthetic site of a few studies
    dp = ("privacy=dpsgd", "privacy.epsilon=2.5", "federation.num_rounds=1")
    first = make_client_app()(_message(MessageType.TRAIN, 1, overrides=dp, run_id="run-1"),
                              _context(site_dir, **node))
    assert not first.has_error(), first.error
    for server_round, run_id in ((2, "run-1"), (2, "run-1-b"), (3, "run-1-c")):
        with pytest.raises(SiteError, match="per-run cap"):
            make_client_app()(_message(MessageType.TRAIN, server_round, overrides=dp,
                                       run_id=run_id), _context(site_dir, **node))
    # another Flower run is another run (the site's total budget still bounds them all)
    other = Context(run_id=12, node_id=7, node_config={wire.NODE_DATA_DIR: str(site_dir)}
                    | node, state=RecordDict(), run_config={})
    again = make_client_app()(_message(MessageType.TRAIN, 1, overrides=dp, run_id="run-2"),
                              other)
    assert not again.has_error(), again.error


def test_a_hostile_dicom_header_is_skipped_as_too_large_without_decoding(
        tiny_sites, tmp_path, monkeypatch):
    good = sorted((tiny_sites / "site-0" / "dicom").iterdir())[0]
    ds = pydicom.dcmread(good)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(tmp_path / "bomb.dcm")
    decoded = []

    def pixel_array(self):
        decoded.append(1)
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(pixel_array))
    counts = ReadCounts()
    assert read_file(tmp_path / "bomb.dcm", counts) is None
    assert dict(counts.skipped) == {"too_large": 1} and decoded == []
    # frames too: 512 x 512 x 5000 frames
    ds.Rows, ds.Columns, ds.NumberOfFrames = 512, 512, 5000
    ds.save_as(tmp_path / "frames.dcm")
    assert read_file(tmp_path / "frames.dcm", counts) is None
    assert counts.skipped["too_large"] == 2 and decoded == []


def test_ingest_counts_are_sent_once_per_run_with_small_cells_suppressed(
        site_dir, task_identity):
    app = make_client_app()
    # One model for the round: the site refuses to evaluate other weights in the same round,
    # and two builds only agree when something before this test seeded torch alike.
    weights = _message(MessageType.EVALUATE).content[wire.ARRAYS].to_torch_state_dict()
    first = app(_message(MessageType.EVALUATE, weights=weights), _context(site_dir))
    second = app(_message(MessageType.EVALUATE, weights=weights), _context(site_dir))
    assert not first.has_error() and not second.has_error()
    ingest = first.content[wire.SITE][wire.INGEST]
    assert wire.INGEST not in second.content[wire.SITE]
    report = json.loads(ingest)
    flat = [v for v in report.values() if not isinstance(v, dict)]
    flat += [v for d in report.values() if isinstance(d, dict) for v in d.values()]
    assert "<10" in flat                                  # the tiny site has small cells
    assert not any(isinstance(v, int) and 0 < v < 10 for v in flat)
    assert suppress_small_counts({"a": 3, "b": {"c": 0, "d": 12}}) == \
        {"a": "<10", "b": {"c": 0, "d": "10-19"}}
    # no small count comes back by difference: the labels sum to the studies
    assert not any(isinstance(v, int) and v > 0 for v in flat), flat
    assert suppress_small_counts({"n": 23, "t": True}, 1) == {"n": 23, "t": True}
    # a new run gets it again
    other_run = _context(site_dir)
    other_run.run_id = 99
    third = app(_message(MessageType.EVALUATE, 2), other_run)
    assert third.content[wire.SITE][wire.INGEST] == ingest
    # the server logs it as before, once per site (with the round's MLflow writes)
    tracker = MlflowTracker.__new__(MlflowTracker)
    tracker.ingest_logged = set()
    assert tracker._new_ingest("site-0", ingest) == {"sites/site-0/ingest.json": report}
    assert tracker._new_ingest("site-0", ingest) == {}
    assert tracker._new_ingest("site-1", "") == {}


def test_deployed_non_dp_rounds_draw_fresh_seeds_and_simulation_keeps_the_jobs(
        site_dir, task_identity, monkeypatch):
    """Two rounds of a deployed site cannot be lined up sample by sample (their data order
    and augmentation come from os.urandom); a simulated partition keeps the job's seed."""
    seeds = []

    class Stop(Exception):
        pass

    def record(self, model, data, config, **kwargs):
        seeds.append(config.seed)
        raise Stop

    monkeypatch.setattr(Engine, "fit", record)
    message = _message(MessageType.TRAIN)
    job = decode_job(message.content[wire.CONFIG], site_seed=0)
    # the site's error mod turns any failure into a generic SiteError; the recorded seeds are
    # what the test reads, and each call must have reached Engine.fit (one seed per call)
    for _ in range(2):
        with pytest.raises(SiteError, match="site-failure"):
            make_client_app()(_message(MessageType.TRAIN), _context(site_dir))
    simulated = Context(run_id=11, node_id=7, node_config={wire.NODE_PARTITION_ID: 0},
                        state=RecordDict(), run_config={})
    with pytest.raises(SiteError, match="site-failure"):
        make_client_app(sim_data_root=site_dir.parent)(_message(MessageType.TRAIN), simulated)
    assert len(seeds) == 3
    from client.runtime import resolve_site
    site_seed = resolve_site(simulated, site_dir.parent).seed
    assert seeds[2] == decode_job(message.content[wire.CONFIG], site_seed=site_seed).train.seed
    assert seeds[0] != seeds[1] and job.train.seed not in seeds[:2]


def test_a_node_config_toml_planted_in_a_deployed_sites_data_folder_is_ignored(
        site_dir, task_identity):
    """Whoever can write into the PACS export folder plants ``node-config.toml`` turning the
    small-split suppression off; a deployed site (node config from its operator) ignores the
    file, while a simulated site keeps using it as its stand-in node config."""
    (site_dir / wire.NODE_CONFIG_FILE).write_text(f'"{wire.NODE_MIN_EVAL_SPLIT}" = 1\n')
    reply = make_client_app()(_message(MessageType.EVALUATE), _context(site_dir))
    assert not reply.has_error(), reply.error
    for split in wire.EVAL_SPLITS:       # 6 and 5 studies: below the default threshold of 10
        assert reply.content[wire.METRICS][f"{split}-{wire.EVAL_SUPPRESSED}"] == 1.0
    assert node_settings({}, site_dir, simulated=False) == {}
    assert node_settings({}, site_dir, simulated=True) == {wire.NODE_MIN_EVAL_SPLIT: 1}
