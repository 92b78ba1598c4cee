"""bench.heterogeneity's multi-seed summary: tables average each arm over the seeds that
finished it, figures a model does not have stay None, and the headline ratio is taken from
the averaged α = 0.5 table."""

import argparse

import pytest

from bench.heterogeneity import results


def _run(fedavg: float, decorr: float, pooled: float, personal: float) -> dict:
    return {"fedavg": {"external_mcc": fedavg, "site_test_mcc": 0.5},
            "fedavg_la_decorr": {"external_mcc": decorr, "site_test_mcc": 0.6},
            "personalized": {"external_mcc": None, "site_test_mcc": personal},
            "pooled": {"external_mcc": pooled, "site_test_mcc": 0.7}}


def _args(seeds: str, alphas: str) -> argparse.Namespace:
    return argparse.Namespace(seeds=seeds, alphas=alphas, rounds=2, local_epochs=1, patients=10,
                              arms="fedavg,fedavg_la_decorr,personalized,pooled")


def test_tables_average_over_seeds_and_the_ratio_uses_the_averages():
    per_seed = {"0": {"0.5": _run(0.4, 0.7, 0.8, 0.9)},
                "1": {"0.5": _run(0.6, 0.3, 0.6, 0.5)}}
    payload = results(per_seed, _args("0,1", "0.5"))
    mid = payload["tables"]["0.5"]
    assert mid["fedavg"]["external_mcc"] == pytest.approx(0.5)
    assert mid["fedavg_la_decorr"]["external_mcc"] == pytest.approx(0.5)
    assert mid["personalized"] == {"external_mcc": None, "site_test_mcc": pytest.approx(0.7)}
    # both strategies average 0.5; max keeps the first of equals, in GLOBAL's order
    assert payload["best_strategy_alpha_0_5"] == "fedavg"
    assert payload["best_over_pooled_alpha_0_5"] == pytest.approx(0.5 / 0.7)
    assert payload["seeds"] == [0, 1] and payload["complete"]


def test_a_partial_run_says_so_and_has_no_ratio_without_alpha_0_5():
    payload = results({"0": {"10.0": _run(0.4, 0.7, 0.8, 0.9)}}, _args("0,1", "10,0.5"))
    assert not payload["complete"]
    assert payload["best_over_pooled_alpha_0_5"] is None
    assert payload["tables"]["10.0"]["fedavg_la_decorr"]["external_mcc"] == pytest.approx(0.7)


def test_a_pooled_model_at_chance_gives_no_ratio_but_still_a_best_strategy():
    payload = results({"0": {"0.5": _run(0.4, 0.7, 0.0, 0.9)}}, _args("0", "0.5"))
    assert payload["best_strategy_alpha_0_5"] == "fedavg_la_decorr"
    assert payload["best_over_pooled_alpha_0_5"] is None


def _main(monkeypatch, tmp_path, argv, measured, commit_id):
    import sys

    import bench.common
    import bench.heterogeneity as het

    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(het, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(het, "commit", lambda: commit_id)
    monkeypatch.setattr(het, "update_results_md", lambda key, row: None)

    def run_alpha(alpha, seed, args, work):
        measured.append((seed, alpha))
        return _run(0.1 * (seed + 1), 0.6, 0.8, 0.9)

    monkeypatch.setattr(het, "run_alpha", run_alpha)
    monkeypatch.setattr(sys, "argv", ["heterogeneity", "--name", "h", "--rounds", "2",
                                      "--arms", "fedavg,fedavg_la_decorr,personalized,pooled",
                                      *argv])
    het.main()
    import json
    return json.loads((tmp_path / "h.json").read_text())


def test_resume_keeps_finished_runs_and_measures_only_the_missing_ones(monkeypatch, tmp_path):
    first, second = [], []
    _main(monkeypatch, tmp_path, ["--seeds", "0", "--alphas", "0.5"], first, "aaa")
    payload = _main(monkeypatch, tmp_path, ["--seeds", "0,1", "--alphas", "0.5", "--resume"],
                    second, "bbb")
    assert first == [(0, 0.5)] and second == [(1, 0.5)]
    assert payload["complete"] and payload["seeds"] == [0, 1]
    assert payload["run_commits"] == {"0/0.5": "aaa", "1/0.5": "bbb"}
    assert payload["tables"]["0.5"]["fedavg"]["external_mcc"] == pytest.approx(0.15)
    again = []                      # without --resume everything is measured anew
    _main(monkeypatch, tmp_path, ["--seeds", "0", "--alphas", "0.5"], again, "ccc")
    assert again == [(0, 0.5)]


def test_resume_refuses_a_file_measured_with_other_settings(monkeypatch, tmp_path):
    _main(monkeypatch, tmp_path, ["--seeds", "0", "--alphas", "0.5"], [], "aaa")
    with pytest.raises(SystemExit, match="other settings"):
        _main(monkeypatch, tmp_path, ["--seeds", "0", "--alphas", "0.5", "--resume",
                                      "--local-epochs", "2"], [], "bbb")
