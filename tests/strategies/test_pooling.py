import numpy as np
import torch

from models.metrics import SplitMetrics, classification_metrics
from models.tasks import ClassificationConfig, ClassificationTask
from protocol.metrics import from_record, to_record
from strategies.pooling import pool


def _evaluate(task, logits: np.ndarray, labels: np.ndarray) -> SplitMetrics:
    """A site's evaluator over one batch, the model's logits given; sent and decoded."""
    evaluator = task.evaluator()
    evaluator.update(lambda image, present: torch.tensor(logits, dtype=torch.float32),
                     {"image": torch.zeros(len(labels)), "present": torch.zeros(len(labels)),
                      "label": torch.tensor(labels)})
    return from_record(to_record(evaluator.compute(), "test"), "test")


def test_pooled_metrics_equal_metrics_of_concatenated_predictions():
    rng = np.random.default_rng(0)
    task = ClassificationTask(ClassificationConfig(num_classes=3))
    parts, all_labels, all_probs = [], [], []
    for n in (7, 19, 11):
        labels = rng.integers(0, 3, n)
        logits = rng.normal(size=(n, 3))
        parts.append(_evaluate(task, logits, labels))
        all_labels.append(labels)
        all_probs.append(torch.tensor(logits, dtype=torch.float32).softmax(1).numpy())
    pooled = pool(parts)
    direct = classification_metrics(np.concatenate(all_labels), np.concatenate(all_probs))
    for key in ("accuracy", "mcc", "f1", "balanced_accuracy"):
        assert abs(pooled[key] - direct[key]) < 1e-12
    assert pooled["n"] == 37
    assert abs(pooled["auroc"] - np.average([p.auroc for p in parts], weights=[7, 19, 11])) \
        < 1e-12


def test_empty_sites_are_ignored():
    assert pool([SplitMetrics(n=0, loss=0.0)]) == {}
    site = SplitMetrics(n=3, loss=0.5, confusion=np.diag([1, 2]))
    assert pool([SplitMetrics(n=0, loss=0.0, confusion=np.zeros((2, 2))), site]) == pool([site])


def test_pooled_multilabel_metrics_equal_metrics_of_concatenated_predictions():
    from models.metrics import multilabel_confusions, multilabel_from_confusions
    from models.tasks import MultiLabelConfig, MultiLabelTask, finding_targets

    rng = np.random.default_rng(1)
    task = MultiLabelTask(MultiLabelConfig(num_classes=3, threshold=0.4))
    empty = set(to_record(task.evaluator().compute(), "test"))
    parts, all_labels, all_probs = [], [], []
    for n in (9, 23, 14):
        labels = rng.integers(0, 8, n)                      # bitmasks over 3 findings
        logits = rng.normal(size=(n, 3))
        site = _evaluate(task, logits, labels)
        assert set(to_record(site, "test")) == empty        # fixed key set
        parts.append(site)
        all_labels.append(labels)
        all_probs.append(torch.tensor(logits, dtype=torch.float32).sigmoid().numpy())
    pooled = pool(parts)
    targets = finding_targets(np.concatenate(all_labels), 3)
    direct = multilabel_from_confusions(multilabel_confusions(targets, np.concatenate(all_probs),
                                                              0.4))
    for key in ("accuracy", "mcc", "f1", "balanced_accuracy", "f1_class_2"):
        assert abs(pooled[key] - direct[key]) < 1e-12
    assert pooled["n"] == 46
