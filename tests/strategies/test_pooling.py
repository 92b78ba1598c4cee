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
