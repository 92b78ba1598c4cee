"""The background MLflow writer: off the round loop, bounded, journalled, and recoverable."""

from __future__ import annotations

import json
import os
import threading

import pytest

from server.registration import (WRITER_NICENESS, BackgroundWriter, RoundWrites, journal_path,
                                 journalled, recover)


class Registry:
    """A fake registry whose registrations can be held back (``gate``)."""

    def __init__(self, gate: threading.Event | None = None):
        self.gate = gate
        self.logged: list[int] = []
        self.registered: list[int] = []
        self.started = threading.Event()

    def log_round(self, writes: RoundWrites) -> None:
        self.logged.append(writes.round)

    def register(self, writes: RoundWrites) -> str:
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=60)      # a hang guard, not a timing assertion
        self.registered.append(writes.round)
        return str(len(self.registered))


def _writes(rnd: int) -> RoundWrites:
    return RoundWrites(rnd, metrics={"test/loss": 0.5}, model=object(),
                       version_tags={"round": str(rnd)}, arrays_sha256=f"digest-{rnd}")


def test_a_round_goes_on_while_its_model_registers_and_the_end_waits(tmp_path):
    gate = threading.Event()
    registry = Registry(gate)
    writer = BackgroundWriter(tmp_path, log_round=registry.log_round,
                              register=registry.register, max_queued=1)
    writer.submit(_writes(1))
    assert registry.started.wait(timeout=60)
    writer.submit(_writes(2))                   # queued behind round 1: returns at once
    assert registry.registered == []
    assert [e["round"] for e in journalled(tmp_path)] == [1, 2]     # both journalled
    blocked = threading.Thread(target=writer.submit, args=(_writes(3),))
    blocked.start()                             # the queue is full: round 3 waits for a place
    blocked.join(timeout=1)
    assert blocked.is_alive()
    gate.set()
    blocked.join(timeout=60)
    writer.drain()
    assert registry.registered == [1, 2, 3] and registry.logged == [1, 2, 3]
    assert writer.versions == {1: "1", 2: "2", 3: "3"}
    assert journalled(tmp_path) == []           # all of it in MLflow: the journal is empty
    writer.close()


def test_a_failed_write_fails_the_run_at_the_next_round(tmp_path):
    def broken(writes):
        raise OSError("registry unreachable")

    writer = BackgroundWriter(tmp_path, log_round=lambda w: None, register=broken)
    writer.submit(_writes(1))
    with pytest.raises(RuntimeError, match="registry unreachable"):
        writer.drain()
    with pytest.raises(RuntimeError, match="registry unreachable"):
        writer.submit(_writes(2))
    assert [e["round"] for e in journalled(tmp_path)] == [1]    # kept for the resume
    writer.close()


def _journal(run_dir, rnd, *, metrics_logged=False):
    entry = _writes(rnd).journal_entry() | ({"metrics_logged": True, "metrics": {}}
                                            if metrics_logged else {})
    path = journal_path(run_dir, rnd)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entry))


def test_recovery_makes_the_record_agree_with_the_newest_checkpoint(tmp_path):
    """The state a SIGKILL leaves: rounds 2 (metrics logged, version half made), 3 (nothing
    written) and 4 (journalled, no checkpoint) queued; round 5 registered before its
    checkpoint was written. The checkpoint is round 3."""
    for rnd in (2, 3, 4):
        _journal(tmp_path, rnd, metrics_logged=rnd == 2)
    deleted, rewritten, registry = [], [], Registry()
    versions: dict[int, str] = {}

    def rewrite(entry):
        rewritten.append(entry["round"])
        return RoundWrites(entry["round"], metrics=entry["metrics"], model=object(),
                           version_tags=entry["version_tags"])

    written = recover(tmp_path, checkpoint_round=3,
                      versions_of_run={1: ["1"], 2: ["7"], 5: ["9"]},
                      delete_version=deleted.append, rewrite=rewrite,
                      log_round=registry.log_round, register=registry.register,
                      versions=versions)
    assert written == rewritten == [2, 3]
    assert sorted(deleted) == ["7", "9"]      # half-made round 2, round 5 runs again
    assert registry.logged == [3]             # round 2's metrics were in MLflow already
    assert registry.registered == [2, 3] and set(versions) == {2, 3}
    assert journalled(tmp_path) == []         # round 4 runs again: its entry is dropped


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="threads are reniced on Linux only")
def test_the_writer_thread_runs_nicer_than_the_round_loop(tmp_path):
    seen: dict[str, int] = {}

    def on_start():
        seen["writer"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    writer = BackgroundWriter(tmp_path, log_round=lambda w: None, register=lambda w: "1",
                              on_start=on_start)
    writer.submit(_writes(1))
    writer.close()
    loop = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen["writer"] == min(19, loop + WRITER_NICENESS) > loop or loop == 19
    assert writer.niceness == seen["writer"]
    # the round loop itself (and so the process's other threads) keeps its priority
    assert os.getpriority(os.PRIO_PROCESS, 0) == loop


def test_a_version_records_what_mlflow_register_model_records(tmp_path):
    """``create_version`` (the registered model created once per phase, not per version)
    leaves the same records as ``mlflow.register_model``: the version's source, run, logged
    model and tags, and the logged model's link back to its version."""
    import mlflow

    from server.versions import create_version, ensure_registered_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    run = client.create_run(experiment)
    made = [client.create_logged_model(experiment, name=f"global-round-{r}",
                                       source_run_id=run.info.run_id) for r in (1, 2)]
    ensure_registered_model(client, "m")
    ensure_registered_model(client, "m")           # a resumed run or a later phase: no error
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)          # as the tracker sets it (the registry resolves
    try:                                  # a models:/ source through it)
        mlflow.register_model(f"models:/{made[0].model_id}", "m", tags={"round": "1"})
        assert create_version(client, "m", f"models:/{made[1].model_id}", made[1].model_id,
                              {"round": "2"}) == "2"
    finally:
        mlflow.set_tracking_uri(previous)
    got = [client.get_model_version("m", v) for v in ("1", "2")]
    fields = ("source", "run_id", "model_id", "status", "tags")
    expected = {f: getattr(got[0], f) for f in fields} | {
        "source": f"models:/{made[1].model_id}", "tags": {"round": "2"}}
    assert {f: getattr(got[1], f) for f in fields} == expected
    assert got[1].run_id == run.info.run_id            # resolved from the logged model
    for logged, version in zip(made, (1, 2)):
        tag = client.get_logged_model(logged.model_id).tags["mlflow.modelVersions"]
        assert json.loads(tag) == [{"name": "m", "version": version}]
    with pytest.raises(mlflow.exceptions.MlflowException):   # other errors are not swallowed
        ensure_registered_model(client, "")


def test_work_ahead_runs_first_on_the_writer_and_is_not_kept(tmp_path):
    import gc
    import weakref

    class Model:
        pass

    registry, ran = Registry(), threading.Event()
    model = Model()
    alive = weakref.ref(model)

    def ahead(held=model):
        assert registry.logged == []          # before any round's writes
        ran.set()

    writer = BackgroundWriter(tmp_path, log_round=registry.log_round,
                              register=registry.register)
    writer.start(ahead)
    del model, ahead
    writer.submit(_writes(1))
    writer.drain()
    assert ran.is_set() and registry.registered == [1]
    gc.collect()
    assert alive() is None            # freed while the writer still runs (a phase's model)
    writer.close()


def test_work_ahead_handed_to_a_running_writer_is_refused_not_dropped(tmp_path):
    registry = Registry()
    writer = BackgroundWriter(tmp_path, log_round=registry.log_round,
                              register=registry.register)
    writer.submit(_writes(1))                 # the first submit started the worker
    try:
        with pytest.raises(RuntimeError, match="already running"):
            writer.start(lambda: None)
        writer.start()                        # nothing ahead: a no-op, as submit() uses it
        writer.drain()
        assert registry.registered == [1]
    finally:
        writer.close()
