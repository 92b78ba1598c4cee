"""What ``medfed predict`` writes for a segmentation version (``voxel_softmax``): one mask per
study and one CSV row per study, in the ``--out`` folder.

- ``OUT/masks/<study key>.npy``: the study's mask on the model's grid (``[H, W]`` or
  ``[D, H, W]``, the preprocessed study's, :mod:`protocol.serving`), ``uint8``, each voxel the
  index of its most probable class (0: background; :data:`SEGMENTATION_CLASS_NAMES`).
  NumPy's ``.npy`` rather than NIfTI, on purpose: the model's grid is not the scanner's (a 2D
  layout reads the middle slice and resizes it to ``image_size``; a 3D layout resamples onto
  its own grid and resizes again), so a NIfTI affine would either be invented (claiming 1 mm
  voxels at the origin) or built from DICOM geometry (ImagePositionPatient, PixelSpacing, ...),
  header values that must not leave the reader. A ``.npy`` file holds the array, its dtype
  and shape, nothing else; ``nibabel.Nifti1Image(np.load(f), affine)`` makes a NIfTI of it
  where the site knows its affine.
- ``OUT/predictions.csv``: ``study_key``, then per non-background class ``voxels_<c>`` (voxels
  whose most probable class is ``c``), ``fraction_<c>`` (of the grid's voxels), ``pmax_<c>``
  (the highest probability of ``c`` at any voxel), and ``predicted``: the classes present,
  joined by ``;``, or the background's name. A class is present when at least ``min_voxels``
  voxels of the mask are that class (default 1: any voxel the model calls lesion).

File names are the pseudonymous study keys (16 hex digits, :func:`client.data.pseudonyms.
pseudonym`), checked as such before anything is named after them.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol.serving import ServingSpec

from .predict import PredictError

MASKS = "masks"
CSV_FILE = "predictions.csv"
_PSEUDONYM = re.compile(r"[0-9a-f]{16}")


@dataclass
class MaskPredictions:
    """Per-study mask statistics of a segmentation version, and what was read and skipped."""

    spec: ServingSpec
    keys: list[str]                  # pseudonymous study keys
    voxels: np.ndarray               # [N, C-1] int64, voxels of each non-background class
    peaks: np.ndarray                # [N, C-1] float32, highest probability of each
    grid_voxels: int                 # voxels in one study's grid
    min_voxels: int                  # a class is present from this many voxels
    skipped: Counter                 # reason -> count (files, series, studies)
    files: int
    out: Path                        # the folder holding masks/ and predictions.csv

    @property
    def classes(self) -> tuple[str, ...]:
        """The non-background classes, in the model's order."""
        return self.spec.class_names[1:]

    def predicted(self) -> list[str]:
        """Per study: the classes present (``;``-joined), or the background's name."""
        background = self.spec.class_names[0]
        return [";".join(c for c, n in zip(self.classes, row) if n >= self.min_voxels)
                or background for row in self.voxels]

    def to_csv(self) -> str:
        """``study_key, voxels_<c>, fraction_<c>, pmax_<c> ..., predicted``: one row per study."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["study_key", *(f"{kind}_{c}" for c in self.classes
                                        for kind in ("voxels", "fraction", "pmax")),
                         "predicted"])
        for key, counts, peaks, label in zip(self.keys, self.voxels, self.peaks,
                                             self.predicted()):
            cells = [v for n, p in zip(counts, peaks)
                     for v in (int(n), f"{n / self.grid_voxels:.6f}", f"{p:.6f}")]
            writer.writerow([key, *cells, label])
        return out.getvalue()


def check_out_dir(out: Path | None, *, force: bool = False) -> Path:
    """``out`` as the folder a segmentation version's predictions go to: it must exist, and
    hold no earlier predictions unless ``force``.

    Raises
    ------
    PredictError
        No folder given, or it does not exist (it is not created: a mistyped path must not
        become a folder of masks somewhere else).
    FileExistsError
        Earlier predictions are there and ``force`` is not set.
    """
    if out is None:
        raise PredictError("this version segments: it writes a mask per study and "
                           "predictions.csv into a folder; pass --out FOLDER")
    out = Path(out)
    if not out.is_dir():
        raise PredictError(f"--out {out} is not an existing folder; create it first (this "
                           "version writes a mask per study into it)")
    earlier = [name for name in (CSV_FILE, MASKS) if (out / name).exists()]
    if earlier and not force:
        raise FileExistsError(f"{out} already holds predictions ({', '.join(earlier)}); "
                              "pass --force to replace them")
    return out


def segment(batches: Iterable[tuple[int, np.ndarray]], spec: ServingSpec, keys: list[str],
            out: Path, *, skipped: Counter, files: int, min_voxels: int = 1
            ) -> MaskPredictions:
    """Write each study's mask (argmax over classes) and ``predictions.csv`` into ``out``
    (checked by :func:`check_out_dir`); ``batches``: ``(start, probabilities [b, C,
    *spatial])`` in study order (:func:`medfed.predict.score_batches`), one in memory at a
    time; ``min_voxels`` >= 1 (:func:`medfed.predict.predict` checks it before loading the
    version). Earlier masks in ``out/masks`` and the earlier CSV are removed first: a study
    missing this time must not keep its old mask, and a run that stops part-way leaves no CSV
    (the CSV is put in place last, whole: its presence means the run completed)."""
    if any(_PSEUDONYM.fullmatch(k) is None for k in keys):
        # never the case for the readers' keys; checked because they become file names
        raise PredictError("a study key is not a pseudonym (16 hex digits); no file written")
    (out / CSV_FILE).unlink(missing_ok=True)
    masks = out / MASKS
    masks.mkdir(exist_ok=True)
    for old in masks.glob("*.npy"):
        if _PSEUDONYM.fullmatch(old.stem):
            old.unlink()
    classes = len(spec.class_names)
    voxels, peaks = [], []
    for start, probs in batches:
        labels = probs.argmax(1).astype(np.uint8)                       # [b, *spatial]
        for key, mask in zip(keys[start:start + len(labels)], labels):
            np.save(masks / f"{key}.npy", mask, allow_pickle=False)
        flat = labels.reshape(len(labels), -1)
        voxels.append(np.stack([(flat == c).sum(1) for c in range(1, classes)], 1))
        peaks.append(probs[:, 1:].reshape(len(labels), classes - 1, -1).max(-1))
    grid = int(np.prod(spec.output_shape()[1:]))
    result = MaskPredictions(spec, list(keys), np.concatenate(voxels), np.concatenate(peaks),
                             grid, min_voxels, skipped, files, out)
    partial = out / f".{CSV_FILE}.partial"
    partial.write_text(result.to_csv())
    os.replace(partial, out / CSV_FILE)
    return result
