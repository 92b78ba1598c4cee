"""Head tasks' training options: sequence dropout removes one present sequence per sample
while training (never at evaluation, never a sample's only sequence)."""

import pytest
import torch
from torch import nn

from models.tasks import ClassificationConfig, ClassificationTask, MultiLabelConfig, MultiLabelTask


class Spy(nn.Module):
    """Records what the task feeds the model; logits from the image sums so the loss has a
    gradient path."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(classes))
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, images, present):
        self.seen.append((images.clone(), present.clone()))
        return images.flatten(1).sum(1, keepdim=True) * self.weight


def _batch():
    present = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [0, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    images = torch.rand(4, 4, 8, 8) + 1.0                   # strictly positive everywhere
    images = images * present[:, :, None, None]
    return {"image": images, "present": present, "label": torch.tensor([0, 1, 2, 0])}


@pytest.mark.parametrize("task", [ClassificationTask(ClassificationConfig(sequence_dropout=1.0)),
                                  MultiLabelTask(MultiLabelConfig(sequence_dropout=1.0))],
                         ids=["classification", "multilabel"])
def test_training_drops_one_present_sequence_per_sample_and_evaluation_none(task):
    batch, model = _batch(), Spy()
    model.train()
    task.step(model, batch)
    images, present = model.seen[-1]
    removed = batch["present"] & ~present
    assert not (present & ~batch["present"]).any()              # nothing comes back
    assert removed.sum(1).tolist() == [1, 1, 0, 1]              # the single-sequence study keeps it
    for b, s in removed.nonzero().tolist():                     # removed = zeroed, as if absent
        assert images[b, s].abs().sum() == 0
    kept = present[:, :, None, None].expand_as(images)
    assert torch.equal(images[kept], batch["image"][kept])

    model.eval()
    task.step(model, batch)
    images, present = model.seen[-1]
    assert torch.equal(present, batch["present"]) and torch.equal(images, batch["image"])


def test_off_by_default_and_out_of_range_refused():
    batch, model = _batch(), Spy()
    model.train()
    ClassificationTask(ClassificationConfig()).step(model, batch)
    assert torch.equal(model.seen[-1][1], batch["present"])
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="sequence_dropout"):
            ClassificationConfig(sequence_dropout=bad)
        with pytest.raises(ValueError, match="sequence_dropout"):
            MultiLabelConfig(sequence_dropout=bad)


# ---------------------------------------------------------------- pseudo-labels (self-training)

class Biased(nn.Module):
    """Logits from each study's own image only: class ``k`` scores ``scale * mean(image)``
    for ``k = favoured``, 0 otherwise - confident where the image is bright."""

    def __init__(self, favoured: int = 2, scale: float = 10.0, classes: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(classes))
        self.favoured, self.scale = favoured, scale

    def forward(self, images, present):
        score = images.flatten(1).mean(1, keepdim=True) * self.scale
        onehot = torch.nn.functional.one_hot(torch.tensor(self.favoured), len(self.weight))
        return score * onehot + self.weight


class Studies(torch.utils.data.Dataset):
    """Items as StudyDataset gives them; ``labels`` without loading images."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"image": self.images[i], "present": torch.ones(4, dtype=torch.bool),
                "label": self.labels[i]}


def _studies():
    brightness = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.02])   # mean image value per study
    images = brightness[:, None, None, None].expand(6, 4, 8, 8).clone()
    return Studies(images, torch.tensor([0, 1, -1, -1, -1, -1]))


def test_pseudo_labels_only_unlabelled_confident_studies_each_on_its_own():
    from models.tasks import pseudo_labels

    data, model = _studies(), Biased()
    labels, weights = pseudo_labels(model, data, data.labels, threshold=0.9, weight=0.5)
    # study 0 is labelled (kept, although the model disagrees); 2 and 4 bright -> class 2
    # with p ~ 1; 3 and 5 dark -> p ~ 1/3 (and 0.34 for 5): no label, weight 0
    assert labels.tolist() == [0, 1, 2, -1, 2, -1]
    assert weights.tolist() == [1.0, 1.0, 0.5, 0.0, 0.5, 0.0]
    # each study judged alone: the same answer one study at a time, in any batch size
    for i in range(6):
        one = Studies(data.images[i:i + 1], data.labels[i:i + 1])
        alone, w = pseudo_labels(model, one, one.labels, threshold=0.9, weight=0.5, batch_size=1)
        assert (alone.item(), w.item()) == (labels[i].item(), weights[i].item())
    assert pseudo_labels(model, data, data.labels, 0.9, 0.5, batch_size=1)[0].equal(labels)


def test_a_site_left_with_nothing_to_learn_from_is_told_in_its_log(caplog):
    """No label and no confident study: the round would train on nothing (noise-only steps
    under DP-SGD) - the site's log says so; one pseudo-label is enough to stay quiet."""
    from models.tasks import ClassificationConfig, ClassificationTask

    data = _studies()
    task = ClassificationTask(ClassificationConfig(pseudo_label_threshold=0.9))
    with caplog.at_level("WARNING", logger="models.tasks"):
        task.training_data(Biased(), Studies(data.images[[3, 5]], torch.tensor([-1, -1])), 8)
    assert "this round's steps learn nothing" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="models.tasks"):
        task.training_data(Biased(), Studies(data.images[[2, 3]], torch.tensor([-1, -1])), 8)
    assert "learn nothing" not in caplog.text


def test_pseudo_labels_are_asked_of_the_study_without_augmentation():
    from models.tasks import pseudo_labels

    class Augmented(Studies):
        def __getitem__(self, i):             # the training view: a dark random crop, say
            return super().__getitem__(i) | {"image": torch.zeros(4, 8, 8)}

        def plain(self, i):
            return {k: v for k, v in super().__getitem__(i).items() if k != "label"}

    data = _studies()
    augmented = Augmented(data.images, data.labels)
    assert pseudo_labels(Biased(), augmented, data.labels, 0.9, 1.0)[0].tolist() == \
        [0, 1, 2, -1, 2, -1]


def test_pseudo_labelled_step_is_a_sum_of_per_sample_terms_over_the_whole_batch():
    """DP-SGD differentiates loss * n as the sum of per-sample losses: a study without a
    label contributes exactly 0, and no sample's term is scaled by how many others have a
    label (that would make one sample's gradient depend on the others)."""
    import torch.nn.functional as F

    task = ClassificationTask(ClassificationConfig(pseudo_label_threshold=0.9))
    batch, model = _batch(), Spy()
    batch["label"] = torch.tensor([0, -1, 2, 1])
    batch["label_weight"] = torch.tensor([1.0, 0.0, 0.5, 1.0])
    model.train()
    out = task.step(model, batch)
    logits = model(batch["image"], batch["present"]).float()
    per = F.cross_entropy(logits, batch["label"].clamp(min=0), reduction="none")
    want = per[0] + 0.5 * per[2] + per[3]
    assert out.n == 4
    torch.testing.assert_close(out.loss * out.n, want)
    model.zero_grad()
    (out.loss * out.n).backward()
    summed = model.weight.grad.clone()
    alone = torch.zeros(3)
    for i in range(4):               # one sample at a time, as the DP reference does
        model.zero_grad()
        one = task.step(model, {k: v[i:i + 1] for k, v in batch.items()})
        (one.loss * one.n).backward()
        if i == 1:
            assert model.weight.grad.abs().sum() == 0           # no label: no gradient
        alone += model.weight.grad
    torch.testing.assert_close(summed, alone)


def test_pseudo_labels_off_by_default_need_the_unlabelled_studies_and_checked_options():
    from models.task import DataNeeds

    off = ClassificationTask(ClassificationConfig(label_fraction=0.1))
    data = _studies()
    assert off.training_data(Biased(), data, 8) is data
    assert off.data_needs == DataNeeds(unlabelled=False, label_fraction=0.1)
    on = ClassificationTask(ClassificationConfig(label_fraction=0.1, pseudo_label_threshold=0.9,
                                                 pseudo_label_weight=0.5))
    assert on.data_needs == DataNeeds(unlabelled=True, label_fraction=0.1)
    relabelled = on.training_data(Biased(), data, 8)
    assert len(relabelled) == 6 and relabelled.labels.tolist() == [0, 1, 2, -1, 2, -1]
    assert relabelled[2]["label"] == 2 and relabelled[2]["label_weight"] == 0.5
    assert torch.equal(relabelled[2]["image"], data[2]["image"])
    for bad in (1 / 3, 0.2, 1.01, -0.5):
        with pytest.raises(ValueError, match="pseudo_label_threshold"):
            ClassificationConfig(pseudo_label_threshold=bad)
    ClassificationConfig(num_classes=2, pseudo_label_threshold=0.51)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="pseudo_label_weight"):
            ClassificationConfig(pseudo_label_threshold=0.9, pseudo_label_weight=bad)
