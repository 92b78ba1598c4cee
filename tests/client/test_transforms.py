"""``client.data.transforms`` against the MONAI pipeline it replaced, bit for bit: the
preprocessed tensors, the augmented samples (same seeds, same random draws) and a few steps
of training; and that a site process trains without importing MONAI at all."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import (Compose, EnsureTyped, NormalizeIntensityd, RandFlipd,
                              RandRotate90d, Resize)

from client.data.dataset import StudyDataset, _as_slice
from client.data.site import Study
from client.engine import Engine, TrainConfig
from models import MODELS, TASKS

ROOT = Path(__file__).resolve().parents[2]
SEQS = ("t1", "t1ce", "t2", "flair")
SIZE = 16


def _studies(n: int = 12, seed: int = 0) -> list[Study]:
    """Sequences of mixed sizes (up, down, same, non-square, a volume), absent ones, an
    all-zero and a constant sequence, masks on some studies."""
    rng = np.random.default_rng(seed)
    shapes = [(SIZE, SIZE), (23, 31), (9, 12), (40, 40), (5, 20, 18)]
    studies = []
    for i in range(n):
        images = {}
        for j, seq in enumerate(SEQS):
            if (i + j) % 5 == 4:
                continue                                          # absent sequence
            shape = shapes[(i + 2 * j) % len(shapes)]
            pixels = rng.gamma(2.0, 50.0, size=shape).astype(np.float32)
            pixels[rng.random(shape) < 0.3] = 0                   # background
            if (i, j) == (1, 0):
                pixels[:] = 0
            if (i, j) == (2, 1):
                pixels[:] = 7.5
            images[seq] = pixels
        mask = None if i % 3 == 0 else (rng.random(shapes[i % 4]) < 0.2).astype(np.uint8)
        studies.append(Study(key=f"s{i}", patient_key=f"p{i}", images=images, label=i % 3,
                             mask=mask))
    return studies


def _monai_preprocessed(studies, *, masks: bool, normalize: bool):
    """The former ``StudyDataset.__init__``, MONAI transforms and all."""
    typed = EnsureTyped(keys="image", data_type="tensor", dtype=torch.float32, track_meta=False)
    transform = Compose([NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
                         typed] if normalize else [typed])
    resize = Resize(spatial_size=(SIZE, SIZE), mode="area")
    nearest = Resize(spatial_size=(SIZE, SIZE), mode="nearest")
    images, mask_items = [], []
    for study in studies:
        stack = np.zeros((len(SEQS), SIZE, SIZE), dtype=np.float32)
        present = np.zeros(len(SEQS), dtype=bool)
        for i, seq in enumerate(SEQS):
            if seq in study.images:
                pixels = _as_slice(study.images[seq]).astype(np.float32)[None]
                stack[i] = np.asarray(resize(pixels))[0]
                present[i] = True
        out = transform({"image": stack})
        images.append(out["image"] * torch.as_tensor(present, dtype=torch.float32)[:, None, None])
        mask = np.zeros((1, SIZE, SIZE), dtype=np.float32)
        if masks and study.mask is not None:
            mask = np.asarray(nearest(_as_slice(study.mask).astype(np.float32)[None]))
        mask_items.append(torch.as_tensor(mask, dtype=torch.float32))
    return images, mask_items


def _monai_augmentation(keys):
    return Compose([RandFlipd(keys=list(keys), prob=0.5, spatial_axis=0),
                    RandFlipd(keys=list(keys), prob=0.5, spatial_axis=1),
                    RandRotate90d(keys=list(keys), prob=0.75, max_k=3, spatial_axes=(0, 1))])


def _same_bits(a, b) -> bool:
    """Same dtype, shape and bits (-0.0 is not 0.0), whatever the tensor subclass."""
    a, b = (torch.as_tensor(t).as_subclass(torch.Tensor).contiguous() for t in (a, b))
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return torch.equal(a, b)


@pytest.mark.parametrize("normalize", [True, False])
def test_preprocessing_is_monais_bit_for_bit(normalize):
    studies = _studies()
    ds = StudyDataset(studies, SIZE, SEQS, masks=True, normalize=normalize)
    want_images, want_masks = _monai_preprocessed(studies, masks=True, normalize=normalize)
    assert len(ds.items) == len(want_images)
    for (image, _, _), want in zip(ds.items, want_images):
        assert _same_bits(image, want)
    for (mask, _), want in zip(ds.masks, want_masks):
        assert _same_bits(mask, want)
    # The data exercised what it should: all-zero and constant sequences, absent ones.
    assert not ds.items[1][0][0].any() and ds.items[2][1].tolist() == [True, True, False, True]


@pytest.mark.parametrize("masks", [False, True])
def test_augmentation_draws_and_moves_like_monai(masks):
    studies = _studies()
    ds = StudyDataset(studies, SIZE, SEQS, augment=True, masks=masks)
    ref = StudyDataset(studies, SIZE, SEQS, augment=True, masks=masks)
    ref.augment = _monai_augmentation(("image", "mask") if masks else ("image",))
    seen = set()
    for seed in (0, 7, 2**32 + 3, 123456789):
        ds.reseed(seed)
        ref.reseed(seed)
        for _ in range(3):                               # epochs: the streams continue
            for i in range(len(ds)):
                got, want = ds[i], ref[i]
                assert got.keys() == want.keys()
                for key in got:
                    assert _same_bits(got[key], want[key]), (seed, i, key)
                seen.add(tuple(got["image"][0].flatten()[:4].tolist()))
    assert len(seen) > len(ds)                           # samples did move


def test_training_matches_the_monai_pipeline_bit_for_bit():
    """The MONAI pipeline yielded MetaTensor batches; ours plain tensors: same weights."""
    studies = _studies(16, seed=1)

    def train(dataset) -> dict:
        torch.manual_seed(0)
        model = MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2, "patch_size": 8,
                                       "img_size": SIZE, "num_sequences": len(SEQS)})
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        dataset.reseed(11)
        Engine(TASKS.build("classification", {}), torch.device("cpu")).fit(
            model, dataset, TrainConfig(local_epochs=2, batch_size=4, lr=1e-3))
        assert any(not torch.equal(initial[k], v) for k, v in model.state_dict().items())
        return model.state_dict()

    ref = StudyDataset(studies, SIZE, SEQS, augment=True)
    ref.augment = _monai_augmentation(("image",))
    got, want = train(StudyDataset(studies, SIZE, SEQS, augment=True)), train(ref)
    assert got.keys() == want.keys()
    assert all(_same_bits(got[k], want[k]) for k in got)


PROBE = """
import sys
import client.app, server.app, models
import numpy as np
from client.data.dataset import StudyDataset
from client.data.site import Study
pixels = np.arange(24 * 20, dtype=np.float32).reshape(24, 20)
study = Study(key="s", patient_key="p", images={"t1": pixels, "flair": pixels.T}, label=1,
              mask=(pixels > 200).astype(np.uint8))
ds = StudyDataset([study], 16, augment=True, masks=True)
ds.reseed(0)
assert ds[0]["image"].shape == (4, 16, 16)
models.MODELS.build("mmvit", {"dim": 32, "depth": 1, "heads": 2})
print(sorted(name for name in sys.modules if name.split(".")[0] == "monai"))
"""


def test_apps_and_site_datasets_do_not_import_monai():
    """``import monai.<anything>`` imports all of MONAI (~5 s CPU per process): the Flower
    apps, the models package and a site's datasets must not, until a UNETR is built."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                            cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_volume_augmentation_flips_left_right_only():
    """3D layouts' grid is superior/posterior/left: only the last axis (left-right) may flip;
    a head-foot or front-back flip would show a body no site sends (lungs under the liver)."""
    from client.data.transforms import augmentation
    image = torch.arange(2 * 4 * 5 * 6, dtype=torch.float32).reshape(2, 4, 5, 6)
    seen = set()
    for seed in range(32):
        out = augmentation(("image",), spatial_dims=3).set_random_state(seed)({"image": image})
        got = out["image"]
        if torch.equal(got, image):
            seen.add("kept")
        else:
            assert torch.equal(got, torch.flip(image, (3,))), seed
            seen.add("left-right")
    assert seen == {"kept", "left-right"}
