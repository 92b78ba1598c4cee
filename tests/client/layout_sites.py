"""Helpers shared by the tests that read synthetic sites through a layout (2D and 3D)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from client.runtime import SiteDataCache, SiteIdentity
from models.task import DataNeeds


def synthesized(tmp_path_factory, synthesize: Callable[..., list], name: str,
                **kwargs) -> tuple[Path, list]:
    """Sites written by a ``medfed.synth`` generator under a fresh directory: (root, profiles)."""
    root = tmp_path_factory.mktemp(name) / "data"
    return root, synthesize(root, **kwargs)


def cached_splits(root: Path, profile, class_names, image_size: int, layout):
    """What the site data cache builds for a job on one site: (site data, {split: dataset})."""
    site = SiteIdentity(profile.name, root / profile.name, torch.device("cpu"))
    return SiteDataCache().get(site, class_names, image_size, DataNeeds(), layout)
