"""bench.foundation's MCC arms: the public cohort shares no patient with the sites, the
pretrained encoder is written as a directory that gives its learned patch kernel back when
loaded by NAME, the summary's figures, and the two halves of foundation.json merge."""

import json
import shutil

import pytest
import torch

import bench.common
import bench.foundation as fb
import bench.foundation_mcc as fm
from medfed.synth.sites import Scenario, synthesize
from models.tasks import build

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
            patch_size=8, image_size=32)


def test_public_cohort_is_disjoint_from_the_sites_and_overlap_is_refused(tmp_path):
    public = fm.cohort_keys(fm.public_cohort(tmp_path / "public", patients=5))
    synthesize(tmp_path / "draw", n_sites=2, seed=0, external=True,
               scenario=Scenario(patients=5, label_fraction=1.0))
    sites = {n: fm.cohort_keys(tmp_path / "draw" / n) for n in ("site-0", "site-1", "external")}
    report = fm.disjointness(public, sites)
    assert report["public"]["patients"] >= 4 and report["public"]["studies"] >= 4
    assert all(v == {"patients": 0, "studies": 0} for v in report["overlap_with_public"].values())
    # the check is not vacuous: the public cohort against itself is refused
    with pytest.raises(RuntimeError, match="shares"):
        fm.disjointness(public, {"copy": public})
    # the same seed as a site would give the same patients: also refused
    same = fm.cohort_keys(fm.public_cohort(tmp_path / "same", patients=5, seed=0))
    with pytest.raises(RuntimeError, match="site-0"):
        fm.disjointness(same, {"site-0": sites["site-0"]})


def test_written_back_encoder_loads_by_name_with_the_learned_patch_kernel(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "ENCODER", TINY)
    fm.save_initial_encoder(tmp_path)
    options = dict(weights=fm.INIT_NAME, method="full", image_size=32, num_classes=3)
    model, _ = build("foundation", options, "classification", {}, foundation_dir=tmp_path)
    torch.manual_seed(1)
    with torch.no_grad():                       # what pretraining would have learned
        for lin in model.patch_embed:
            lin.weight.add_(torch.randn_like(lin.weight))
            lin.bias.add_(torch.randn_like(lin.bias))
    learned = torch.stack([lin.weight for lin in model.patch_embed]).mean(0)
    learned_bias = torch.stack([lin.bias for lin in model.patch_embed]).mean(0)
    fm.write_back_patch_kernel(model)
    from models.foundation.export import save_encoder

    save_encoder(model, tmp_path / fm.PRETRAINED_NAME)
    config = json.loads((tmp_path / fm.PRETRAINED_NAME / "config.json").read_text())
    assert config["model_type"] == "dinov2"
    loaded, _ = build("foundation", options | {"weights": fm.PRETRAINED_NAME}, "classification",
                      {}, foundation_dir=tmp_path)
    for lin in loaded.patch_embed:              # every channel starts from the learned mean
        assert torch.allclose(lin.weight, learned, atol=1e-6)
        assert torch.allclose(lin.bias, learned_bias, atol=1e-6)
    fresh, _ = build("foundation", options, "classification", {}, foundation_dir=tmp_path)
    assert not torch.allclose(fresh.patch_embed[0].weight, learned, atol=1e-3)


def _draw(**mcc):
    return {"arms": {a: {"external_mcc": v, "site_test_mcc": v / 2} for a, v in mcc.items()}}


def test_summary_means_over_draws_and_refuses_ratios_to_non_positive():
    draws = {0: _draw(supervised_scratch=0.2, lora=0.4, mm_dino=0.3, pooled=0.5, dp_lora=0.2),
             1: _draw(supervised_scratch=0.3, lora=0.2, mm_dino=0.5, pooled=0.5, dp_lora=0.3)}
    s = fm.summarize(draws)
    assert s["mm_dino_pretrained_minus_supervised_scratch"] == pytest.approx(0.15)
    assert s["mm_dino_minus_scratch_per_draw"] == pytest.approx([0.1, 0.2])
    assert s["federated_over_pooled"] == pytest.approx(0.3 / 0.5)
    assert s["federated_over_pooled_ffa"] is None                 # no FFA arm ran
    assert s["dp_lora_over_lora_eps8"] == pytest.approx(0.125 / 0.15)     # site test MCC
    assert s["external_mcc"]["lora"]["min"] == 0.2 and s["external_mcc"]["lora"]["max"] == 0.4
    met = fm.targets_met(s)
    assert met == {"mm_dino_pretrained_minus_supervised_scratch": True,
                   "federated_over_pooled": False, "dp_lora_over_lora_eps8": False}
    worse = fm.summarize({0: _draw(lora=-0.1, dp_lora=0.1, pooled=0.0)})
    assert worse["dp_lora_over_lora_eps8"] is None and worse["federated_over_pooled"] is None
    assert fm.targets_met(worse)["federated_over_pooled"] is None


def test_ffa_arms_have_their_own_ratio_and_pooled_ffa_counts_as_central():
    draws = {0: _draw(lora=0.4, pooled=0.5, lora_ffa=0.45, pooled_ffa=0.5),
             1: _draw(lora=0.2, pooled=0.5, lora_ffa=0.55, pooled_ffa=0.6)}
    s = fm.summarize(draws)
    assert s["federated_over_pooled_ffa"] == pytest.approx(0.5 / 0.55)
    assert s["federated_over_pooled"] == pytest.approx(0.3 / 0.5)
    assert s["external_mcc"]["pooled_ffa"]["values"] == [0.5, 0.6]
    assert set(fm.POOLED) == {"pooled", "pooled_ffa"}
    assert fm.FFA == "+model.options.freeze_lora_a=true"


def test_each_half_keeps_the_others_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(bench.common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(fb, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(fb, "commit", lambda: "abc")
    old = {"lora_throughput_ratio": 0.96, "modes": {}, "targets_met": {
        "lora_throughput_ratio": True, "mm_dino_pretrained_minus_supervised_scratch": None},
        "not_measured": {"x": "y"}, "commit": "old", "machine": "box"}
    (tmp_path / "foundation.json").write_text(json.dumps(old))
    payload = fb.merged("foundation", {"mm_dino_pretrained_minus_supervised_scratch": 0.1,
                                       "mcc": {}}, "mcc")
    assert payload["lora_throughput_ratio"] == 0.96 and payload["throughput_commit"] == "old"
    assert payload["throughput_targets_met"] == {"lora_throughput_ratio": True}
    assert payload["mcc_commit"] == "abc" and "not_measured" not in payload
    bench.common.write_result("foundation", payload)
    again = fb.merged("foundation", {"lora_throughput_ratio": 0.99, "modes": {}}, "throughput")
    assert again["mm_dino_pretrained_minus_supervised_scratch"] == 0.1
    assert again["lora_throughput_ratio"] == 0.99 and again["throughput_commit"] == "abc"


def test_public_pretraining_is_reused_only_when_made_the_same_way(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "ENCODER", TINY)
    encoders = tmp_path / "encoders"
    encoders.mkdir()
    runs = []

    def pretrain():                 # stands in for the hours of central pretraining
        runs.append(1)
        shutil.rmtree(encoders / fm.PRETRAINED_NAME, ignore_errors=True)
        fm.save_initial_encoder(encoders, seed=len(runs))
        (encoders / fm.INIT_NAME).rename(encoders / fm.PRETRAINED_NAME)
        return {"loss_per_epoch": [1.0]}

    wanted = {"public_epochs": 1, "encoder": TINY}
    first = fm.public_pretraining(tmp_path, encoders, wanted, pretrain)
    again = fm.public_pretraining(tmp_path, encoders, wanted, pretrain)
    assert len(runs) == 1 and again["reused"] and again["sha256"] == first["sha256"]
    other = fm.public_pretraining(tmp_path, encoders, wanted | {"public_epochs": 2}, pretrain)
    assert len(runs) == 2 and other["sha256"] != first["sha256"]
    # weights changed behind the record's back: made again, not trusted
    weights = encoders / fm.PRETRAINED_NAME / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    fm.public_pretraining(tmp_path, encoders, wanted | {"public_epochs": 2}, pretrain)
    assert len(runs) == 3


def test_resume_keeps_finished_arms_of_the_same_settings_and_encoder_only():
    settings = {"draws": (0, 1), "patients_per_site": 600, "rounds": 20}
    old = {"settings": {"draws": [0], "patients_per_site": 600, "rounds": 20},
           "public_pretraining": {"sha256": "ab" * 32},
           "draws": {"0": _draw(supervised_scratch=0.3), "7": _draw(lora=0.1)}}
    kept = fm.previous_draws(old, settings, "ab" * 32)
    assert list(kept[0]["arms"]) == ["supervised_scratch"]
    assert list(kept[7]["arms"]) == ["lora"]      # not asked for this time: kept, not dropped
    assert fm.previous_draws({}, settings, "ab" * 32) == {}
    with pytest.raises(ValueError, match="rounds"):
        fm.previous_draws(old, settings | {"rounds": 8}, "ab" * 32)
    with pytest.raises(ValueError, match="rounds"):      # asked before pretraining
        fm.check_settings(old, settings | {"rounds": 8})
    with pytest.raises(ValueError, match="another pretrained encoder"):
        fm.previous_draws(old, settings, "cd" * 32)


def _tiny_draw_inputs(tmp_path, monkeypatch) -> tuple[dict, dict[str, set[str]]]:
    """A draw's settings, a tiny "pretrained" encoder under ``tmp_path/encoders`` and the
    public cohort's keys: what ``run_draw`` takes, at test size."""
    settings = {"patients_per_site": 6, "rounds": 1, "local_epochs": 1, "label_fraction": 0.5,
                "lora_rank": 2, "pretrain_rounds": 1, "pretrain_epochs": 1, "dp_epsilon": 8.0,
                "channel_tokens": "fused"}
    monkeypatch.setattr(fm, "ENCODER", TINY)
    fm.save_initial_encoder(tmp_path / "encoders")
    (tmp_path / "encoders" / fm.INIT_NAME).rename(tmp_path / "encoders" / fm.PRETRAINED_NAME)
    return settings, fm.cohort_keys(fm.public_cohort(tmp_path / "public", patients=4))


def test_a_resumed_draw_runs_only_the_arms_it_lacks(tmp_path, monkeypatch):
    import bench.model_quality as mq

    ran = []
    monkeypatch.setattr(mq, "federated", lambda cfg, *a, **k: ran.append(cfg.model.name)
                        or {"external_mcc": 0.2})
    monkeypatch.setattr(mq, "centralized", lambda *a, **k: {"external_mcc": 0.3})
    settings, public = _tiny_draw_inputs(tmp_path, monkeypatch)
    done = _draw(supervised_scratch=0.1)
    out = fm.run_draw(0, tmp_path, tmp_path / "encoders", settings,
                      ("supervised_scratch", "lora"), public, done=done)
    assert out["arms"]["supervised_scratch"] == done["arms"]["supervised_scratch"]
    assert ran == ["foundation"] and out["arms"]["lora"]["external_mcc"] == 0.2
    assert "model.options.channel_tokens=fused" in out["arms"]["lora"]["overrides"]


def _mcc_payload(draws: dict) -> dict:
    """A foundation.json MCC half as ``run_mcc`` writes it, from ``draws``."""
    summary = fm.summarize(draws)
    top = {k: summary[k] for k in ("mm_dino_pretrained_minus_supervised_scratch",
                                   "federated_over_pooled", "dp_lora_over_lora_eps8")}
    settings = dict(draws=list(draws), sites=3, patients_per_site=40, label_fraction=0.25,
                    pretrain_rounds=2, rounds=3)
    return top | {"mcc": {"summary": summary, "targets_met": fm.targets_met(summary),
                          "settings": settings, "encoder": TINY,
                          "public_pretraining": {"studies": 50}, "complete": False}}


def test_the_row_says_not_measured_for_an_arm_without_a_result_and_undefined_for_a_zero():
    """An arm that never ran is "not measured", not a ratio whose denominator was <= 0; a
    measured non-positive denominator still says so."""
    unrun = fb._mcc_cells(_mcc_payload({0: _draw(supervised_scratch=0.2, lora=0.4,
                                                 mm_dino=0.3)}))[0]
    assert "federated LoRA / pooled: not measured (no pooled external MCC result" in unrun
    assert "LoRA site-test MCC: not measured (no dp_lora site-test MCC result" in unrun
    assert "denominator" not in unrun and "-×" not in unrun
    assert "**+0.100** (goal ≥ +0.05: met)" in unrun
    zero = fb._mcc_cells(_mcc_payload({0: _draw(supervised_scratch=0.2, lora=0.4, mm_dino=0.3,
                                                pooled=0.0, dp_lora=0.1)}))[0]
    assert "pooled: **-×** (goal ≥ 0.9: undefined, denominator MCC ≤ 0)" in zero
    assert "LoRA site-test MCC: **0.25×** (goal ≥ 0.97: not met)" in zero
    gap = fb._mcc_cells(_mcc_payload({0: _draw(lora=0.4, mm_dino=0.3, pooled=0.5)}))[0]
    assert "scratch external MCC: not measured (no supervised_scratch external MCC" in gap


def test_a_named_run_writes_its_own_row_and_source():
    """--name foundation_fused replaced the default run's RESULTS.md row (same key)."""
    payload = _mcc_payload({0: _draw(supervised_scratch=0.2, lora=0.4, mm_dino=0.3)})
    default, fused = fb._row(payload), fb._row(payload, "foundation_fused")
    assert default.startswith("| foundation |") and "`results/foundation.json`" in default
    assert fused.startswith("| foundation_fused |")
    assert fused.endswith("| `results/foundation_fused.json` |")


def test_the_row_says_how_the_public_encoder_was_made():
    payload = _mcc_payload({0: _draw(supervised_scratch=0.2, lora=0.4, mm_dino=0.3)})
    assert "pretrained label-free (MM-DINOv2) on a disjoint" in fb._row(payload)  # older record
    payload["mcc"]["public_pretraining"] |= {"objective": "clip (image-report InfoNCE ...)",
                                             "patch_embedding": "channels"}
    row = fb._row(payload)
    assert "pretrained with image-report CLIP (no class label), 4 input channels" in row
    assert "MM-DINOv2)" not in row


def _features(model, seed=3):
    torch.manual_seed(seed)
    images, present = torch.randn(2, 4, 32, 32), torch.ones(2, 4, dtype=torch.bool)
    model.eval()
    with torch.no_grad():
        return model.pool(model.forward_features(images, present), present)


def test_a_shared_patch_embedding_is_saved_without_loss_a_per_sequence_one_is_not(
        tmp_path, monkeypatch):
    from models.foundation.export import save_encoder

    monkeypatch.setattr(fm, "ENCODER", TINY)
    fm.save_initial_encoder(tmp_path)
    options = dict(weights=fm.INIT_NAME, method="full", image_size=32, num_classes=3)
    results = {}
    for patch in ("shared", "per_sequence"):
        torch.manual_seed(0)
        model, _ = build("foundation", options, "classification", {}, foundation_dir=tmp_path)
        if patch == "shared":
            fm.share_patch_embedding(model)
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            assert sum(n.startswith("patch_embed.") for n in trainable) == 2   # one W, one b
            assert not any(n.startswith("channel_embed.") for n in trainable)
        torch.manual_seed(1)
        with torch.no_grad():       # what pretraining would have learned (slot 0 only)
            model.patch_embed[0].weight.add_(torch.randn_like(model.patch_embed[0].weight))
            model.patch_embed[0].bias.add_(torch.randn_like(model.patch_embed[0].bias))
            if patch == "per_sequence":
                model.channel_embed.embed.weight.add_(0.5)
        learned = _features(model)
        lost = fm.write_back_patch_kernel(model)
        save_encoder(model, tmp_path / patch)
        loaded, _ = build("foundation", options | {"weights": patch}, "classification", {},
                          foundation_dir=tmp_path)
        loaded.load_state_dict({k: v for k, v in model.state_dict().items()
                                if not k.startswith(("patch_embed", "channel_embed"))},
                               strict=False)       # same head; the rest comes from the dir
        results[patch] = (lost, torch.allclose(_features(loaded), learned, atol=1e-5))
    lost, same = results["shared"]
    assert lost == {"kernel_lost_relative": 0.0, "bias_lost": 0.0, "channel_embedding_norm": 0.0}
    assert same                 # the reloaded encoder computes what was learned
    lost, same = results["per_sequence"]
    assert lost["kernel_lost_relative"] > 0.1 and lost["channel_embedding_norm"] > 0.1
    assert not same             # the directory could not hold it


def test_shared_public_pretraining_trains_one_kernel_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fm, "ENCODER", TINY)
    public = fm.public_cohort(tmp_path / "public", patients=4)
    record = fm.pretrain_public(public, tmp_path / "encoders", epochs=1, batch_size=4, lr=1e-3,
                                image_size=32, patch="shared")
    assert record["patch_embedding"] == "shared"
    assert record["not_saved"] == {"kernel_lost_relative": 0.0, "bias_lost": 0.0,
                                   "channel_embedding_norm": 0.0}
    init = json.loads((tmp_path / "encoders" / fm.INIT_NAME / "config.json").read_text())
    assert init["num_channels"] == 3       # a plain RGB directory, as dinov2-small is
    with pytest.raises(ValueError, match="patch must be one of"):
        fm.pretrain_public(public, tmp_path / "encoders", epochs=1, batch_size=4, lr=1e-3,
                           image_size=32, patch="mean")


def test_a_four_channel_encoder_is_saved_exactly_and_read_back_slice_by_slice(tmp_path,
                                                                              monkeypatch):
    """``patch=channels``: what the fused patch embedding learned goes into the 4-channel
    encoder's own kernel, and ``patch_init=channels`` gives the same model back (without the
    write-back the reloaded model computes something else)."""
    from models.foundation.export import save_encoder

    monkeypatch.setattr(fm, "ENCODER", TINY)
    fm.save_initial_encoder(tmp_path, num_channels=4)
    options = dict(weights=fm.INIT_NAME, method="full", image_size=32, num_classes=3,
                   channel_tokens="fused", patch_init="channels")
    torch.manual_seed(0)
    model, _ = build("foundation", options, "classification", {}, foundation_dir=tmp_path)
    with torch.no_grad():       # what pretraining would have learned
        model.patch_embed.weight.add_(torch.randn_like(model.patch_embed.weight))
        model.patch_embed.bias.add_(torch.randn_like(model.patch_embed.bias))
    learned = _features(model)
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("patch_embed")}
    save_encoder(model, tmp_path / "unwritten")
    assert fm.write_back_fused_kernel(model) == {"kernel_lost_relative": 0.0, "bias_lost": 0.0,
                                                 "channel_embedding_norm": 0.0}
    save_encoder(model, tmp_path / "written")
    same = {}
    for name in ("unwritten", "written"):
        loaded, _ = build("foundation", options | {"weights": name}, "classification", {},
                          foundation_dir=tmp_path)
        loaded.load_state_dict(rest, strict=False)      # same head; the rest from the dir
        same[name] = torch.allclose(_features(loaded), learned, atol=1e-5)
    assert same == {"unwritten": False, "written": True}


def test_clip_public_pretraining_saves_a_four_channel_encoder_and_records_it(tmp_path,
                                                                            monkeypatch):
    monkeypatch.setattr(fm, "ENCODER", TINY)
    public = fm.public_cohort(tmp_path / "public", patients=4)
    record = fm.pretrain_public(public, tmp_path / "encoders", epochs=1, batch_size=4, lr=None,
                                image_size=32, patch="channels", objective="clip")
    assert record["objective"].startswith("clip") and record["lr"] == 3e-4    # conf's rate
    assert record["not_saved"] == {"kernel_lost_relative": 0.0, "bias_lost": 0.0,
                                   "channel_embedding_norm": 0.0}
    saved = json.loads((tmp_path / "encoders" / fm.PRETRAINED_NAME / "config.json").read_text())
    assert saved["model_type"] == "dinov2" and saved["num_channels"] == 4
    assert not any(p.name.startswith("vocab") or "tokenizer" in p.name
                   for p in (tmp_path / "encoders" / fm.PRETRAINED_NAME).iterdir())
    with pytest.raises(ValueError, match="objective must be one of"):
        fm.pretrain_public(public, tmp_path / "encoders", epochs=1, batch_size=4, lr=1e-3,
                           image_size=32, objective="mae")


def test_the_arms_keep_the_kernel_slices_of_a_four_channel_public_encoder(tmp_path,
                                                                          monkeypatch):
    import bench.model_quality as mq

    ran = []
    monkeypatch.setattr(mq, "federated", lambda cfg, *a, **k: ran.append(cfg) or
                        {"external_mcc": 0.0})
    settings, public = _tiny_draw_inputs(tmp_path, monkeypatch)
    fm.run_draw(0, tmp_path, tmp_path / "encoders", settings, ("lora",), public)
    assert ran[-1].model.options.get("patch_init", "mean") == "mean"     # an RGB encoder
    # --public-patch channels pretrains a four-channel encoder (config load now builds the
    # arm's model as the sites would, and refuses channels against an RGB one)
    channels = tmp_path / "encoders-4"
    fm.save_initial_encoder(channels, num_channels=4)
    (channels / fm.INIT_NAME).rename(channels / fm.PRETRAINED_NAME)
    fm.run_draw(0, tmp_path, channels, settings | {"public_patch": "channels"},
                ("lora",), public)
    assert ran[-1].model.options["patch_init"] == "channels"

def test_arms_measured_before_channel_tokens_existed_resume_as_per_channel_only():
    old = {"settings": {"patients_per_site": 600, "public_patch": "shared"}}    # session 19
    fm.check_settings(old, {"patients_per_site": 600, "public_patch": "shared",
                            "channel_tokens": "per_channel"})
    with pytest.raises(ValueError, match="channel_tokens"):
        fm.check_settings(old, {"patients_per_site": 600, "public_patch": "shared",
                                "channel_tokens": "fused"})


def test_resume_refuses_arms_of_an_encoder_made_another_way():
    old = {"settings": {"patients_per_site": 600, "public_epochs": 10}}   # sessions 17-18
    with pytest.raises(ValueError, match="public_patch"):
        fm.check_settings(old, {"patients_per_site": 600, "public_epochs": 10,
                                "public_patch": "shared"})


def test_the_public_feature_mean_centres_the_public_cohorts_features(tmp_path, monkeypatch):
    """save_public_feature_mean: the mean of the adapted model's pooled features over the
    PUBLIC cohort's studies, beside the encoder; a model built with centre_features then pools
    that cohort to a mean of zero (and another cohort, a site's, to something else)."""
    from torch.utils.data import DataLoader

    from client.data.dataset import StudyDataset
    from client.data.site import load_site

    monkeypatch.setattr(fm, "ENCODER", TINY)
    fm.save_initial_encoder(tmp_path / "encoders")
    public_dir = fm.public_cohort(tmp_path / "public", patients=4)
    record = fm.save_public_feature_mean(public_dir, tmp_path / "encoders", name=fm.INIT_NAME,
                                         channel_tokens="fused", image_size=32)
    assert (tmp_path / "encoders" / fm.INIT_NAME / record["file"]).is_file()
    assert record["studies"] == len(load_site(public_dir).studies) and record["mean_norm"] > 0
    synthesize(tmp_path / "draw", n_sites=1, seed=0, external=False,
               scenario=Scenario(patients=4, label_fraction=1.0))
    options = dict(weights=fm.INIT_NAME, method="linear_probe", image_size=32, num_classes=3,
                   channel_tokens="fused", centre_features=True)
    model, _ = build("foundation", options, "classification", {},
                     foundation_dir=tmp_path / "encoders")

    def pooled_mean(site_dir):
        data = StudyDataset(load_site(site_dir).studies, 32)
        with torch.no_grad():
            return torch.cat([model.pool(model.forward_features(b["image"], b["present"]),
                                         b["present"]) for b in DataLoader(data, 8)]).mean(0)

    assert pooled_mean(public_dir).abs().max() < 1e-4
    assert pooled_mean(tmp_path / "draw" / "site-0").abs().max() > 1e-3
    # and the spread around it (scale_features): the public cohort comes out standardised
    assert (tmp_path / "encoders" / fm.INIT_NAME / record["scale_file"]).is_file()
    low, _, high = record["scale_min_median_max"]
    assert 0 < low < high and record["scale_floored_dimensions"] == 0
    scaled, _ = fm.public_features(public_dir, tmp_path / "encoders", name=fm.INIT_NAME,
                                   channel_tokens="fused", image_size=32,
                                   centre_features=True, scale_features=True)
    torch.testing.assert_close(scaled.double().pow(2).mean(0).sqrt(),
                               torch.ones(scaled.shape[1], dtype=torch.float64),
                               rtol=0, atol=1e-3)


def test_the_public_projection_keeps_the_public_cohorts_largest_variance(tmp_path,
                                                                        monkeypatch):
    """save_public_feature_projection: the top principal directions of the PUBLIC cohort's
    centred pooled features, beside the encoder; a model built with project_features=k then
    pools that cohort to k uncorrelated features in decreasing variance, holding the share
    the record says, and no projection of fewer directions keeps more."""
    from models.foundation.loading import FEATURE_PROJECTION_FILE

    monkeypatch.setattr(fm, "ENCODER", TINY)
    fm.save_initial_encoder(tmp_path / "encoders")
    public_dir = fm.public_cohort(tmp_path / "public", patients=6)
    common = dict(name=fm.INIT_NAME, channel_tokens="fused", image_size=32)
    fm.save_public_feature_mean(public_dir, tmp_path / "encoders", **common)
    record = fm.save_public_feature_projection(public_dir, tmp_path / "encoders", directions=4,
                                               **common)
    assert record["file"] == FEATURE_PROJECTION_FILE and len(record["variance_share"]) == 4
    centred, _ = fm.public_features(public_dir, tmp_path / "encoders", centre_features=True,
                                    **common)
    options = dict(weights=fm.INIT_NAME, method="linear_probe", image_size=32, num_classes=3,
                   channel_tokens="fused", centre_features=True, project_features=4)
    model, _ = build("foundation", options, "classification", {},
                     foundation_dir=tmp_path / "encoders")
    directions = model.feature_projection.detach().double()
    projected = centred.double() @ directions.T                               # [N, 4]
    variance = (projected**2).sum(0)
    total = (centred.double()**2).sum()
    assert torch.all(variance[:-1] >= variance[1:])
    off_diagonal = projected.T @ projected - torch.diag(variance)
    assert off_diagonal.abs().max() < 1e-3 * variance[0]
    torch.testing.assert_close(variance / total, torch.tensor(record["variance_share"],
                                                              dtype=torch.float64),
                               rtol=1e-3, atol=1e-4)
    g = torch.Generator().manual_seed(0)         # random orthonormal 4-frames keep less
    for _ in range(5):
        q, _ = torch.linalg.qr(torch.randn(centred.shape[1], 4, generator=g,
                                           dtype=torch.float64))
        assert ((centred.double() @ q)**2).sum() <= variance.sum() + 1e-6


def test_a_variant_arm_runs_its_arms_overrides_plus_its_own(tmp_path, monkeypatch):
    import bench.model_quality as mq

    ran = []
    monkeypatch.setattr(mq, "federated", lambda cfg, *a, **k: ran.append(cfg) or
                        {"external_mcc": 0.2})
    settings, public = _tiny_draw_inputs(tmp_path, monkeypatch)
    out = fm.run_draw(0, tmp_path, tmp_path / "encoders", settings, ("dp_head",), public,
                      variants={"dp_head": ("dp_lora", ["model.options.method=linear_probe"])})
    overrides = out["arms"]["dp_head"]["overrides"]
    assert "privacy=dpsgd" in overrides and overrides[-1] == "model.options.method=linear_probe"
    assert ran[0].model.options["method"] == "linear_probe"


def test_each_dp_variant_spends_from_a_ledger_of_its_own(tmp_path, monkeypatch):
    """Two DP arms of one draw: the second must not find the first's spending in its ledger
    (it would be refused as over budget)."""
    import bench.model_quality as mq

    monkeypatch.setattr(mq, "federated", lambda cfg, *a, **k: {"external_mcc": 0.0})
    settings, public = _tiny_draw_inputs(tmp_path, monkeypatch)
    out = fm.run_draw(0, tmp_path, tmp_path / "encoders", settings, ("dp_lora", "dp_head"),
                      public, variants={"dp_head": ("dp_lora", ["train.lr=0.01"])})
    ledgers = [[o for o in out["arms"][a]["overrides"] if "privacy-dir" in o]
               for a in ("dp_lora", "dp_head")]
    assert all(len(ledger) == 1 for ledger in ledgers) and ledgers[0] != ledgers[1]


def test_the_dp_recipe_setting_gives_the_dp_arm_the_recipe_and_no_other_arm(tmp_path,
                                                                            monkeypatch):
    import bench.model_quality as mq

    seen = {}
    monkeypatch.setattr(mq, "federated", lambda cfg, *a, **k: {"external_mcc": 0.2})
    settings, public = _tiny_draw_inputs(tmp_path, monkeypatch)
    # the recipe's public mean and spread beside the encoder (the config load checks them)
    fm.save_public_feature_mean(tmp_path / "public" / "site-0", tmp_path / "encoders",
                                channel_tokens="fused")
    for recipe in (False, True):
        out = fm.run_draw(0, tmp_path, tmp_path / "encoders", settings | {"dp_recipe": recipe, "rounds": 6},
                          ("lora", "dp_lora"), public)
        seen[recipe] = {a: v["overrides"] for a, v in out["arms"].items()}
    assert not set(fm.DP_RECIPE) & set(seen[False]["dp_lora"])
    assert seen[True]["dp_lora"][-len(fm.DP_RECIPE):] == fm.DP_RECIPE
    assert seen[True]["lora"] == seen[False]["lora"]


def test_the_pooled_dp_figure_counts_only_for_the_same_recipe_and_encoder(tmp_path,
                                                                          monkeypatch):
    from bench import dp_centre

    monkeypatch.setattr(fb, "RESULTS_DIR", tmp_path)
    over = {"site_test_mcc": {"ratio": 0.95, "ratio_se": 0.02, "paired_difference": -0.03},
            "external_mcc": {"ratio": 0.94}}
    pooled = {"encoder_sha256": "ab" * 32, "dp_arm": "dp_lora_std_hlr_lp5", "commit": "c",
              "dp_lora_over_lora_eps8": 0.95, "over": {"lora": over},
              "arms": {"dp_lora_std_hlr_lp5": {"site_test_mcc": {"per_seed": [0.5] * 16}}}}
    (tmp_path / "seeds.json").write_text(json.dumps(pooled))
    settings = dict(dp_centre.SETTINGS, dp_recipe=True, draws=(0, 1))
    got = fb.pooled_dp_seeds("seeds", settings, {"sha256": "ab" * 32})
    assert got["dp_lora_over_lora_eps8"] == 0.95 and got["seeds"] == 16
    assert got["site_test_ratio_se"] == 0.02 and got["external_ratio"] == 0.94
    assert fb.pooled_dp_seeds("seeds", settings, {"sha256": "cd" * 32}) is None
    assert fb.pooled_dp_seeds("seeds", settings | {"dp_recipe": False},
                              {"sha256": "ab" * 32}) is None
    assert fb.pooled_dp_seeds("seeds", settings | {"rounds": 8}, {"sha256": "ab" * 32}) is None
    (tmp_path / "seeds.json").write_text(json.dumps(pooled | {"dp_arm": "dp_lora_std"}))
    assert fb.pooled_dp_seeds("seeds", settings, {"sha256": "ab" * 32}) is None
    assert fb.pooled_dp_seeds("missing", settings, {"sha256": "ab" * 32}) is None


def test_the_row_says_a_pooled_dp_figure_is_a_mean_of_seeds_and_gives_the_draws_own():
    payload = _mcc_payload({0: _draw(supervised_scratch=0.2, lora=0.4, mm_dino=0.3,
                                     dp_lora=0.45)})
    mcc = payload["mcc"]
    mcc["settings"]["dp_recipe"] = True
    assert "(DP recipe): **1.12×**" in fb._mcc_cells(payload)[0]
    mcc["summary"]["dp_lora_over_lora_eps8_two_draws"] = 1.125
    mcc["dp_seeds"] = {"seeds": 16, "site_test_ratio_se": 0.0246}
    payload["dp_lora_over_lora_eps8"] = 0.9501
    cells = fb._mcc_cells(payload)[0]
    assert ("(DP recipe), mean of 16 seeds ± 0.025 (bench.dp_seeds; this run's 2 draws alone "
            "1.12×): **0.950×**") in cells


def test_the_pooled_federated_figure_counts_only_for_its_recipe_encoder_and_settings(
        tmp_path, monkeypatch):
    from bench import dp_centre, dp_seeds

    monkeypatch.setattr(fb, "RESULTS_DIR", tmp_path)
    over = {"ratio": 0.93, "ratio_se": 0.03, "seeds": [16, 16], "paired_difference": -0.04}
    pooled = {"encoder_sha256": "ab" * 32, "commit": "c", "over_pooled": {"lora": over}}
    (tmp_path / "fed.json").write_text(json.dumps(pooled))
    settings = dict(dp_centre.SETTINGS, dp_recipe=True, draws=(0, 1))
    got = fb.pooled_fed_seeds("fed", settings, {"sha256": "ab" * 32})
    assert got["federated_over_pooled"] == 0.93 and got["seeds"] == [16, 16]
    assert got["arm"] == fm.FEDERATED == "lora" and got["ratio_se"] == 0.03
    assert set(fb.TWO_DRAWS) == set(dp_seeds.FED_PAIRS)        # each recipe's own figure
    assert fb.pooled_fed_seeds("fed", settings, {"sha256": "cd" * 32}) is None
    assert fb.pooled_fed_seeds("fed", settings | {"rounds": 8}, {"sha256": "ab" * 32}) is None
    monkeypatch.setattr(fm, "FEDERATED", "lora_ffa")        # a recipe the file did not pool
    assert fb.pooled_fed_seeds("fed", settings, {"sha256": "ab" * 32}) is None
    assert fb.pooled_fed_seeds("missing", settings, {"sha256": "ab" * 32}) is None


def test_the_row_says_a_pooled_federated_figure_is_over_seeds_and_gives_the_draws_own():
    payload = _mcc_payload({0: _draw(lora=0.4, pooled=0.5)})
    mcc = payload["mcc"]
    assert "federated LoRA / pooled: **0.80×**" in fb._mcc_cells(payload)[0]
    mcc["summary"]["federated_over_pooled_two_draws"] = 0.8
    mcc["fed_seeds"] = {"arm": "lora_ffa", "seeds": [16, 15], "ratio_se": 0.0312}
    payload["federated_over_pooled"] = 0.9412
    cells = fb._mcc_cells(payload)[0]
    assert ("federated LoRA / pooled (lora_ffa over 16 seeds, its pooled arm over 15, ± 0.031; "
            "bench.dp_seeds --federated; this run's 2 draws alone 0.80×): "
            "**0.941×**") in cells
