"""Every registered version of a foundation-model run is a working MLflow model: the stock
``mlflow.pyfunc.load_model(uri).predict(x)`` gives the in-memory model's probabilities, and
the version carries the family-format export (merged encoder, peft adapter, adaptation parts)
as its ``weights`` artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.foundation import base_digest  # noqa: E402
from models.foundation.export import ADAPTER_DIR, load_export  # noqa: E402
from models.tasks import build  # noqa: E402
from server.config import load_experiment  # noqa: E402
from strategies.observed import RoundRecord, SiteReply  # noqa: E402
from tests.models.test_foundation import _batch, _randomise_trainable, _save  # noqa: E402

ATOL = 1e-5


@pytest.mark.parametrize("family", ["dinov2", "monai_vit"])
def test_a_registered_foundation_version_predicts_like_the_model_in_memory(tmp_path, family,
                                                                          capsys):
    import mlflow

    from server.tracking import MlflowTracker

    _save(family, tmp_path / "encoders" / "enc")
    cfg = load_experiment([
        "model=foundation", "model.options.weights=enc",
        f"model.foundation_dir={tmp_path / 'encoders'}", "model.options.lora_rank=2",
        "task.image_size=32", "federation=sim2", "tracking.log_models=true",
        f"runs_dir={tmp_path / 'runs'}", f"name=foundation-{family}"])
    assert cfg.tracking.log_models
    # the global model after a round, as the strategy hands it to observers (complete state)
    torch.manual_seed(0)
    model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options(),
                     foundation_dir=cfg.model.foundation_dir)
    _randomise_trainable(model, seed=5)
    model.eval()
    record = RoundRecord(round=1, train=[SiteReply("site-0", 1, {}, manifest="abc")],
                         arrays=ArrayRecord(model.state_dict()))
    # the next round's model: written from the program traced for round 1, its pt2
    # archive from that one's records with new weights (server/pt2_archive.py)
    later, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options(),
                     foundation_dir=cfg.model.foundation_dir)
    _randomise_trainable(later, seed=6)
    later.eval()
    tracker = MlflowTracker(cfg, tmp_path)
    try:
        tracker.on_train(record)
        tracker.on_train(RoundRecord(round=2, train=[SiteReply("site-0", 1, {}, manifest="abc")],
                                     arrays=ArrayRecord(later.state_dict())))
    finally:
        tracker.finish("")
        mlflow.end_run()
    assert (tracker.export.traced, tracker.export.reused, tracker.export.serialized) == (1, 1, 0)
    version = tracker.versions[1]
    name = cfg.tracking.registered_model
    uri = f"models:/{name}/{version}"

    batch = _batch()                       # one study with an absent (all-zero) channel
    with torch.no_grad():
        expected = model(batch["image"], batch["present"]).softmax(-1).numpy()
    mlflow.set_tracking_uri(tracker.uri)
    served = mlflow.pyfunc.load_model(uri)
    probs = np.asarray(served.predict(batch["image"].numpy()))
    np.testing.assert_allclose(probs, expected, rtol=0, atol=ATOL)
    assert not np.allclose(expected[0], expected[1], atol=1e-3)   # the inputs matter
    # every channel present, another batch size: the exported graph did not specialise on
    # the all-zero input_example
    full = torch.randn(3, *batch["image"].shape[1:], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full_expected = model(full, torch.ones(3, full.shape[1], dtype=torch.bool)).softmax(-1)
    np.testing.assert_allclose(np.asarray(served.predict(full.numpy())), full_expected.numpy(),
                               rtol=0, atol=ATOL)
    with torch.no_grad():
        later_expected = later(full, torch.ones(3, full.shape[1], dtype=torch.bool)).softmax(-1)
    served_later = mlflow.pyfunc.load_model(f"models:/{name}/{tracker.versions[2]}")
    np.testing.assert_allclose(np.asarray(served_later.predict(full.numpy())),
                               later_expected.numpy(), rtol=0, atol=ATOL)
    assert not np.allclose(later_expected.numpy(), full_expected.numpy(), atol=1e-3)

    info = mlflow.models.get_model_info(uri)
    assert info.signature is not None
    assert info.metadata["foundation_family"] == family
    assert info.metadata["foundation_base_sha256"] == base_digest(model)
    # and what `medfed predict` needs: the layout and preprocessing its input shape matches
    from protocol.serving import ServingSpec
    spec = ServingSpec.from_metadata(info.metadata)
    assert tuple(spec.preprocessing()["input_shape"]) == tuple(batch["image"].shape[1:])

    # the weights artifact: the family-format export, which rebuilds the same model
    client = mlflow.MlflowClient(tracker.uri)
    mv = client.get_model_version(name, version)
    local = mlflow.artifacts.download_artifacts(run_id=mv.run_id,
                                                artifact_path=mv.tags["weights"],
                                                dst_path=str(tmp_path / "download"),
                                                tracking_uri=tracker.uri)
    assert (Path(local) / ADAPTER_DIR).is_dir()
    rebuilt = load_export(local)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batch["image"], batch["present"]).softmax(-1),
                                   torch.from_numpy(expected), rtol=0, atol=ATOL)

    # ``medfed export`` hands out the same directory, checked by loading it, and says how its
    # parts load (model.pretrained takes MedFed's own ViT only)
    from medfed.cli import main

    out = tmp_path / "exported"
    capsys.readouterr()
    assert main(["export", "--tracking-uri", tracker.uri, "--model", name, "--version",
                 str(version), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "model.pretrained=" not in said and f"{out / 'encoder'}" in said
    assert f"{out / ADAPTER_DIR}" in said
    assert (out / ADAPTER_DIR).is_dir()
    with torch.no_grad():
        torch.testing.assert_close(load_export(out)(batch["image"], batch["present"]).softmax(-1),
                                   torch.from_numpy(expected), rtol=0, atol=ATOL)
