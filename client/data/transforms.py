"""Per-study preprocessing and augmentation of :class:`~client.data.dataset.StudyDataset`,
in plain PyTorch: MONAI 1.6's ``Resize``, ``NormalizeIntensityd(nonzero, channel_wise)``,
``EnsureTyped`` and ``Compose([RandFlipd, RandFlipd, RandRotate90d])`` reproduced bit for bit.

Why not MONAI itself here: importing any MONAI submodule runs ``monai/__init__.py``, which
imports every MONAI subpackage (networks, apps, handlers, transformers' BERT for TransCheX)
- about 5 s of CPU, four fifths of a ClientApp's start-up (``python -X importtime``). A site
builds its datasets for every train and evaluate message, Flower's process isolation starts
a fresh process per message, and every Ray actor of a simulation pays it once. These few
operations are all the dataset needs; the numbers (and the random numbers drawn, in the
same order from the same seeds) are MONAI's, which ``tests/client/test_transforms.py``
checks against MONAI on fixed seeds. MONAI stays the tool for everything else (UNETR
blocks, Dice/HD95, resampling volumes onto a grid).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

MAX_SEED = 2**32          # MONAI's ``MAX_SEED``: seeds live in [0, 2**32)

Sample = dict[str, torch.Tensor]


def resize(image: np.ndarray, size: int, mode: str) -> np.ndarray:
    """``[C, H, W]`` -> float32 ``[C, size, size]`` (``[C, D, H, W]`` -> ``[C, size, size,
    size]``) by ``torch.nn.functional.interpolate`` (``"area"`` for images, ``"nearest"`` for
    label masks); as MONAI's ``Resize``: no anti-aliasing, the input returned as float32 when
    it already has the size."""
    pixels = torch.as_tensor(image, dtype=torch.float32)
    target = (size,) * (pixels.ndim - 1)
    if tuple(pixels.shape[1:]) != target:
        pixels = F.interpolate(pixels[None], size=target, mode=mode)[0]
    return pixels.numpy()


def normalize_nonzero(image: np.ndarray) -> torch.Tensor:
    """Z-score each channel over its non-zero pixels (zeros stay zero; an all-zero channel is
    left as is; a constant one is only centred). ``[C, H, W]`` -> float32 tensor."""
    out = torch.tensor(image, dtype=torch.float32)
    for channel in out:
        nonzero = channel != 0
        if not nonzero.any():
            continue
        values = channel[nonzero]
        # Python floats, like MONAI's: the same float32 arithmetic, hence the same bits.
        mean = torch.mean(values).item()
        std = torch.std(values, unbiased=False).item() or 1.0
        channel[nonzero] = (values - mean) / std
    return out


def study_transform(image_size: int, *, normalize: bool = True) -> Callable[[dict], Sample]:
    """Z-score each present sequence on its own (sequences arrive resized to one grid);
    ``normalize=False``: the reader already put each channel on its scale (a layout's
    intensity handling, e.g. an X-ray's VOI window in [0, 1]). ``{"image": [S, H, W]}`` ->
    ``{"image": float32 tensor}``."""
    def transform(data: dict) -> Sample:
        image = data["image"]
        out = normalize_nonzero(image) if normalize else torch.as_tensor(image, dtype=torch.float32)
        return dict(data) | {"image": out}
    return transform


class FlipRotate:
    """Label-preserving flips of each spatial axis (p=0.5 each) and a rotation by k*90
    degrees, k uniform in 1..3 (p=0.75); every key of a sample moves together.

    Seeding and draws follow MONAI's ``Compose([RandFlipd(axis 0), RandFlipd(axis 1),
    RandRotate90d])``: the composition's ``RandomState(seed)`` draws one uint32 seed per
    step; per sample a flip draws ``rand()``, the rotation ``randint(3)`` then ``rand()``.
    """

    def __init__(self, keys: tuple[str, ...] = ("image",)):
        self.keys = tuple(keys)
        self._flips = [np.random.RandomState(), np.random.RandomState()]
        self._rotate = np.random.RandomState()

    def set_random_state(self, seed: int) -> FlipRotate:
        """Make the following samples reproducible (MONAI's ``Compose.set_random_state``)."""
        parent = np.random.RandomState(int(seed) % MAX_SEED)
        self._flips = [np.random.RandomState(int(parent.randint(MAX_SEED, dtype="uint32")))
                       for _ in self._flips]
        self._rotate = np.random.RandomState(int(parent.randint(MAX_SEED, dtype="uint32")))
        return self

    def __call__(self, data: Sample) -> Sample:
        out = dict(data)
        for spatial_axis, rng in enumerate(self._flips):
            if rng.rand() < 0.5:
                out |= {k: torch.flip(out[k], (spatial_axis + 1,)) for k in self.keys}
        quarter_turns = int(self._rotate.randint(3)) + 1      # drawn even when not rotating
        if self._rotate.rand() < 0.75:
            out |= {k: torch.rot90(out[k], quarter_turns, (1, 2)) for k in self.keys}
        return out


class VolumeFlips:
    """Volumes ``[C, D, H, W]`` on a layout's grid (superior, posterior, left): a left-right
    flip (p=0.5), nothing else; every key moves together. A volume's axes are anatomical: a
    head-foot or front-back flip puts the lungs under the liver or the spine in front, a
    body no site will ever send, and with all three flips the tiny 3D ViT learned the CT
    task about half as well (pooled test MCC ~0.35 against ~0.6 at 24 epochs, README).
    Seeded like :class:`FlipRotate`: one uint32 seed from the composition's seed."""

    AXIS = 2          # [D, H, W] = superior, posterior, left: W runs right to left

    def __init__(self, keys: tuple[str, ...] = ("image",)):
        self.keys = tuple(keys)
        self._flip = np.random.RandomState()

    def set_random_state(self, seed: int) -> VolumeFlips:
        parent = np.random.RandomState(int(seed) % MAX_SEED)
        self._flip = np.random.RandomState(int(parent.randint(MAX_SEED, dtype="uint32")))
        return self

    def __call__(self, data: Sample) -> Sample:
        out = dict(data)
        if self._flip.rand() < 0.5:
            out |= {k: torch.flip(out[k], (self.AXIS + 1,)) for k in self.keys}
        return out


def augmentation(keys: tuple[str, ...] = ("image",),
                 spatial_dims: int = 2) -> FlipRotate | VolumeFlips:
    """Label-preserving flips and 90-degree rotations (all sequences move together); for
    volumes (``spatial_dims=3``) a left-right flip only.

    Small sites overfit a ViT within a few epochs without them; with them the same model
    keeps improving (see the calibration notes in bench/RESULTS.md).
    """
    return VolumeFlips(keys) if spatial_dims == 3 else FlipRotate(keys)
