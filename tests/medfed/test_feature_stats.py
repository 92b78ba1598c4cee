"""``medfed feature-stats``: a public cohort, read with the run's layout, gives the feature
mean and spread the run's ``centre_features`` / ``scale_features`` then load - the run's
pooled features over that cohort come out centred and on one scale."""

from __future__ import annotations

import pytest
import torch

from medfed.cli import main
from tests.client.test_foundation_site import save_dinov2


def _pooled(overrides: list[str], cohort, *options: str) -> torch.Tensor:
    """The run's pooled features over ``cohort`` (its own layout, labels ignored)."""
    import dataclasses

    from torch.utils.data import DataLoader

    from client.data.dataset import StudyDataset
    from client.data.layout_site import dataset_options, read_site
    from server.config import load_experiment

    cfg = load_experiment([*overrides, *options])
    spec = cfg.job_spec("r")
    model, _ = spec.build(foundation_dir=cfg.model.foundation_dir)
    studies = [dataclasses.replace(s, label=-1) for s in read_site(cohort, spec.layout).studies]
    data = StudyDataset(studies, spec.image_size, **dataset_options(spec.layout))
    backbone = model.backbone if hasattr(model, "backbone") else model
    with torch.no_grad():
        batch = next(iter(DataLoader(data, batch_size=len(data))))
        return backbone.pool(backbone.eval().forward_features(batch["image"], batch["present"]),
                             batch["present"])


@pytest.mark.parametrize("layout", ["brain_mri_4seq", "chest_xray"])
def test_the_public_statistics_centre_and_scale_the_runs_features(tmp_path, capsys, layout):
    save_dinov2(tmp_path / "encoders" / "dino")
    cohort = tmp_path / "public"
    assert main(["synth", "--sites", "1", "--out", str(cohort), "--patients", "8", "--seed",
                 "5", "--layout", layout]) == 0
    cohort = cohort / "site-0"
    run = ["experiment=smoke", f"data/layout={layout}", "model=foundation",
           "model.options.weights=dino", f"model.foundation_dir={tmp_path / 'encoders'}",
           "task.image_size=32"]
    capsys.readouterr()
    assert main(["feature-stats", "--data", str(cohort), "--directions", "4", *run]) == 0
    said = capsys.readouterr().out
    assert all(f"{name}.safetensors" in said
               for name in ("feature_mean", "feature_scale", "feature_projection"))
    raw = _pooled(run, cohort)
    standardised = _pooled(run, cohort, "+model.options.centre_features=true",
                           "+model.options.scale_features=true")
    assert raw.mean(0).norm() > 1                                   # a common component...
    torch.testing.assert_close(standardised.mean(0), torch.zeros(raw.shape[1]),
                               atol=1e-4, rtol=0)                   # ... removed
    torch.testing.assert_close(standardised.std(0, unbiased=False), torch.ones(raw.shape[1]),
                               atol=1e-3, rtol=0)                   # every dimension on one scale
    projected = _pooled(run, cohort, "+model.options.centre_features=true",
                        "+model.options.project_features=4")
    assert projected.shape == (len(raw), 4)       # the centred features on the top 4 directions
    top4 = torch.linalg.svdvals((raw - raw.mean(0)).double())[:4].pow(2).sum()
    torch.testing.assert_close(projected.double().pow(2).sum(), top4, rtol=1e-4, atol=0)
    assert "the 4 directions hold " in said        # ... all the variance any 4 can hold


def test_a_model_without_pretrained_weights_is_refused_in_one_line(tmp_path, capsys):
    assert main(["feature-stats", "--data", str(tmp_path), "experiment=smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "feature statistics are for model=foundation" in err
