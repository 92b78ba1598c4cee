"""A phase's model versions after the first are written from the program traced for the first
(``server/model_export.py``), their pt2 archives from its records with new weights
(``server/pt2_archive.py``): each still loads with the stock ``mlflow.pyfunc.load_model``,
predicts exactly like its own round's model, and carries the same MLmodel description as a
traced one."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord

from models.tasks import build
from server.config import load_experiment
from strategies.observed import RoundRecord, SiteReply


def _model(cfg, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options())
    return model.eval()


def test_later_versions_reuse_the_traced_program_and_predict_like_their_own_round(tmp_path):
    import mlflow

    from server.tracking import MlflowTracker

    cfg = load_experiment(["model=mmvit_tiny", "task.image_size=32", "federation=sim2",
                           "tracking.log_models=true", f"runs_dir={tmp_path / 'runs'}",
                           "name=reuse"])
    models = {rnd: _model(cfg, seed) for rnd, seed in ((1, 0), (2, 1), (3, 2))}
    tracker = MlflowTracker(cfg, tmp_path)
    named, create = [], tracker.client.create_registered_model
    tracker.client.create_registered_model = lambda name: named.append(name) or create(name)
    try:
        for rnd, model in models.items():
            tracker.on_train(RoundRecord(round=rnd, train=[SiteReply("site-0", 1, {})],
                                         arrays=ArrayRecord(model.state_dict())))
            tracker.on_round_end(RoundRecord(round=rnd))
        tracker.latest_version()
        assert (tracker.export.traced, tracker.export.reused) == (1, 2)
        # the registered model is made once per phase, not tried again with every version
        assert named == [cfg.tracking.registered_model]
        # the reused versions' archives are the traced one's records with new weights
        # (server/pt2_archive.py), not a graph serialised again by torch.export.save
        assert tracker.export.serialized == 0
    finally:
        tracker.finish("")
        mlflow.end_run()
    mlflow.set_tracking_uri(tracker.uri)
    name = cfg.tracking.registered_model
    x = torch.randn(3, *_shape(models[1]),
                    generator=torch.Generator().manual_seed(3))
    described = []
    for rnd, model in models.items():
        uri = f"models:/{name}/{tracker.versions[rnd]}"
        with torch.no_grad():
            expected = model(x, x.flatten(2).abs().amax(-1) > 0).softmax(-1).numpy()
        got = np.asarray(mlflow.pyfunc.load_model(uri).predict(x.numpy()))
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        info = mlflow.models.get_model_info(uri)
        # linked to its run (source run, the run's output at its round) by the writer itself
        logged = mlflow.get_logged_model(info.model_id)
        assert logged.source_run_id == tracker.run_id
        assert mlflow.MlflowClient().get_model_version(name, tracker.versions[rnd]).run_id \
            == tracker.run_id
        described.append((info.flavors, info.signature.to_dict(), info.saved_input_example_info,
                          info.metadata))
    outputs = mlflow.get_run(tracker.run_id).outputs.model_outputs
    assert sorted(o.step for o in outputs) == [1, 2, 3]
    # the rounds' models differ, so equal predictions above are each round's own weights
    assert not np.allclose(*(mlflow.pyfunc.load_model(
        f"models:/{name}/{tracker.versions[r]}").predict(x.numpy()) for r in (1, 2)))
    assert described[1] == described[0] and described[2] == described[0]


def _shape(model) -> tuple[int, ...]:
    c = model.config
    return (c.num_sequences, *([c.img_size] * c.spatial_dims))


class _Counting(torch.nn.Module):
    """Scores differently on every call (a Python counter the traced graph bakes in)."""

    input_shape = (3,)

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.w + self.calls


def test_a_traced_program_that_does_not_score_like_the_model_is_no_template(tmp_path, caplog):
    from mlflow.models import Model

    from server.model_export import ReusedExport

    export = ReusedExport()
    example = np.zeros((2, 3), dtype=np.float32)
    try:
        for version in ("v1", "v2"):
            export.save_model(str(tmp_path / version), Model(), _Counting(),
                              input_example=example, serialization_format="pt2",
                              pip_requirements=["torch"])
    finally:
        export.close()
    assert "does not score its input example" in caplog.text
    # no version was written from a program that does not do what the model does
    assert (export.traced, export.reused) == (2, 0)
    assert export.scores_like_model is False      # server/versions.py tags serving_check=failed


def test_a_program_traced_ahead_that_scores_otherwise_is_reported_as_no_version(caplog):
    from server.model_export import ReusedExport

    export = ReusedExport()
    try:
        kept = export.prepare(_Counting(), np.zeros((2, 3), dtype=np.float32),
                              serialization_format="pt2", pip_requirements=["torch"])
    finally:
        export.close()
    assert not kept and (export.prepared, export.traced) == (1, 0)
    # no version exists yet: none is said to be tagged
    assert "traced ahead from the phase's initial model does not score" in caplog.text
    assert "serving_check" not in caplog.text


def test_a_version_whose_traced_program_scores_otherwise_is_tagged(tmp_path, monkeypatch):
    import mlflow

    from server.model_export import ReusedExport
    from server.tracking import MlflowTracker

    monkeypatch.setattr(ReusedExport, "_scores_like", lambda self, model, *inputs: False)
    cfg = load_experiment(["model=mmvit_tiny", "task.image_size=32", "federation=sim2",
                           "tracking.log_models=true", f"runs_dir={tmp_path / 'runs'}",
                           "name=mismatch"])
    model = _model(cfg, 0)
    tracker = MlflowTracker(cfg, tmp_path)
    try:
        tracker.on_train(RoundRecord(round=1, train=[SiteReply("site-0", 1, {})],
                                     arrays=ArrayRecord(model.state_dict())))
        tracker.on_round_end(RoundRecord(round=1))
        tracker.latest_version()
    finally:
        tracker.finish("")
        mlflow.end_run()
    client = mlflow.MlflowClient(tracker.uri)
    version = client.get_model_version(cfg.tracking.registered_model, tracker.versions[1])
    assert version.tags.get("serving_check") == "failed"


def test_a_killed_servers_export_folders_are_swept_from_its_run_dir_links_are_not_followed(
        tmp_path):
    from server.model_export import ReusedExport, sweep_exports

    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run_dir.mkdir()
    (elsewhere / "keep").mkdir(parents=True)
    export = ReusedExport(parent=run_dir)         # made in the run directory
    [left] = run_dir.glob(".export-*")
    (left / "template-1-0").mkdir()               # as a SIGKILL leaves it: never closed
    (run_dir / ".export-link").symlink_to(elsewhere)
    (run_dir / "checkpoints").mkdir()
    assert sweep_exports(run_dir) == 1
    assert sorted(p.name for p in run_dir.iterdir()) == [".export-link", "checkpoints"]
    assert (elsewhere / "keep").is_dir()
    export.close()                                # its folder is gone already: no error
