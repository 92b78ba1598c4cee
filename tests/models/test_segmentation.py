"""Segmentation's evaluator says over how many studies each of its figures is a mean, so that
a site's smallest-count floor can check them (``client.queries.split_counts``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.segmentation import SegmentationConfig, SegmentationEvaluator


class _Answers(nn.Module):
    """A segmenter that answers the given masks (lesion logit +9 where they hold 1)."""

    def __init__(self, masks: torch.Tensor):
        super().__init__()
        self.masks = masks

    def forward(self, image, present):
        lesion = self.masks.float() * 18 - 9                          # [B, H, W]
        return torch.stack([-lesion, lesion], 1)                      # [B, 2, H, W]


def test_the_evaluator_counts_the_studies_each_figure_averages_over():
    """Four studies: a lesion found exactly, a lesion missed (Dice 0, HD95 undefined), a
    mask without a lesion (Dice and HD95 undefined) and a study without a mask. The figures
    are means over the masked studies that define them, and each of those counts is sent:
    ``n_masks`` 3, ``dice_undefined`` 1 (Dice over 2), ``hd95_undefined`` 2 (HD95 over 1)."""
    truth = torch.zeros(4, 8, 8, dtype=torch.long)
    truth[0, 2:5, 2:5] = 1
    truth[1, 3:6, 3:6] = 1
    truth[3, 1:4, 1:4] = 1                          # unmasked: its "mask" is never read
    answer = truth.clone()
    answer[1] = 0                                   # the lesion of study 1 is missed
    batch = {"image": torch.zeros(4, 1, 8, 8), "present": torch.ones(4, 1, dtype=torch.bool),
             "mask": truth, "has_mask": torch.tensor([True, True, True, False])}
    evaluator = SegmentationEvaluator(SegmentationConfig())
    evaluator.update(_Answers(answer), batch)
    metrics = evaluator.compute()
    assert metrics.n == 4
    assert dict(metrics.counts) == {"n_masks": 3.0, "dice_undefined": 1.0,
                                    "hd95_undefined": 2.0}
    assert metrics.means["dice"] == pytest.approx(0.5)           # (1 + 0) / 2
    assert metrics.means["hd95"] == pytest.approx(0.0)           # study 0's, exact
