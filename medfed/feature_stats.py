"""``medfed feature-stats``: the PUBLIC feature mean and spread a foundation model's
``centre_features`` / ``scale_features`` read (and, asked, the principal directions
``project_features`` reads), computed on a public cohort.

The two files (``feature_mean.safetensors``, ``feature_scale.safetensors``) go beside the
weights in ``<model.foundation_dir>/<model.options.weights>/``, signed with the adaptation
they were made for (channel tokens, channels, image and patch size, pooled width: what the
pooled features depend on). The model is built exactly as the run builds it, from the same
experiment overrides, and the cohort is read with the run's layout; only then do the files
match the run. They are part of the frozen-base digest: every site needs the same two files
in its own copy of the weights. Compute them on PUBLIC data only - never a site's studies:
they are constants of the base model that every site and the export hold.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from server.config import ConfigError, ExperimentConfig

# what the pooled features are read without: the constants being computed, and whatever
# sits between the pooled features and the head
WITHOUT = {"centre_features": False, "scale_features": False, "project_features": 0}


def public_feature_stats(cfg: ExperimentConfig, data_dir: Path, *, workers: int = 1,
                         batch_size: int = 32, directions: int = 0) -> dict:
    """Read the public cohort in ``data_dir`` with ``cfg``'s layout (labels ignored, no
    augmentation), pool the adapted encoder's features over every study, and write the mean
    and spread (``models.foundation.centring.public_stats``) beside the weights;
    ``directions`` > 0: also the top principal directions of the centred features
    (``feature_projection.safetensors``). Returns what was written and a summary (studies,
    the mean's norm, the spread's range, floored dimensions, the directions' variance share).

    Raises
    ------
    ConfigError
        ``cfg``'s model loads no pretrained encoder, the cohort has fewer than 2 studies,
        or fewer studies or feature dimensions than ``directions``.
    """
    from client.data.dataset import StudyDataset
    from client.data.layout_site import dataset_options, read_site
    from models import MODELS
    from models.foundation.centring import (describe_signature, public_stats,
                                            save_feature_mean, save_feature_scale)
    from models.foundation.projection import principal_directions, save_feature_projection

    spec = cfg.job_spec("feature-stats")
    if "foundation_dir" not in MODELS.resources(spec.model_name):
        raise ConfigError(f"model={spec.model_name} loads no pretrained encoder: feature "
                          "statistics are for model=foundation")
    options = dict(spec.model_options) | WITHOUT | {"method": "linear_probe"}
    model = MODELS.build(spec.model_name, options,
                         foundation_dir=cfg.model.foundation_dir).eval()
    data = read_site(data_dir, spec.layout, workers=workers)
    studies = [dataclasses.replace(s, label=-1) for s in data.studies]
    if len(studies) < 2:
        raise ConfigError(f"{data_dir} holds {len(studies)} usable studies for layout "
                          f"{spec.layout.name if spec.layout else 'brain_mri_4seq'}; at least "
                          f"2 are needed (skipped: {dict(data.report.skipped) or 'none'})")
    if directions > min(len(studies), pooled_width(model)):   # refused before writing
        raise ConfigError(f"--directions {directions}: the {len(studies)} public studies' "
                          f"{pooled_width(model)}-wide features have at most "
                          f"{min(len(studies), pooled_width(model))}")
    features = pooled_features(
        model, StudyDataset(studies, spec.image_size, **dataset_options(spec.layout)),
        batch_size=batch_size)
    mean, scale, floored = public_stats(features)
    directory = Path(cfg.model.foundation_dir) / str(spec.model_options["weights"])
    signature = model.feature_signature
    written = [save_feature_mean(directory, mean, signature),
               save_feature_scale(directory, scale, signature)]
    share = None
    if directions:
        top, share = principal_directions(features - mean, directions)
        written.append(save_feature_projection(directory, top, signature))
        share = float(share.sum())
    return {"files": written, "variance_share": share, "studies": len(studies),
            "skipped": dict(data.report.skipped),
            "signature": describe_signature(signature), "mean_norm": float(mean.norm()),
            "median_distance_from_mean": float((features - mean).norm(dim=1).median()),
            "scale_min_median_max": (float(scale.min()), float(scale.median()),
                                     float(scale.max())),
            "scale_floored_dimensions": floored}


def pooled_width(model) -> int:
    """The width of ``model``'s pooled features (its adaptation signature's)."""
    return int(model.feature_signature["pooled_dim"])


def pooled_features(model, data, *, batch_size: int = 32):
    """A foundation model's pooled features ``[N, pooled]`` over ``data`` (items with
    ``image`` and ``present``), in evaluation mode and without gradients."""
    import torch
    from torch.utils.data import DataLoader

    pooled = []
    with torch.no_grad():
        for batch in DataLoader(data, batch_size=batch_size):
            tokens = model.eval().forward_features(batch["image"], batch["present"])
            pooled.append(model.pool(tokens, batch["present"]))
    return torch.cat(pooled)


__all__ = ["pooled_features", "pooled_width", "public_feature_stats"]
