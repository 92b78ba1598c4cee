"""Studies to tensors: ``image [S, H, W]`` (2D) or ``image [S, D, H, W]`` (3D layouts) +
``present [S]`` (transforms: ``.transforms``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .rows import open_rows, row_file_name
from .sequences import SEQUENCES
from .site import Study
from .transforms import augmentation, resize, study_transform

log = logging.getLogger(__name__)

# Bump when the preparation below changes, so row files prepared by old code are not reused.
PREPARE_VERSION = 1


def _as_slice(pixels: np.ndarray) -> np.ndarray:
    """2D models see the middle slice of a volume."""
    return pixels[pixels.shape[0] // 2] if pixels.ndim == 3 else pixels


class StudyDataset(Dataset):
    """Pre-transformed tensors for a list of studies: in memory, or with a ``store`` (a
    deployed site's cache directory, :mod:`client.data.cache`) in a row file on the site's
    disk, prepared once and read one item at a time (:mod:`client.data.rows`), so a large
    site trains in bounded memory and a later process skips the preparation.

    Absent sequences are all-zero channels with ``present=False``; the model masks them out.
    With a ``text_transform`` (e.g. ``CLIPTask.tokenize``: list of texts -> dict of tensors
    with one row per text), items also carry its outputs for the study's report and
    ``has_report``; a study without a report is transformed as an empty string and has
    ``has_report=False``. With ``masks``, items carry the lesion ``mask [H, W]`` (zeros and
    ``has_mask=False`` for a study without one), moved by the same augmentation as the image.
    ``sequences``: the input channels in model order (a layout's ``input_channels``);
    ``normalize=False`` keeps the reader's intensities (see :func:`study_transform`).
    ``spatial_dims=3`` (a 3D layout): each channel is a volume ``[D, H, W]`` (the layout's
    grid), resized to the ``image_size`` cube; no middle slice is taken.
    ``shared_store`` (a simulation's throw-away cache, shared by the processes that serve a
    site): the row file is written without fsync and read back into memory at once, not per
    item - one process prepares, the others read it once.
    """

    def __init__(self, studies: list[Study], image_size: int, sequences=SEQUENCES, *,
                 augment: bool = False,
                 text_transform: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
                 masks: bool = False, normalize: bool = True, spatial_dims: int = 2,
                 store: Path | None = None, shared_store: bool = False):
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if masks and spatial_dims == 3:
            raise ValueError("lesion masks are 2D only; a 3D layout has no segmentation yet")
        transform = study_transform(image_size, normalize=normalize)
        keys = ("image", "mask") if masks else ("image",)
        self.augment = augmentation(keys, spatial_dims) if augment else None
        self.masks = [] if masks else None
        self.items = []
        sequences = tuple(sequences)
        presents = [np.array([seq in s.images for seq in sequences], dtype=bool) for s in studies]

        def prepare(study: Study, present: np.ndarray) -> torch.Tensor:
            stack = np.zeros((len(sequences), *[image_size] * spatial_dims), dtype=np.float32)
            for i, seq in enumerate(sequences):
                if present[i]:
                    pixels = study.images[seq] if spatial_dims == 3 \
                        else _as_slice(study.images[seq])
                    pixels = pixels.astype(np.float32)[None]             # [1, (D,) H, W]
                    # Each sequence is resized on its own: vendors may acquire sequences at
                    # different matrix sizes, and a study must not lose a sequence for it.
                    stack[i] = resize(pixels, image_size, "area")[0]
            out = transform({"image": stack})
            keep = torch.as_tensor(present, dtype=torch.float32)
            return out["image"] * keep.reshape(-1, *[1] * spatial_dims)

        prepared = (prepare(s, p) for s, p in zip(studies, presents))
        # With a ``store`` (the site cache's directory) the prepared images live in a row
        # file on the site's disk, read per item; else in memory.
        self.rows = None
        if store is not None:
            spec = {"version": PREPARE_VERSION, "studies": [s.key for s in studies],
                    "size": image_size, "sequences": list(sequences),
                    "normalize": normalize, "dims": spatial_dims}
            try:
                self.rows = open_rows(store, row_file_name(spec), len(studies),
                                      (len(sequences), *[image_size] * spatial_dims), prepared,
                                      durable=not shared_store)
                prepared = (None for _ in studies)
                if shared_store:        # in memory from here on (rows of one block)
                    prepared, self.rows = iter(self.rows.read_all()), None
            except OSError:
                log.warning("prepared images could not be written to the site cache; "
                            "keeping them in memory")
                prepared = (prepare(s, p) for s, p in zip(studies, presents))
        for study, present, image in zip(studies, presents, prepared):
            self.items.append((image, torch.as_tensor(present), torch.tensor(study.label)))
            if masks:
                mask = np.zeros((1, image_size, image_size), dtype=np.float32)
                if study.mask is not None:
                    mask = resize(_as_slice(study.mask).astype(np.float32)[None], image_size,
                                  "nearest")
                self.masks.append((torch.as_tensor(mask, dtype=torch.float32),
                                   torch.tensor(study.mask is not None)))
        self.text = None if text_transform is None else _report_fields(studies, text_transform)

    def image(self, i: int) -> torch.Tensor:
        """The prepared ``[S, (D,) H, W]`` image of item ``i`` (before augmentation)."""
        return self.items[i][0] if self.rows is None else self.rows[i]

    def __len__(self) -> int:
        return len(self.items)

    def plain(self, i: int) -> dict[str, torch.Tensor]:
        """Item ``i``'s image and present sequences without augmentation: what a model is
        asked about the study itself (e.g. for its pseudo-label)."""
        return {"image": self.image(i), "present": self.items[i][1]}

    @property
    def labels(self) -> torch.Tensor:
        """``[N]`` labels of the studies (-1: unlabelled), without loading any image."""
        return torch.stack([label for _, _, label in self.items]) if self.items \
            else torch.zeros(0, dtype=torch.long)

    def reseed(self, seed: int) -> None:
        """Make the random augmentation of the next pass reproducible."""
        if self.augment is not None:
            self.augment.set_random_state(seed=seed % 2**32)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        _, present, label = self.items[i]
        data = {"image": self.image(i)}
        if self.masks is not None:
            data["mask"] = self.masks[i][0]
        if self.augment is not None:
            data = self.augment(data)
        item = {"image": torch.as_tensor(data["image"]).contiguous(), "present": present,
                "label": label}
        if self.masks is not None:
            item["mask"] = torch.as_tensor(data["mask"])[0].round().long().contiguous()
            item["has_mask"] = self.masks[i][1]
        if self.text is not None:
            item |= {key: value[i] for key, value in self.text.items()}
        return item


def _report_fields(studies: list[Study], text_transform: Callable) -> dict[str, torch.Tensor]:
    """The transform's tensors for every study's report at once, plus ``has_report``."""
    has = [bool(s.report and s.report.strip()) for s in studies]
    fields = dict(text_transform([s.report if h else "" for s, h in zip(studies, has)]))
    bad = sorted(k for k, v in fields.items() if len(v) != len(studies))
    if bad or "has_report" in fields:
        raise ValueError(f"text_transform must return one row per text and no 'has_report' "
                         f"(got {bad or 'has_report'})")
    return fields | {"has_report": torch.tensor(has, dtype=torch.bool)}
