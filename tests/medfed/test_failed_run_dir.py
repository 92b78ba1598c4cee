"""A failed ``medfed simulate`` leaves no empty run folder: removed if nothing but its log was
written, else marked FAILED with the reason (checkpoints kept for resume)."""

from __future__ import annotations

import argparse

import pytest

import medfed.simulation
from medfed.commands.simulate import simulate
from server.federation import FAILED_MARKER, RUN_LOG


def _run(monkeypatch, tmp_path, federation):
    monkeypatch.setattr(medfed.simulation, "check_sites", lambda cfg: tmp_path)
    monkeypatch.setattr(medfed.simulation, "simulate", federation)
    args = argparse.Namespace(overrides=[f"runs_dir={tmp_path / 'runs'}"], verbose=False)
    with pytest.raises(RuntimeError, match="quorum"):
        simulate(args)
    return list((tmp_path / "runs").iterdir())


def test_failure_before_anything_is_written_leaves_no_folder(monkeypatch, tmp_path,
                                                              clean_logging):
    def federation(cfg, *, run_dir):
        assert (run_dir / RUN_LOG).exists()        # the run did start, in its own folder
        raise RuntimeError("quorum not reached: 1 of 2 sites connected")

    assert _run(monkeypatch, tmp_path, federation) == []


def test_failure_after_checkpoints_marks_the_folder_failed(monkeypatch, tmp_path,
                                                            clean_logging):
    def federation(cfg, *, run_dir):
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "round-1.pt").write_bytes(b"x")
        raise RuntimeError("quorum not reached in round 2\nsecond line")

    [run_dir] = _run(monkeypatch, tmp_path, federation)
    marker = (run_dir / FAILED_MARKER).read_text()
    assert marker.startswith("this run failed: RuntimeError: quorum not reached in round 2\n")
    assert "second line" not in marker and "resume=" in marker
    assert (run_dir / "checkpoints" / "round-1.pt").exists()
