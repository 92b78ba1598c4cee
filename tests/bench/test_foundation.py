"""bench.foundation --throughput: every mode runs a step on a tiny DINOv2 loaded through the
foundation model, and the engine's non-DP LoRA step does the hand-written loop's work."""

import math

import pytest

import bench.foundation as fb

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
            patch_size=8, image_size=32)


@pytest.fixture(scope="module")
def foundation_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    fb.save_encoder(root / fb.WEIGHTS_NAME, encoder=TINY)
    return root


@pytest.fixture(scope="module")
def runs(foundation_dir):
    return {m: fb.run_child(m, foundation_dir, steps=2, warmup=1, batch=4, image_size=32)
            for m in fb.MODES}


def test_every_mode_times_its_steps_and_trains_only_the_adapters(runs):
    for mode, r in runs.items():
        assert len(r["ms_steps"]) == len(r["cpu_ms_steps"]) == 2, mode
        assert all(t > 0 for t in r["ms_steps"]), mode
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"]), mode
        assert 0 < r["trainable_params"] < r["params"], mode     # LoRA: the base is frozen


def test_engine_step_matches_the_handwritten_loop(runs):
    # same init, same samples, same AdamW settings: the same loss after each step
    engine, hand = runs["medfed_lora"]["losses"], runs["handwritten_lora"]["losses"]
    assert engine == pytest.approx(hand, rel=1e-4, abs=1e-5)
    assert engine[2] < engine[0]                                   # it trains
    # DP-SGD starts from the same model, then clipping and noise make it differ
    assert runs["medfed_lora_dp"]["losses"][0] == pytest.approx(hand[0], rel=1e-5)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_other_adapters_run_every_mode_and_match_the_handwritten_loop(foundation_dir, method):
    # --method dora|ia3: the same three modes, named after the method, on the peft-injected
    # site model; the hand-written loop trains that same model, so its losses match the engine's
    runs = {m: fb.run_child(m, foundation_dir, steps=1, warmup=1, batch=4, image_size=32,
                            method=method) for m in fb.modes_of(method)}
    engine, hand, dp = fb.modes_of(method)
    assert (engine, hand, dp) == (f"medfed_{method}", f"handwritten_{method}",
                                  f"medfed_{method}_dp")
    for mode, r in runs.items():
        assert len(r["ms_steps"]) == len(r["cpu_ms_steps"]) == 1, mode
        assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"]), mode
        assert 0 < r["trainable_params"] < r["params"], mode
    lora = fb.run_child("medfed_lora", foundation_dir, steps=1, warmup=1, batch=4,
                        image_size=32)
    assert runs[engine]["trainable_params"] != lora["trainable_params"]   # not LoRA again
    assert runs[engine]["losses"] == pytest.approx(runs[hand]["losses"], rel=1e-4, abs=1e-5)
    assert runs[dp]["losses"][0] == pytest.approx(runs[hand]["losses"][0], rel=1e-5)
    with pytest.raises(ValueError, match="unknown mode"):
        fb.run_child("medfed_lora", foundation_dir, steps=1, method=method)


def test_other_adapters_write_their_own_file_and_row():
    assert fb.default_name("lora", "cpu") == "foundation"
    assert fb.default_name("dora", "cpu") == "foundation_throughput_dora"
    assert fb.default_name("ia3", "cuda:0") == "foundation_throughput_ia3_gpu"
    assert fb._key({"device": "cpu"}, "foundation_throughput_dora") == \
        "foundation_throughput_dora"
    assert fb.figure_keys("lora") == {
        "throughput": "lora_throughput_ratio", "dp": "dp_lora_time_ratio",
        "throughput_cpu": "lora_throughput_ratio_cpu_time", "dp_cpu": "dp_lora_cpu_time_ratio"}
