import numpy as np

from models.metrics import classification_metrics
from models.tasks import ClassificationConfig, ClassificationTask
from strategies.pooling import pool


def test_pooled_metrics_equal_metrics_of_concatenated_predictions():
    rng = np.random.default_rng(0)
    task = ClassificationTask(ClassificationConfig(num_classes=3))
    parts, all_labels, all_probs = [], [], []
    for n in (7, 19, 11):
        labels = rng.integers(0, 3, n)
        probs = rng.dirichlet([1, 1, 1], n)
        site = task.summarize(np.ones(n), probs, labels) | {"n": float(n)}
        site["auroc-defined"] = float("auroc" in site)
        parts.append(site)
        all_labels.append(labels)
        all_probs.append(probs)
    pooled = pool(parts)
    direct = classification_metrics(np.concatenate(all_labels), np.concatenate(all_probs))
    for key in ("accuracy", "mcc", "f1", "balanced_accuracy"):
        assert abs(pooled[key] - direct[key]) < 1e-12
    assert pooled["n"] == 37


def test_empty_sites_are_ignored():
    assert pool([{"n": 0.0, "loss": 0.0}]) == {}


def test_pooled_multilabel_metrics_equal_metrics_of_concatenated_predictions():
    from models.metrics import multilabel_confusions, multilabel_from_confusions
    from models.tasks import MultiLabelConfig, MultiLabelTask, finding_targets

    rng = np.random.default_rng(1)
    task = MultiLabelTask(MultiLabelConfig(num_classes=3, threshold=0.4))
    parts, all_labels, all_probs = [], [], []
    for n in (9, 23, 14):
        labels = rng.integers(0, 8, n)                      # bitmasks over 3 findings
        probs = rng.uniform(0, 1, (n, 3))
        site = task.summarize(np.ones(n), probs, labels) | {"n": float(n)}
        assert set(site) - {"auroc"} == set(task.empty_summary()) | {"n"}   # fixed key set
        parts.append(site)
        all_labels.append(labels)
        all_probs.append(probs)
    pooled = pool(parts)
    targets = finding_targets(np.concatenate(all_labels), 3)
    direct = multilabel_from_confusions(multilabel_confusions(targets, np.concatenate(all_probs),
                                                              0.4))
    for key in ("accuracy", "mcc", "f1", "balanced_accuracy", "f1_class_2"):
        assert abs(pooled[key] - direct[key]) < 1e-12
    assert pooled["n"] == 46
