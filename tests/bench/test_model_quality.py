"""bench.model_quality --merge: arms already measured with the same settings are kept, the
requested ones are measured anew beside them, and each arm names the commit that measured it."""

import json
import sys

import pytest

import bench.common
import bench.model_quality as mq


def _main(monkeypatch, tmp_path, argv, measured, commit_id, score):
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(mq, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(mq, "commit", lambda: commit_id)
    monkeypatch.setattr(mq, "update_results_md", lambda key, row: None)

    def federated(cfg, external, studies):
        measured.append(cfg.pretrain.objective or "supervised")
        return {"external_mcc": score, "external_mcc_missing_one": score / 2}

    def centralized(cfg, studies, epochs, external):
        measured.append("centralized")
        return {"external_mcc": 0.5, "external_mcc_missing_one": 0.25}

    monkeypatch.setattr(mq, "federated", federated)
    monkeypatch.setattr(mq, "centralized", centralized)
    monkeypatch.setattr(sys, "argv", ["model_quality", "--name", "mq", "--patients", "8", *argv])
    mq.main()
    return json.loads((tmp_path / "mq.json").read_text())


def test_merge_keeps_other_arms_and_replaces_the_requested_one(monkeypatch, tmp_path):
    first, second = [], []
    _main(monkeypatch, tmp_path, ["--arms", "supervised,pooled,mm_dino"], first, "aaa", 0.1)
    payload = _main(monkeypatch, tmp_path, ["--arms", "mm_dino", "--merge"], second, "bbb", 0.4)
    assert first == ["supervised", "centralized", "mm_dino"] and second == ["mm_dino"]
    assert payload["external_mcc"] == {"supervised": 0.1, "pooled": 0.5, "mm_dino": 0.4}
    assert payload["arm_commits"] == {"supervised": "aaa", "pooled": "aaa", "mm_dino": "bbb"}
    assert payload["best_federated"] == "mm_dino" and payload["complete"]
    alone = _main(monkeypatch, tmp_path, ["--arms", "mm_dino"], [], "ccc", 0.3)
    assert alone["external_mcc"] == {"mm_dino": 0.3}          # without --merge: a new file


def test_merge_refuses_a_file_measured_with_other_settings(monkeypatch, tmp_path):
    _main(monkeypatch, tmp_path, ["--arms", "supervised"], [], "aaa", 0.1)
    with pytest.raises(SystemExit, match="other settings"):
        _main(monkeypatch, tmp_path, ["--arms", "mm_dino", "--merge", "--seed", "1"], [], "b", 0.1)
