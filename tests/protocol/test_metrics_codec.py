"""protocol.metrics: one SplitMetrics <-> the keys of an evaluate reply, on both sides."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import MetricRecord
from flwr.common.serde import metric_record_from_proto, metric_record_to_proto

from models.metrics import SplitMetrics, macro_auroc, mcc
from models.tasks import ClassificationConfig, ClassificationTask, MultiLabelConfig, MultiLabelTask
from protocol.metrics import from_record, report_splits, to_record
from strategies.pooling import pool


def _over_the_wire(record: MetricRecord) -> MetricRecord:
    """What the server receives: the record through Flower's protobuf serialisation."""
    return metric_record_from_proto(metric_record_to_proto(record))


def _site(rng, n: int, k: int = 3) -> SplitMetrics:
    """A site's classification result from a random confusion matrix."""
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (rng.integers(0, k, n), rng.integers(0, k, n)), 1)
    return SplitMetrics(n=n, loss=float(rng.uniform(0.5, 2)), confusion=cm,
                        auroc=float(rng.uniform(0.5, 1)), seconds=0.25)


def test_round_trip_of_every_field_through_flower_serialisation():
    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    findings = np.array([[[9, 2], [3, 2]], [[10, 1], [1, 4]]])
    cases = [SplitMetrics(n=16, loss=0.8, confusion=cm, auroc=0.75, seconds=1.5),
             SplitMetrics(n=16, loss=0.4, finding_confusions=findings, auroc=None),
             SplitMetrics(n=7, loss=1.25, auroc=0.5,
                          means={"recall_i2r_1": 0.25, "recall_r2i_5": 1.0},
                          counts={"n_reports": 6.0}),
             SplitMetrics(n=0, loss=0.0, confusion=np.zeros((3, 3)))]
    for split in ("val", "personal-test", "test-without-T1ce", "external"):
        for metrics in cases:
            record = _over_the_wire(to_record(metrics, split))
            assert all(k.startswith(f"{split}-") for k in record)
            assert from_record(record, split) == metrics
    record = to_record(cases[0], "val")
    assert record["val-confusion"] == [5, 1, 0, 2, 3, 1, 0, 0, 4]     # one list, row-major
    assert record["val-confusion-shape"] == [3, 3]
    assert not any("cm_" in k or "auroc-defined" in k for k in record)


def test_auroc_travels_only_where_defined_and_the_key_set_stays_fixed():
    defined = to_record(SplitMetrics(n=4, loss=1.0, confusion=np.eye(2) * 2, auroc=0.9), "test")
    undefined = to_record(SplitMetrics(n=4, loss=1.0, confusion=np.diag([4, 0]), auroc=None),
                          "test")
    assert set(defined) == set(undefined)         # Flower refuses differing key sets
    assert defined["test-auroc"] == [0.9] and undefined["test-auroc"] == []
    assert from_record(_over_the_wire(undefined), "test").auroc is None
    assert "auroc" not in from_record(undefined, "test").scalars()


@pytest.mark.parametrize("task", [ClassificationTask(ClassificationConfig(num_classes=3)),
                                  MultiLabelTask(MultiLabelConfig(num_classes=4))],
                         ids=["classification", "multilabel"])
def test_an_empty_split_sends_the_same_keys_as_a_measured_one(task):
    evaluator = task.evaluator()
    logits = torch.randn(5, task.config.num_classes)
    evaluator.update(lambda image, present: logits,
                     {"image": torch.zeros(5, 1), "present": torch.ones(5, 1),
                      "label": torch.tensor([0, 1, 2, 1, 0])})
    measured, empty = evaluator.compute(), task.evaluator().compute()
    assert measured.n == 5 and empty.n == 0
    assert set(to_record(measured, "val")) == set(to_record(empty, "val"))


def test_pooled_mcc_of_two_sites_is_the_mcc_of_their_summed_confusion():
    rng = np.random.default_rng(0)
    a, b = _site(rng, 23), _site(rng, 41)
    pooled = pool([from_record(_over_the_wire(to_record(s, "test")), "test") for s in (a, b)])
    assert pooled["mcc"] == pytest.approx(mcc(a.confusion + b.confusion), abs=1e-15)
    assert pooled["mcc"] != pytest.approx(np.mean([mcc(a.confusion), mcc(b.confusion)]))
    assert pooled["n"] == 64
    assert pooled["loss"] == pytest.approx((23 * a.loss + 41 * b.loss) / 64)


def test_undefined_auroc_at_one_site_is_left_out_of_the_weighted_mean():
    rng = np.random.default_rng(1)
    a, b = _site(rng, 10), _site(rng, 30)
    c = SplitMetrics(n=50, loss=1.0, confusion=np.diag([50, 0, 0]), auroc=None)   # one class
    pooled = pool([from_record(to_record(s, "val"), "val") for s in (a, b, c)])
    assert pooled["auroc"] == pytest.approx((10 * a.auroc + 30 * b.auroc) / 40)
    assert pooled["n"] == 90                       # ... while its counts still pool
    assert "auroc" not in pool([c])                # nowhere defined: no AUROC at all


def test_pooled_per_study_means_are_weighted_by_n_and_counts_summed():
    sites = [SplitMetrics(n=n, loss=0.0, means={"dice": d}, counts={"hd95_undefined": u})
             for n, d, u in ((2, 0.5, 1.0), (6, 0.9, 0.0))]
    pooled = pool([from_record(to_record(s, "test"), "test") for s in sites])
    assert pooled["dice"] == pytest.approx((2 * 0.5 + 6 * 0.9) / 8)
    assert pooled["hd95_undefined"] == 1.0


def _good() -> dict:
    metrics = SplitMetrics(n=6, loss=0.5, confusion=np.array([[3, 0], [1, 2]]), auroc=0.8)
    return dict(to_record(metrics, "val"))


@pytest.mark.parametrize("change, reason", [
    ({"val-confusion": [3, 0, 1]}, "holds 3 counts but its shape is \\[2, 2\\]"),
    ({"val-confusion-shape": [2, 3]}, "holds 4 counts but its shape is \\[2, 3\\]"),
    ({"val-confusion": [3, 0, 1, 2, 0]}, "holds 5 counts"),
    ({"val-confusion": [4, -1, 1, 2]}, "non-negative whole counts"),
    ({"val-confusion": [3.0, 0.0, float("nan"), 2.0]}, "NaN"),
    ({"val-confusion": [2.5, 0.5, 1.0, 2.0]}, "whole counts"),
    ({"val-confusion": [3, 0, 1, 3]}, "counts 7 studies but n is 6"),
    ({"val-confusion-shape": [1, 1], "val-confusion": [6]}, "\\[K, K\\] matrix, K >= 2"),
    ({"val-auroc": [0.8, 0.7]}, "expected \\[value\\] or \\[\\]"),
    ({"val-auroc": [float("nan")]}, "NaN"),
    ({"val-auroc": [1.5]}, "auroc must be in \\[0, 1\\]"),
    ({"val-confusion": 6.0}, "must be a list of numbers"),
    ({"val-n": [6]}, "'val-n' must be a number"),
    ({"val-n": 5.5}, "whole number"),
])
def test_malformed_replies_are_refused_with_the_reason(change, reason):
    from_record(_good(), "val")                    # the unchanged reply decodes
    with pytest.raises(ValueError, match="split 'val' refused") as refused:
        from_record(_good() | change, "val")
    assert refused.match(reason)


def test_missing_fields_and_malformed_finding_confusions_are_refused():
    bad = _good()
    del bad["val-loss"]
    with pytest.raises(ValueError, match="'val-loss' is missing"):
        from_record(bad, "val")
    findings = dict(to_record(SplitMetrics(n=3, loss=0.1,
                                           finding_confusions=[[[1, 1], [0, 1]]]), "val"))
    with pytest.raises(ValueError, match="every finding's confusion must count"):
        from_record(findings | {"val-finding-confusions": [1, 1, 0, 0]}, "val")
    with pytest.raises(ValueError, match="\\[F, 2, 2\\]"):
        from_record(findings | {"val-finding-confusions-shape": [1, 4]}, "val")


def test_sites_with_different_confusion_shapes_are_not_pooled():
    a = SplitMetrics(n=2, loss=0.0, confusion=np.eye(2) * 1)
    b = SplitMetrics(n=3, loss=0.0, confusion=np.diag([1, 1, 1]))
    with pytest.raises(ValueError, match="different shapes"):
        pool([a, b])


def test_splits_of_a_reply_and_their_prefixes_do_not_bleed_into_each_other():
    record = MetricRecord()
    test = SplitMetrics(n=4, loss=1.0, means={"dice": 0.5})
    without = SplitMetrics(n=4, loss=2.0, means={"dice": 0.1})
    for split, metrics in (("val", test), ("test", test), ("test-without-T1", without)):
        record.update(to_record(metrics, split))
    assert report_splits(record) == ["val", "test", "test-without-T1"]
    assert from_record(record, "test") == test     # not test-without-T1's keys
    assert from_record(record, "test-without-T1") == without


def test_classification_evaluator_figures_match_the_direct_computation():
    rng = np.random.default_rng(2)
    task = ClassificationTask(ClassificationConfig(num_classes=3))
    evaluator = task.evaluator()
    logits = torch.tensor(rng.normal(size=(17, 3)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 3, 17))
    for part in (slice(0, 5), slice(5, 17)):      # two batches: one split
        evaluator.update(lambda image, present, part=part: logits[part],
                         {"image": torch.zeros(1), "present": torch.zeros(1),
                          "label": labels[part]})
    got = from_record(_over_the_wire(to_record(evaluator.compute(), "val")), "val")
    probs = logits.softmax(1).numpy()
    assert got.n == 17 and got.confusion.sum() == 17
    assert got.auroc == pytest.approx(macro_auroc(labels.numpy(), probs))
    assert math.isclose(got.loss, float(torch.nn.functional.cross_entropy(logits, labels)),
                        rel_tol=1e-6)
