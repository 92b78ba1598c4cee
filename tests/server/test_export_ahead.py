"""The phase's export template traced ahead of its first version, from the initial model,
while the MLflow run is set up and round 1's sites train (``MlflowTracker.prepare``,
``server/model_export.py``): the first version is then written from it, with exactly the
files a version traced from the same weights has, and a crash meanwhile leaves nothing
behind."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import mlflow
import torch
import yaml
from flwr.app import ArrayRecord
from torch.export.pt2_archive._package import PT2ArchiveReader

from models.tasks import build
from server.config import load_experiment
from server.registration import JOURNAL_DIR
from strategies.observed import RoundRecord, SiteReply

# what differs between any two logged models, whatever their weights: ids, times, places
_VOLATILE_MLMODEL = {"artifact_path", "model_uuid", "run_id", "utc_time_created", "model_id"}


def _cfg(tmp_path, name):
    return load_experiment(["model=mmvit_tiny", "task.image_size=32", "federation=sim2",
                            "tracking.log_models=true", f"runs_dir={tmp_path / 'runs'}",
                            f"name={name}"])


def _state(cfg, seed: int) -> dict:
    torch.manual_seed(seed)
    model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options())
    return model.state_dict()


def _register_round_1(cfg, run_dir, weights: dict, ahead: dict | None):
    """One phase that registers round 1 with ``weights``; its template traced ahead from
    ``ahead`` (the initial weights) or, as before, from round 1's model."""
    from server.tracking import MlflowTracker

    tracker = MlflowTracker(cfg, run_dir)
    try:
        if ahead is not None:
            tracker.prepare(ArrayRecord(ahead))
        tracker.on_train(RoundRecord(round=1, train=[SiteReply("site-0", 1, {})],
                                     arrays=ArrayRecord(weights)))
        tracker.on_round_end(RoundRecord(round=1))
        tracker.latest_version()
        counts = (tracker.export.prepared, tracker.export.traced, tracker.export.reused)
    finally:
        tracker.finish("")
        mlflow.end_run()
    return tracker, counts


def _files(tracker, version: str, dest) -> dict[str, object]:
    """A version's model files: bytes, the pt2 archive as its records (the zip writer's own
    id left out) and the MLmodel without what differs between any two logged models."""
    mlflow.set_tracking_uri(tracker.uri)
    uri = f"models:/{tracker.cfg.tracking.registered_model}/{version}"
    local = mlflow.artifacts.download_artifacts(uri, dst_path=str(dest))
    out = {}
    for path in sorted(Path(local).rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(local))
        if name == "MLmodel":
            described = yaml.safe_load(path.read_text())
            out[name] = {k: v for k, v in described.items() if k not in _VOLATILE_MLMODEL}
        elif name.endswith(".pt2"):
            reader = PT2ArchiveReader(str(path))
            out[name] = {n: reader.read_bytes(n) for n in reader.archive_file.get_all_records()
                         if n != ".data/serialization_id"}
        else:
            out[name] = path.read_bytes()
    return out


def test_the_first_version_written_from_a_template_traced_ahead_is_the_traced_one(tmp_path):
    cfg = _cfg(tmp_path, "ahead")
    initial, trained = _state(cfg, 0), _state(cfg, 1)
    before, counts_before = _register_round_1(cfg, tmp_path / "before", trained, ahead=None)
    after, counts_after = _register_round_1(cfg, tmp_path / "after", trained, ahead=initial)
    assert counts_before == (0, 1, 0)       # traced when registered, as before
    assert counts_after == (1, 0, 1)        # written from the template traced ahead
    old = _files(before, before.versions[1], tmp_path / "old")
    new = _files(after, after.versions[1], tmp_path / "new")
    assert sorted(old) == sorted(new)
    differing = [name for name in old if old[name] != new[name]]
    # (model_size_bytes included: MLflow counts it before writing the environment files)
    assert differing == []
    # the pt2 records above are the weights: it scores with round 1's, not the initial ones


def _listing(root) -> set[str]:
    """The run folder's files, less the export's scratch folder (the template being traced:
    a killed server's is removed by the resume, tests/server/test_resume.py)."""
    from server.model_export import EXPORT_PREFIX

    return {str(p.relative_to(root)) for p in root.rglob("*")
            if not p.relative_to(root).parts[0].startswith(EXPORT_PREFIX)}


def test_a_server_that_dies_while_tracing_ahead_has_written_nothing(tmp_path, monkeypatch):
    from server import model_export
    from server.tracking import MlflowTracker

    cfg = _cfg(tmp_path, "crash")
    traced, release = threading.Event(), threading.Event()
    remember = model_export.ReusedExport._remember

    def held(self, *args, **kwargs):          # the trace is saved; the template not yet kept
        traced.set()
        assert release.wait(timeout=120)        # a hang guard, not a timing assertion
        return remember(self, *args, **kwargs)

    monkeypatch.setattr(model_export.ReusedExport, "_remember", held)
    tracker = MlflowTracker(cfg, tmp_path)
    try:
        files = _listing(tmp_path)
        tracker.prepare(ArrayRecord(_state(cfg, 0)))
        assert traced.wait(timeout=120)
        # what a kill now would leave: no journal, no file in the run, nothing in MLflow
        assert _listing(tmp_path) == files and not (tmp_path / JOURNAL_DIR).exists()
        client = mlflow.MlflowClient(tracker.uri)
        assert client.search_logged_models([tracker.run.info.experiment_id]) == []
        assert client.search_model_versions(f"name='{cfg.tracking.registered_model}'") == []
        release.set()
        deadline = time.monotonic() + 120           # a hang guard, not a timing assertion
        while gc.get_freeze_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        # the heap as it is then (imports, the template) is left out of later collections
        assert gc.get_freeze_count() > 0 and tracker.export.ready
    finally:
        release.set()
        tracker.finish("")          # the run's end waits for the trace: close() joins the
        # writer thread (still a daemon; it is joined, not abandoned)
        mlflow.end_run()
    assert tracker.writer._thread is None and tracker.export.prepared == 1
    assert gc.get_freeze_count() == 0       # and collectable again once the phase ends


def test_a_template_that_cannot_be_traced_ahead_leaves_the_first_version_traced(
        tmp_path, monkeypatch, caplog):
    from server import tracking

    def broken(*args, **kwargs):
        raise RuntimeError("no trace")

    monkeypatch.setattr(tracking, "prepare_export", broken)
    cfg = _cfg(tmp_path, "broken")
    tracker, counts = _register_round_1(cfg, tmp_path, _state(cfg, 1), ahead=_state(cfg, 0))
    assert "could not be traced ahead" in caplog.text
    assert counts == (0, 1, 0) and tracker.versions == {1: "1"}


class _EchoGrid:
    """Two training sites that send back the global model they were sent, unchanged (no
    data, no training: what the server does around a round is under test, not a site)."""

    def __init__(self):
        self.run = None

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

        from protocol import wire

        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            content = RecordDict({
                wire.ARRAYS: m.content[wire.ARRAYS],
                wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 4, wire.DP_UNIT_WEIGHT: 1.0}),
                wire.SITE: ConfigRecord({wire.SITE_ID: f"site-{node}"})})
            replies.append(Message(content=content, reply_to=m))
        return replies


def _phase_cfg(tmp_path, name):
    return load_experiment(["experiment=smoke", "task.image_size=32", "tracking.log_models=true",
                            "strategy.fraction_evaluate=0.0", "strategy.min_evaluate_sites=0",
                            f"runs_dir={tmp_path / 'runs'}", f"name={name}"])


def _trackers(monkeypatch):
    from server import federation, tracking

    made = []

    class Kept(tracking.MlflowTracker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(federation, "MlflowTracker", Kept)
    return made


def test_a_phase_prepares_its_export_ahead_of_its_first_version(tmp_path, monkeypatch,
                                                                 task_identity):
    from server.federation import run_federation

    made = _trackers(monkeypatch)
    cfg = _phase_cfg(tmp_path, "phase")
    try:
        run_federation(_EchoGrid(), cfg, tmp_path / "run")
    finally:
        mlflow.end_run()
    (tracker,) = made
    # the template traced from the initial model while round 1 ran; round 1's version
    # written from it, never traced itself
    assert tracker.versions == {1: "1"}
    assert (tracker.export.prepared, tracker.export.traced, tracker.export.reused) == (1, 0, 1)


def test_a_phase_whose_model_cannot_be_built_ends_its_run_failed(tmp_path, monkeypatch,
                                                                 task_identity):
    import pytest

    from server import tracking
    from server.federation import run_federation

    real, calls = tracking.MlflowTracker._global_model, []

    def broken(self, arrays):         # the one traced ahead is built; round 1's is not
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("no model")
        return real(self, arrays)

    monkeypatch.setattr(tracking.MlflowTracker, "_global_model", broken)
    made = _trackers(monkeypatch)
    cfg = _phase_cfg(tmp_path, "broken-model")
    try:
        with pytest.raises(RuntimeError, match="no model"):
            run_federation(_EchoGrid(), cfg, tmp_path / "run")
        assert mlflow.active_run() is None          # finish() ended it, not left RUNNING
    finally:
        mlflow.end_run()
    (tracker,) = made
    run = mlflow.MlflowClient(tracker.uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"


def test_a_phase_failing_after_its_trace_started_leaves_no_trace_running(tmp_path, monkeypatch,
                                                                       task_identity):
    """A raise between the tracker's start (its trace and frozen heap) and the first round
    - here the checkpointer's - ends the MLflow run FAILED and the trace with it."""
    import pytest

    from server import federation

    def refused(*args, **kwargs):
        raise RuntimeError("no checkpoint folder")

    monkeypatch.setattr(federation, "Checkpointer", refused)
    made = _trackers(monkeypatch)
    try:
        with pytest.raises(RuntimeError, match="no checkpoint folder"):
            federation.run_federation(_EchoGrid(), _phase_cfg(tmp_path, "no-ckpt"),
                                      tmp_path / "run")
        assert mlflow.active_run() is None
    finally:
        mlflow.end_run()
    assert not [t for t in threading.enumerate() if t.name == "medfed-mlflow-writer"]
    assert gc.get_freeze_count() == 0
    (tracker,) = made
    assert mlflow.MlflowClient(tracker.uri).get_run(tracker.run_id).info.status == "FAILED"


def test_a_fresh_phase_traces_before_its_mlflow_run_is_set_up(tmp_path, monkeypatch,
                                                               task_identity):
    """The trace's head start: the MLflow set-up (a new store's schema, the run, its
    params: seconds under load) and round 1, not round 1 alone."""
    from server import tracking
    from server.federation import run_federation

    order = []
    prepare, start_run = tracking.MlflowTracker.prepare, mlflow.start_run
    monkeypatch.setattr(tracking.MlflowTracker, "prepare",
                        lambda self, arrays: order.append("trace") or prepare(self, arrays))
    monkeypatch.setattr(mlflow, "start_run",
                        lambda *a, **k: order.append("mlflow run") or start_run(*a, **k))
    made = _trackers(monkeypatch)
    try:
        run_federation(_EchoGrid(), _phase_cfg(tmp_path, "early"), tmp_path / "run")
    finally:
        mlflow.end_run()
    assert order == ["trace", "mlflow run"]
    assert (made[0].export.prepared, made[0].export.traced, made[0].export.reused) == (1, 0, 1)


def test_a_tracker_whose_mlflow_run_cannot_start_leaves_no_trace_running(tmp_path,
                                                                         monkeypatch):
    """The trace started first is waited for and its template dropped: no writer thread,
    no frozen heap, nothing in the run folder."""
    import pytest

    from server import tracking

    def refused(self, *args):
        raise RuntimeError("no store")

    monkeypatch.setattr(tracking.MlflowTracker, "_start_run", refused)
    cfg = _cfg(tmp_path, "no-store")
    with pytest.raises(RuntimeError, match="no store"):
        tracking.MlflowTracker(cfg, tmp_path / "run", initial=ArrayRecord(_state(cfg, 0)))
    assert not [t for t in threading.enumerate() if t.name == "medfed-mlflow-writer"]
    assert gc.get_freeze_count() == 0 and not any((tmp_path / "run").iterdir())


def test_the_writers_export_leaves_the_torch_rng_alone(tmp_path, monkeypatch):
    """The round loop builds each round's model under fork_rng while the writer may be
    exporting (server/tracking.py on_train): exact only if the writer's export never sets
    the global torch RNG (dynamo's strict export saves and restores it) nor draws from it."""
    from server.model_export import ReusedExport
    from server.versions import prepare_export

    cfg = _cfg(tmp_path, "rng")
    model, task = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options())
    sets = []
    for owner in (torch, torch.random):
        real = owner.set_rng_state
        monkeypatch.setattr(owner, "set_rng_state",
                            lambda state, real=real: sets.append(1) or real(state))
    before = torch.get_rng_state().clone()
    export = ReusedExport()
    try:
        assert prepare_export(export, model, task.data_needs.multi_label)
    finally:
        export.close()
    assert sets == [] and torch.equal(torch.get_rng_state(), before)


def test_the_round_loop_never_builds_a_model_while_the_writer_traces(tmp_path, monkeypatch):
    """torch.export's trace replaces every module's ``__call__``/``__getattr__`` while it
    runs (a SwinUNETR built meanwhile on another thread lost its blocks: a flaky failed
    simulation): the round loop's build of round 1's model waits for the writer's trace."""
    from server import tracking

    cfg = _cfg(tmp_path, "tracing")
    state = _state(cfg, 0)
    tracing, started = threading.Event(), threading.Event()
    real_save = mlflow.pytorch.save_model

    def slow_trace(*args, **kwargs):
        tracing.set()
        started.set()
        time.sleep(0.5)                  # the round loop asks for its model meanwhile
        try:
            return real_save(*args, **kwargs)
        finally:
            tracing.clear()

    real_build, overlapped = tracking.build, []

    def build(*args, **kwargs):
        overlapped.append(tracing.is_set())
        return real_build(*args, **kwargs)

    monkeypatch.setattr(mlflow.pytorch, "save_model", slow_trace)
    monkeypatch.setattr(tracking, "build", build)
    tracker = tracking.MlflowTracker(cfg, tmp_path / "run")
    try:
        tracker.prepare(ArrayRecord(state))
        assert started.wait(60)
        tracker._global_model(ArrayRecord(state))
        tracker.writer.drain()
    finally:
        tracker.finish("")
        mlflow.end_run()
    assert overlapped == [False, False]      # prepare's own build, then round 1's
    assert tracker.export.prepared == 1
