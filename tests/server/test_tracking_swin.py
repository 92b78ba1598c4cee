"""A registered version of a SwinUNETR lesion-segmentation run is a working MLflow model: the
stock ``mlflow.pyfunc.load_model(uri).predict(x)`` gives the round's model's per-voxel
probabilities, and its ``weights`` artifacts are the fine-tuned SwinUNETR in MONAI's own format
(``SwinUNETR(**constructor)`` + safetensors, LoRA merged), which ``medfed export`` hands out."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.foundation import base_digest  # noqa: E402
from models.foundation.monai_nets import SWIN_UNETR_TYPE, save_monai  # noqa: E402
from models.tasks import build  # noqa: E402
from server.config import load_experiment  # noqa: E402
from strategies.observed import RoundRecord, SiteReply  # noqa: E402

SWIN = dict(in_channels=1, out_channels=2, feature_size=12, depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2], window_size=4, spatial_dims=2)
ATOL = 1e-5


def _weights_load_into_a_fresh_swin_unetr(directory: Path, images: torch.Tensor,
                                          expected: torch.Tensor) -> None:
    from monai.networks.nets import SwinUNETR
    from safetensors.torch import load_file

    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == SWIN_UNETR_TYPE
    plain = SwinUNETR(**config["constructor"])
    plain.load_state_dict(load_file(str(directory / "model.safetensors")), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(images).softmax(1), expected, rtol=0, atol=ATOL)


@pytest.mark.slow            # ~45 s: torch.export of the SwinUNETR and MLflow's serving check
def test_a_registered_swin_version_serves_and_exports_the_round_model(tmp_path):
    import mlflow
    from monai.networks.nets import SwinUNETR

    from server.tracking import MlflowTracker

    torch.manual_seed(0)
    save_monai(SwinUNETR(**SWIN), SWIN, tmp_path / "encoders" / "swin",
               model_type=SWIN_UNETR_TYPE)
    cfg = load_experiment([
        "model=foundation_swin", "model.options.weights=swin", "task=lesion_seg",
        f"model.foundation_dir={tmp_path / 'encoders'}", "model.options.lora_rank=2",
        "task.image_size=64", "federation=sim2", "tracking.log_models=true",
        f"runs_dir={tmp_path / 'runs'}", "name=swin-versions"])
    assert cfg.tracking.log_models
    model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options(),
                     foundation_dir=cfg.model.foundation_dir)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():                       # a round's update: adapters and decoder moved
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.eval()
    s = model.config.num_channels
    images = torch.randn(3, s, 64, 64, generator=torch.Generator().manual_seed(7))
    images[0, 1] = 0                           # an absent channel is an all-zero input
    present = images.flatten(2).abs().amax(-1) > 0
    rounds = {}                                # round -> what its model gives on ``images``
    tracker = MlflowTracker(cfg, tmp_path)
    try:
        for rnd in (1, 2):      # round 2: the traced program reused with round 2's weights
            if rnd == 2:
                with torch.no_grad():
                    for p in model.parameters():
                        if p.requires_grad:
                            p.add_(torch.randn(p.shape, generator=g) * 0.05)
            with torch.no_grad():
                rounds[rnd] = model(images, present).softmax(1)
            tracker.on_train(RoundRecord(
                round=rnd, train=[SiteReply("site-0", 1, {}, manifest="abc")],
                arrays=ArrayRecord(model.state_dict())))
    finally:
        tracker.finish("")
        mlflow.end_run()
    assert (tracker.export.traced, tracker.export.reused) == (1, 1)
    name = cfg.tracking.registered_model
    mlflow.set_tracking_uri(tracker.uri)
    for rnd, expected in rounds.items():
        served = mlflow.pyfunc.load_model(f"models:/{name}/{tracker.versions[rnd]}")
        probs = np.asarray(served.predict(images.numpy()))
        assert probs.shape == (3, 2, 64, 64)
        np.testing.assert_allclose(probs, expected.numpy(), rtol=0, atol=ATOL)
    assert not np.allclose(probs[0], probs[1], atol=1e-3)          # the inputs matter
    assert not torch.allclose(rounds[1], rounds[2], atol=1e-3)     # and the round's weights
    version, expected = tracker.versions[2], rounds[2]
    uri = f"models:/{name}/{version}"
    info = mlflow.models.get_model_info(uri)
    assert info.metadata["foundation_family"] == SWIN_UNETR_TYPE
    assert info.metadata["foundation_base_sha256"] == base_digest(model)

    # the weights artifact: MONAI's own format, loaded by a fresh SwinUNETR
    client = mlflow.MlflowClient(tracker.uri)
    mv = client.get_model_version(name, version)
    local = Path(mlflow.artifacts.download_artifacts(
        run_id=mv.run_id, artifact_path=mv.tags["weights"],
        dst_path=str(tmp_path / "download"), tracking_uri=tracker.uri))
    _weights_load_into_a_fresh_swin_unetr(local, images, expected)

    # ``medfed export`` hands out the same directory, checked by loading it
    from medfed.export import export_version

    out = export_version(tracker.uri, name, str(version), tmp_path / "exported")
    _weights_load_into_a_fresh_swin_unetr(out, images, expected)
