"""bench.dp_seeds pools per-seed MCC of bench.dp_centre runs: a (draw, seed) measured twice
or runs from different encoders are refused, and the ratio is of the means."""

from __future__ import annotations

import json

import pytest

from bench import dp_seeds


def _run(tmp_path, name: str, draw: int, arms: dict, sha: str = "ab" * 32) -> str:
    (tmp_path / f"{name}.json").write_text(json.dumps({
        "public_pretraining": {"sha256": sha},
        "draw": {"seed": draw, "arms": {k: {"site_test_mcc": v, "external_mcc": v / 2}
                                        for k, v in arms.items()}}}))
    return name


def test_seeds_pool_across_runs_and_draws_and_duplicates_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(dp_seeds, "RESULTS_DIR", tmp_path)
    a = _run(tmp_path, "a", 0, {"dp": 0.4, "dp@seed1": 0.6, "lora": 0.5, "lora@seed1": 0.7})
    b = _run(tmp_path, "b", 1, {"dp@seed3": 0.5, "lora@seed3": 0.6})
    arms, sha = dp_seeds.collect((a, b))
    assert sha == "ab" * 32 and sorted(arms["dp"]) == [(0, 0), (0, 1), (1, 3)]
    over = dp_seeds.compare(arms["dp"], arms["lora"], "site_test_mcc")
    assert over["ratio"] == pytest.approx(0.5 / 0.6) and over["paired_seeds"] == 3
    assert over["paired_difference"] == pytest.approx(-0.1) and not over["goal_met"]
    twice = _run(tmp_path, "c", 1, {"lora@seed3": 0.9})
    with pytest.raises(SystemExit, match="lora draw 1 seed 3 is measured twice"):
        dp_seeds.collect((a, b, twice))
    other = _run(tmp_path, "d", 2, {"lora": 0.9}, sha="cd" * 32)
    with pytest.raises(SystemExit, match="2 encoders"):
        dp_seeds.collect((a, other))


def test_federated_over_pooled_is_per_recipe_over_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(dp_seeds, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(dp_seeds, "write_result", lambda name, out: tmp_path / f"{name}.json")
    monkeypatch.setattr(dp_seeds, "update_results_md", lambda key, row: None)
    # external MCC is half of what _run is given
    a = _run(tmp_path, "a", 0, {"lora": 0.8, "lora@seed1": 1.0, "pooled": 1.0,
                                "pooled@seed1": 1.2, "lora_ffa": 1.0, "lora_ffa@seed1": 1.2})
    b = _run(tmp_path, "b", 0, {"pooled_ffa": 1.2, "pooled_ffa@seed1": 1.2})   # same draw
    out = dp_seeds.federated((a, b))
    plain, ffa = out["over_pooled"]["lora"], out["over_pooled"]["lora_ffa"]
    assert plain["ratio"] == pytest.approx(0.9 / 1.1) and not plain["goal_met"]
    assert ffa["ratio"] == pytest.approx(1.1 / 1.2) and ffa["goal_met"]
    assert ffa["paired_seeds"] == 2 and ffa["paired_difference"] == pytest.approx(-0.05)
    assert out["ffa_over_plain"]["paired_difference"] == pytest.approx(0.1)
    with pytest.raises(SystemExit, match="pooled_ffa"):
        dp_seeds.federated((a,))


def test_an_arm_run_on_some_seeds_is_compared_on_exactly_those_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(dp_seeds, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(dp_seeds, "write_result", lambda name, out: tmp_path / f"{name}.json")
    monkeypatch.setattr(dp_seeds, "update_results_md", lambda key, row: None)
    recipe = dp_seeds.DP
    a = _run(tmp_path, "a", 0, {"lora": 0.6, "lora@seed1": 0.8, "lora@seed2": 0.1,
                                recipe: 0.4, f"{recipe}@seed1": 0.6, f"{recipe}@seed2": 0.9,
                                "lora_std_hlr_lp5": 0.5, "lora_std_hlr_lp5@seed1": 0.5,
                                "lora_std_hlr_lp5@seed2": 0.5})
    b = _run(tmp_path, "b", 0, {"ia3": 0.6, "ia3@seed1": 0.6})       # seeds 0-1 only
    arms, sha = dp_seeds.collect((a, b))
    out = dp_seeds.same_runs(arms, sha, (a, b), "ia3", "x")
    assert out["runs"] == [(0, 0), (0, 1)]                         # seed 2 left out
    assert out["over"]["lora"]["site_test_mcc"]["ratio"] == pytest.approx(0.6 / 0.7)
    assert out["over"][recipe]["site_test_mcc"]["ratio"] == pytest.approx(0.6 / 0.5)
    assert out["over"][recipe]["external_mcc"]["paired_difference"] == pytest.approx(0.05)
    short = _run(tmp_path, "c", 1, {"ia3@seed4": 0.6})               # no reference there
    arms, sha = dp_seeds.collect((a, b, short))
    with pytest.raises(SystemExit, match="without some of ia3's runs"):
        dp_seeds.same_runs(arms, sha, (a, b, short), "ia3", "x")
