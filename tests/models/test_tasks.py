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
