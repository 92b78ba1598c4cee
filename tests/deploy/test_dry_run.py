"""``medfed run --dry-run``: the same submission with run config ``preflight-only``; of the
streamed output only the preflight's lines are shown, and they decide the exit code."""

from __future__ import annotations

import io

import pytest

from medfed.deploy import submit as submit_module
from medfed.deploy.submit import RunRequest, submit
from protocol import wire


class FakeFlwrRun:
    """``flwr run --stream`` as the coordinator answers it (Flower's lines around ours)."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.cmd: list[str] = []

    def __call__(self, cmd, **kwargs):
        self.cmd = cmd
        self.stdout = io.StringIO("".join(f"{line}\n" for line in self.lines))
        return self

    def wait(self):
        return 0


def _run(monkeypatch, tmp_path, lines, state, *overrides, details=""):
    fake = FakeFlwrRun(["Successfully started run 42", *lines])
    monkeypatch.setattr(submit_module.subprocess, "Popen", fake)
    monkeypatch.setattr(submit_module, "check_superlink", lambda *a, **k: None)
    monkeypatch.setattr(submit_module, "write_connection", lambda *a, **k: None)
    monkeypatch.setattr(submit_module, "run_status", lambda run_id, home: {"status": state,
                                                                     "status-details": details})
    shown: list[str] = []
    request = RunRequest(overrides=["experiment=smoke", *overrides], superlink="127.0.0.1:1",
                         root_cert=tmp_path / "ca.pem", app_dir=submit_module.Path.cwd(),
                         flwr_home=tmp_path, dry_run=True)
    code = submit(request, echo=shown.append)
    assert f"{wire.RUN_PREFLIGHT_ONLY}='true'" in fake.cmd[fake.cmd.index("--run-config") + 1]
    return code, shown


def test_problems_are_shown_one_a_line_and_exit_2(monkeypatch, tmp_path):
    problems = ["a, b: each requires differential privacy (...)",
                "c: each requires secure aggregation (...)"]
    lines = ["INFO :      Starting MedFed", *[f"ERROR preflight problem: {p}" for p in problems],
             "Traceback (most recent call last):", "PreflightError: preflight refused the run"]
    code, shown = _run(monkeypatch, tmp_path, lines, "finished:failed")
    assert code == 2
    assert shown == [f"preflight problem: {p}" for p in problems]


def test_problems_lost_from_the_stream_are_read_from_the_status(monkeypatch, tmp_path):
    details = ("ServerApp failed with exception: preflight refused the run: a, b: each has no "
               "privacy budget (...) | c: each requires secure aggregation (...)")
    code, shown = _run(monkeypatch, tmp_path, ["INFO :      Starting MedFed"],
                       "finished:failed", details=details)
    assert code == 2
    assert shown == ["preflight problem: a, b: each has no privacy budget (...)",
                     "preflight problem: c: each requires secure aggregation (...)"]


def test_a_passing_preflight_exits_0(monkeypatch, tmp_path):
    code, shown = _run(monkeypatch, tmp_path, ["INFO preflight ok: 3 sites (a, b, c train)"],
                       "finished:completed")
    assert (code, shown) == (0, ["preflight ok: 3 sites (a, b, c train)"])


def test_a_run_without_a_preflight_result_is_an_error(monkeypatch, tmp_path):
    with pytest.raises(RuntimeError, match="without a preflight result"):
        _run(monkeypatch, tmp_path, ["ERROR something else broke"], "finished:failed")


def test_every_run_config_key_submitted_is_declared_by_the_app():
    """The SuperLink refuses to start a run whose run config has a key the app's
    ``[tool.flwr.app.config]`` does not declare."""
    import tomllib

    from medfed.simulation import PROJECT_ROOT

    with open(PROJECT_ROOT / "pyproject.toml", "rb") as fh:
        declared = tomllib.load(fh)["tool"]["flwr"]["app"]["config"]
    assert {wire.RUN_EXPERIMENT, wire.RUN_OVERRIDES, wire.RUN_PREFLIGHT_ONLY} <= set(declared)
    assert declared[wire.RUN_PREFLIGHT_ONLY] == "false"


# what the ServerApp streams (server/stream_log.py marks) when a DP job asks a site for more
# epsilon than its ledger has left: the preflight cannot refuse it, the site decides in round 1
BUDGET_WARNING = ("a: dpsgd plans epsilon 8 over 3 rounds > the 2.00 left of its budget 8; "
                  "composed with its ledger it may still fit - the site decides and refuses "
                  "the first round if not")


def test_a_budget_warning_is_shown_by_the_dry_run(monkeypatch, tmp_path):
    """Walkthrough finding: the preflight's "above what is left" warning was logged by the
    ServerApp but ``--dry-run`` echoed only ``ok``/``problem`` lines."""
    lines = [f"[medfed WARNING] preflight warning: {BUDGET_WARNING}",
             "[medfed INFO] preflight ok: 3 sites (a, b, c train)"]
    code, shown = _run(monkeypatch, tmp_path, lines, "finished:completed")
    assert (code, shown) == (0, [f"preflight warning: {BUDGET_WARNING}",
                                 "preflight ok: 3 sites (a, b, c train)"])


def test_a_dry_run_whose_ok_line_was_lost_still_says_ok_after_a_warning(monkeypatch, tmp_path):
    code, shown = _run(monkeypatch, tmp_path,
                       [f"[medfed WARNING] preflight warning: {BUDGET_WARNING}"],
                       "finished:completed")
    assert code == 0 and shown[0] == f"preflight warning: {BUDGET_WARNING}"
    assert shown[1].startswith("preflight ok (run 42;")


def test_a_budget_warning_is_shown_by_a_real_run(monkeypatch, tmp_path, caplog):
    """A real run shows the ServerApp's marked lines at their level: the warning among them."""
    fake = FakeFlwrRun(["Successfully started run 42",
                        f"[medfed WARNING] preflight warning: {BUDGET_WARNING}"])
    monkeypatch.setattr(submit_module.subprocess, "Popen", fake)
    monkeypatch.setattr(submit_module, "check_superlink", lambda *a, **k: None)
    monkeypatch.setattr(submit_module, "write_connection", lambda *a, **k: None)
    monkeypatch.setattr(submit_module, "run_status",
                        lambda run_id, home: {"status": "finished:completed"})
    request = RunRequest(overrides=["experiment=smoke"], superlink="127.0.0.1:1",
                         root_cert=tmp_path / "ca.pem", app_dir=submit_module.Path.cwd(),
                         flwr_home=tmp_path)
    with caplog.at_level("WARNING", logger="medfed.run"):
        assert submit(request, echo=lambda _line: None) == 0
    assert f"preflight warning: {BUDGET_WARNING}" in caplog.text

