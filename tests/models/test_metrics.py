import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, matthews_corrcoef, roc_auc_score

from models.metrics import binary_auroc, classification_metrics, confusion_matrix, per_class_f1
from models.tasks import build


@pytest.mark.parametrize("seed", range(5))
def test_metrics_agree_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, 60)
    probs = rng.dirichlet([1, 1, 1], 60)
    probs[np.arange(60), labels] += rng.uniform(0, 0.6, 60)       # some signal
    probs /= probs.sum(1, keepdims=True)
    m = classification_metrics(labels, probs)
    preds = probs.argmax(1)
    assert m["mcc"] == pytest.approx(matthews_corrcoef(labels, preds))
    assert m["f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    assert per_class_f1(confusion_matrix(labels, preds, 3)) == pytest.approx(
        list(f1_score(labels, preds, average=None)))


def test_auroc_handles_ties_and_undefined_cases():
    assert binary_auroc(np.array([0.5, 0.5]), np.array([True, False])) == 0.5
    assert binary_auroc(np.array([0.1, 0.2]), np.array([True, True])) is None
    m = classification_metrics(np.zeros(4, int), np.tile([0.6, 0.3, 0.1], (4, 1)))
    assert "auroc" not in m and m["accuracy"] == 1.0 and m["mcc"] == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_multilabel_metrics_agree_with_sklearn(seed):
    from models.metrics import multilabel_auroc, multilabel_confusions, multilabel_from_confusions

    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 2, (50, 3))
    probs = np.clip(0.35 * targets + rng.uniform(0, 0.65, (50, 3)), 0, 1)     # some signal
    m = multilabel_from_confusions(multilabel_confusions(targets, probs, 0.5))
    preds = (probs >= 0.5).astype(int)
    assert m["mcc"] == pytest.approx(np.mean([matthews_corrcoef(targets[:, k], preds[:, k])
                                              for k in range(3)]))
    assert m["f1"] == pytest.approx(f1_score(targets, preds, average="macro", zero_division=0))
    assert [m[f"f1_class_{k}"] for k in range(3)] == pytest.approx(
        list(f1_score(targets, preds, average=None, zero_division=0)))
    assert m["accuracy"] == pytest.approx((targets == preds).mean())
    assert multilabel_auroc(targets, probs) == pytest.approx(
        roc_auc_score(targets, probs, average="macro"))
    targets[:, 1] = 1                    # a finding present in every study: AUROC of the others
    assert multilabel_auroc(targets, probs) == pytest.approx(np.mean(
        [roc_auc_score(targets[:, k], probs[:, k]) for k in (0, 2)]))


def test_split_metrics_derives_the_figures_from_its_confusion_matrix():
    from models.metrics import SplitMetrics

    rng = np.random.default_rng(7)
    labels = rng.integers(0, 3, 40)
    probs = rng.dirichlet([1, 1, 1], 40)
    cm = confusion_matrix(labels, probs.argmax(1), 3)
    direct = classification_metrics(labels, probs)
    figures = SplitMetrics(n=40, loss=0.7, confusion=cm, auroc=direct["auroc"]).scalars()
    assert figures == pytest.approx(direct | {"n": 40.0, "loss": 0.7}
                                    | {f"f1_class_{k}": f for k, f in enumerate(per_class_f1(cm))})


def test_split_metrics_refuses_inconsistent_values():
    from models.metrics import SplitMetrics

    with pytest.raises(ValueError, match="counts 5 studies but n is 4"):
        SplitMetrics(n=4, loss=0.0, confusion=np.array([[2, 1], [1, 1]]))
    with pytest.raises(ValueError, match="non-negative whole counts"):
        SplitMetrics(n=2, loss=0.0, finding_confusions=np.array([[[3, -1], [0, 0]]]))
    with pytest.raises(ValueError, match="may not reuse the derived names"):
        SplitMetrics(n=2, loss=0.0, means={"mcc": 0.5})
    with pytest.raises(ValueError, match="auroc must be in"):
        SplitMetrics(n=2, loss=0.0, auroc=float("nan"))
    frozen = SplitMetrics(n=2, loss=0.0, confusion=np.eye(2, dtype=int))
    with pytest.raises(ValueError):
        frozen.confusion[0, 0] = 5                       # read-only: what was sent stays


@pytest.mark.parametrize("counts", [{"n_masks": 1000.0},
                                    {"n_masks": 4.0, "dice_undefined": 5.0}],
                         ids=["more-masks-than-studies", "more-undefined-than-masks"])
def test_attack_a_figure_may_not_claim_more_studies_than_its_split(counts):
    """A pooled Dice weighs each site by the studies it averages over (``n_masks`` less
    ``dice_undefined``): a site of 10 studies claiming 1000 masks would outweigh every honest
    site, one claiming more undefined than masks would weigh below zero. Both are refused
    (as is a loss over more masks than studies), the honest counts accepted."""
    from models.metrics import SplitMetrics

    with pytest.raises(ValueError, match="not between 0 and n = 10"):
        SplitMetrics(n=10, loss=0.5, means={"dice": 0.9}, counts=counts)
    with pytest.raises(ValueError, match="loss averages over n_masks"):
        SplitMetrics(n=10, loss=0.5, counts={"n_masks": 11.0})


def test_attack_a_clip_figure_may_not_claim_more_reports_than_its_split():
    """CLIP's loss and recall@k weigh by ``n_reports`` in a pool: a site of 10 studies
    claiming 1000 reports would outweigh every honest site; one reporting both a mask and a
    report count would choose which weighs its loss. Both are refused, the honest count
    accepted."""
    from models.metrics import SplitMetrics

    with pytest.raises(ValueError, match="averages over n_reports .* not between 0 and n = 10"):
        SplitMetrics(n=10, loss=0.5, means={"recall_i2r_1": 0.9}, counts={"n_reports": 1000.0})
    with pytest.raises(ValueError, match="loss averages over n_reports .* and n = 0"):
        SplitMetrics(n=0, loss=0.0, counts={"n_reports": 1.0})   # weighs 0, still refused
    with pytest.raises(ValueError, match=r"loss averages over one of \['n_masks', 'n_reports'\]"):
        SplitMetrics(n=10, loss=0.5, counts={"n_masks": 2.0, "n_reports": 9.0})
    honest = SplitMetrics(n=10, loss=0.5, means={"recall_i2r_1": 0.9}, counts={"n_reports": 4.0})
    assert honest.studies("recall_i2r_1") == honest.studies("loss") == 4.0
    honest = SplitMetrics(n=10, loss=0.5, means={"dice": 0.9},
                          counts={"n_masks": 4.0, "dice_undefined": 1.0})
    assert (honest.studies("dice"), honest.studies("loss"), honest.studies("other")) == (3, 4, 10)


@pytest.mark.parametrize("kind", ["means", "counts"])
def test_no_mean_or_count_may_take_the_name_of_a_confusion_derived_figure(kind):
    """Every figure ``scalars`` derives from the counts (any class count, multi-class or
    multi-label) is refused as a mean or count name: pooled, a site's mean under that name
    would replace the figure of the pooled counts (``f1_class_0`` once did)."""
    from models.metrics import SplitMetrics, confusion_metrics, multilabel_from_confusions

    rng = np.random.default_rng(1)
    derived = {"n", "loss", "auroc"}
    for k in (2, 3, 7):
        derived |= set(confusion_metrics(rng.integers(0, 5, (k, k))))
        derived |= set(multilabel_from_confusions(rng.integers(0, 5, (k, 2, 2))))
    assert {"f1_class_0", "f1_class_6"} <= derived
    for name in sorted(derived):
        with pytest.raises(ValueError, match="may not reuse the derived names"):
            SplitMetrics(n=3, loss=0.0, confusion=np.diag([1, 2]), **{kind: {name: 0.1}})
    assert SplitMetrics(n=3, loss=0.0, means={"dice": 0.1}).scalars()["dice"] == 0.1


def _reported_names() -> set[str]:
    """Every figure an evaluated split reports, read off the code: each project task's
    evaluator over a tiny batch and over no studies, and the names ``SplitMetrics`` derives
    (``DERIVED``); one name per class, finding or recall@k (``f1_class_0``, ``recall_i2r_5``)
    is written ``..._<k>``."""
    from models.metrics import DERIVED

    from .test_objectives import PROJECT_TASKS, TINY, _batch, _for

    names = set(DERIVED)
    for name in PROJECT_TASKS:
        torch.manual_seed(0)
        model, task = build("mmvit", TINY, name, {"class_names": ["a", "b", "c"]}
                            if name == "clip" else {})        # CLIP's zero-shot AUROC too
        evaluator = task.evaluator()
        batch = _for(task, _batch())
        evaluator.update(model.eval(), batch | {"label": batch["label"].clamp(min=0)})  # labelled
        names |= set(evaluator.compute().scalars()) | set(task.evaluator().compute().scalars())
    return {re.sub(r"_\d+$", "_<k>", name) for name in names}


def test_the_readme_lists_the_metrics_the_code_reports():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    paragraph = re.split(r"\n\n|\n\*\*", readme.split("**Evaluation.**", 1)[1])[0]
    listed = set(re.findall(r"`([a-z][a-z0-9_]*(?:<k>)?)`", paragraph))
    reported = _reported_names()
    assert listed == reported, (f"README lists {sorted(listed - reported)} that no evaluator "
                                f"reports; add {sorted(reported - listed)}")
