"""Views of a site's dataset for evaluation under missing data (nothing is copied or stored)."""

from __future__ import annotations

from torch.utils.data import Dataset


class WithoutSequence(Dataset):
    """``data`` with sequence ``index`` removed (zeroed, ``present=False``) from every study
    that has at least one other sequence: how a study missing that sequence looks."""

    def __init__(self, data: Dataset, index: int):
        self.data, self.index = data, index

    def __len__(self) -> int:
        return len(self.data)

    @property
    def labels(self):
        """The studies' labels: the same studies as ``data``'s."""
        return self.data.labels

    def __getitem__(self, i: int) -> dict:
        item = dict(self.data[i])
        if item["present"].sum() >= 2 and item["present"][self.index]:
            item["image"] = item["image"].clone()
            item["image"][self.index] = 0
            item["present"] = item["present"].clone()
            item["present"][self.index] = False
        return item
