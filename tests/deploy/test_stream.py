"""What ``medfed run`` shows of a deployed run's stream, fed the raw output of ``flwr run
--stream`` captured from the loopback deployment in ``test_deploy_e2e.py`` (smoke experiment,
sites a, b, c, two rounds, c killed in round 2): MedFed's table and lines pass, Flower's raw
dump only with ``--verbose``."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from medfed.deploy import submit as submit_module
from medfed.deploy.preflight import DeployError
from medfed.deploy.stream import StreamFilter
from medfed.deploy.submit import RunRequest, submit

CAPTURED = Path(__file__).parent / "data" / "flwr_run_stream.txt"
RAW_DUMP = ("'train_loss':", "'train-seconds': '", "Aggregated ClientApp-side",
            "Received error in reply", "[ROUND 1/2]")


def _raw() -> list[str]:
    return CAPTURED.read_text().splitlines()


def _shown(verbose: bool) -> list[tuple[int, str]]:
    view = StreamFilter(verbose=verbose)
    return [shown for raw in _raw() if (shown := view(raw)) is not None]


def test_the_table_passes_and_flowers_raw_dump_is_hidden():
    shown = _shown(verbose=False)
    text = [t for _, t in shown]
    header = next(t for t in text if t.split()[:2] == ["round", "site"])
    assert header.split()[-2:] == ["train_s", "eval_s"]
    rows = {tuple(t.split()[:2]) for t in text if t.split()[:1] in (["1"], ["2"])}
    assert {("1", "a"), ("1", "b"), ("1", "c"), ("1", "GLOBAL"), ("2", "a"), ("2", "b"),
            ("2", "GLOBAL")} <= rows
    assert ("2", "c") not in rows                       # c was killed in round 2
    failures = [(lvl, t) for lvl, t in shown if "reply failed" in t]
    assert len(failures) == 1 and failures[0][0] == logging.WARNING
    assert failures[0][1].startswith("round 2: training reply failed: c (node ")
    assert any(t.startswith("results: MLflow tracking server http://") for t in text)
    for raw_dump in RAW_DUMP:
        assert not [t for t in text if raw_dump in t], raw_dump
    # every line shown is one the ServerApp marked, each once
    assert len(shown) == sum(1 for raw in _raw() if raw.startswith("[medfed "))


def test_verbose_shows_flowers_lines_too_and_the_table_once():
    quiet, verbose = _shown(verbose=False), _shown(verbose=True)
    text = [t for _, t in verbose]
    for raw_dump in RAW_DUMP:
        assert [t for t in text if raw_dump in t], raw_dump
    for line in quiet:
        assert verbose.count(line) == quiet.count(line)


class _FakeFlwrRun:
    """``flwr run --stream``: the captured lines (or others) on stdout."""

    def __init__(self, lines: list[str]):
        self.stdout = io.StringIO("".join(f"{line}\n" for line in lines))

    def wait(self):
        return 0


def _submit(monkeypatch, tmp_path, lines, *, verbose=False, echoed=None):
    monkeypatch.setattr(submit_module.subprocess, "Popen", lambda cmd, **k: _FakeFlwrRun(lines))
    monkeypatch.setattr(submit_module, "check_superlink", lambda *a, **k: None)
    monkeypatch.setattr(submit_module, "write_connection", lambda *a, **k: None)
    monkeypatch.setattr(submit_module, "run_status",
                        lambda run_id, home: {"status": "finished:completed", "elapsed": 1.0})
    echoed = [] if echoed is None else echoed
    request = RunRequest(overrides=["experiment=smoke"], superlink="127.0.0.1:1",
                         root_cert=tmp_path / "ca.pem", app_dir=submit_module.Path.cwd(),
                         flwr_home=tmp_path, verbose=verbose)
    return submit(request, echo=echoed.append), echoed


def test_medfed_run_logs_the_table_at_the_servers_levels(monkeypatch, tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        code, echoed = _submit(monkeypatch, tmp_path, _raw())
    assert code == 0 and len(echoed) == 1 and '"finished:completed"' in echoed[0]
    streamed = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "medfed.run"]
    assert streamed == _shown(verbose=False)


def test_when_no_run_starts_flowers_hidden_reason_is_shown(monkeypatch, tmp_path):
    refused = ["Using SuperLink: medfed (localhost:1)",
               "❌ The run config key 'foo' is not declared by the app."]
    echoed: list[str] = []
    with pytest.raises(DeployError, match="did not start a run"):
        _submit(monkeypatch, tmp_path, refused, echoed=echoed)
    assert echoed == refused
