import numpy as np
import pytest
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


def _segmentation_site(masked: int, unmasked: int, empty: int, shift: int) -> dict:
    """One site's studies: ``masked`` with a lesion the model finds shifted by ``shift``
    pixels, ``empty`` masks without a lesion (Dice and HD95 undefined), ``unmasked`` studies
    without a mask (in ``n`` only)."""
    total = masked + empty + unmasked
    truth = torch.zeros(total, 8, 8, dtype=torch.long)
    truth[:masked, 2:6, 2:6] = 1
    answer = torch.roll(truth, shifts=shift, dims=2)
    return {"image": torch.zeros(total, 1, 8, 8), "present": torch.ones(total, 1, dtype=torch.bool),
            "mask": truth, "has_mask": torch.arange(total) < masked + empty, "answer": answer}


def _segment(batches: list[dict]) -> SplitMetrics:
    """The evaluator over the batches' studies, sent and decoded as a site's reply."""
    from models.segmentation import SegmentationConfig, SegmentationEvaluator
    from tests.models.test_segmentation import _Answers

    evaluator = SegmentationEvaluator(SegmentationConfig())
    for batch in batches:
        evaluator.update(_Answers(batch["answer"]), batch)
    return from_record(to_record(evaluator.compute(), "test"), "test")


def test_pooled_segmentation_figures_are_means_over_every_sites_masks():
    """Two sites whose masks and study counts disagree: A has 40 studies but 2 masks (found
    exactly), B 5 studies, all masked (4 lesions found one pixel off, 1 mask without a
    lesion). The pooled loss, Dice and HD95 are those of one evaluation over all 45 studies -
    each site weighted by the masks its figure averages over (A 2, B 5 for the loss, 4 for
    Dice and HD95), not by its studies (A 40, B 5)."""
    a, b = _segmentation_site(2, 38, 0, 0), _segmentation_site(4, 0, 1, 1)
    sites = [_segment([a]), _segment([b])]
    pooled, direct = pool(sites), _segment([a, b]).scalars()
    assert sites[0].means["dice"] == 1.0 and 0 < sites[1].means["dice"] < 1   # they differ
    for key in ("loss", "dice", "hd95", "n", "n_masks", "dice_undefined", "hd95_undefined"):
        assert pooled[key] == pytest.approx(direct[key], rel=1e-6), key    # float32 loss
    by_studies = np.average([s.means["dice"] for s in sites], weights=[s.n for s in sites])
    assert pooled["dice"] != pytest.approx(by_studies)         # the old rule's answer differs


def test_a_site_whose_figure_averages_over_no_study_weighs_nothing():
    """A site whose masks hold no lesion sends Dice 0.0 over none: left out of the pooled
    Dice (0.0 where no site has a Dice at all)."""
    found, empty = _segment([_segmentation_site(3, 0, 0, 0)]), _segment(
        [_segmentation_site(0, 20, 3, 0)])
    assert empty.means["dice"] == 0.0 and empty.studies("dice") == 0
    assert pool([found, empty])["dice"] == 1.0
    assert pool([empty])["dice"] == 0.0


def _clip_site(reports: int, without: int, tie: bool) -> SplitMetrics:
    """A site's CLIP evaluation (the real evaluator over given embeddings, one batch), sent
    and decoded: ``reports`` studies with orthogonal image and report embeddings (each
    retrieves its own: recall 1), then ``without`` studies without a report; with ``tie``
    study 1's report is study 0's image, so images 0 and 1 miss at k = 1."""
    from models.clip import CLIPConfig, CLIPEvaluator
    from tests.models.test_clip import _GivenEmbeddings

    n, dim = reports + without, 8
    image = torch.zeros(n, dim)
    image[:reports] = torch.eye(dim)[:reports]
    text = image.clone()
    if tie:
        text[1] = image[0]
    evaluator = CLIPEvaluator(CLIPConfig(embed_dim=dim), None)
    evaluator.update(_GivenEmbeddings(), {
        "image": image, "present": torch.ones(n, 4), "input_ids": text,
        "attention_mask": torch.ones(n, 1), "label": torch.zeros(n, dtype=torch.int64),
        "has_report": torch.arange(n) < reports})
    return from_record(to_record(evaluator.compute(), "test"), "test")


def test_pooled_clip_figures_are_means_over_every_sites_reports():
    """Two sites whose report fractions differ: A has 40 studies, 2 with a report (each
    retrieved: recall@1 1.0), B 5 studies, all with one (recall@1 3/5). Each site's loss and
    recall@k average over its reports, so the pooled ones weigh A by 2 and B by 5 (its
    ``n_reports``), not by 40 and 5 (its studies): A's two reports do not outvote B's five."""
    sites = [_clip_site(2, 38, tie=False), _clip_site(5, 0, tie=True)]
    assert [s.counts["n_reports"] for s in sites] == [2.0, 5.0]
    assert [s.means["recall_i2r_1"] for s in sites] == [1.0, pytest.approx(3 / 5)]
    pooled, reports = pool(sites), [2, 5]
    for key in ("recall_i2r_1", "recall_r2i_1", "recall_i2r_5"):
        by_reports = np.average([s.means[key] for s in sites], weights=reports)
        assert pooled[key] == pytest.approx(by_reports), key
    assert pooled["loss"] == pytest.approx(np.average([s.loss for s in sites], weights=reports))
    assert pooled["n_reports"] == 7.0 and pooled["n"] == 45.0
    by_studies = np.average([s.means["recall_i2r_1"] for s in sites], weights=[40, 5])
    assert pooled["recall_i2r_1"] != pytest.approx(by_studies)     # the old rule's answer
    assert pooled["loss"] != pytest.approx(np.average([s.loss for s in sites], weights=[40, 5]))
