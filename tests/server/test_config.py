import pytest

from server.config import ConfigError, experiment_names, load_experiment


@pytest.mark.parametrize("name", experiment_names())
def test_every_experiment_composes(name):
    cfg = load_experiment([f"experiment={name}"])
    assert cfg.name == name
    assert cfg.model_options()["num_classes"] == len(cfg.task.class_names)


def test_demo_is_the_default():
    assert load_experiment().name == "demo"


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=0.1"], "train.lrr"),
    (["model=nope"], "model/nope"),
    (["experiment=nope"], "experiment/nope"),
    (["+model.options.depht=3"], "depht"),
    (["strategy.name=bulyan"], "unknown strategy 'bulyan'"),
    (["strategy=fedprox", "strategy.options.proximal_mu=-0.1"], "proximal_mu must be >= 0"),
    (["+strategy.options.momentum=0.9"], "unknown option"),
    (["strategy.max_update_norm=-1"], "max_update_norm"),
    (["strategy.max_norm_ratio=0.5"], "max_norm_ratio"),
    (["strategy.min_train_sites=7"], "min_train_sites"),
    (["resume=/nonexistent/run"], "no checkpoints"),
    (["strategy=fedbn", "strategy.local_params=[bn_*]"], "match no model parameter"),
    (["strategy.local_params=[*]"], "nothing is shared"),
    (["strategy.min_available_sites=5"], "min_available_sites"),
    (["train.lr=fast"], "train.lr"),
])
def test_bad_config_is_one_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(overrides)


def test_fingerprint_tracks_the_config():
    assert load_experiment().fingerprint() == load_experiment().fingerprint()
    assert load_experiment().fingerprint() != load_experiment(["train.lr=0.01"]).fingerprint()
    assert load_experiment().fingerprint() != \
        load_experiment(["task.options.label_fraction=0.5"]).fingerprint()


def test_fingerprint_leaves_out_settings_at_their_defaults():
    """A run resumes after a release that adds a setting with a default, or spells a default
    out in a YAML: neither changes what the run computes, so neither changes its hash."""
    from dataclasses import MISSING, asdict, fields, make_dataclass, replace

    from models import MODELS

    cfg = load_experiment()
    assert cfg.task.options                      # glioma3.yaml spells every option out
    assert cfg.fingerprint() == replace(cfg, task=replace(cfg.task, options={})).fingerprint()
    unset = next(f for f in fields(MODELS.config_class(cfg.model.name))
                 if f.name not in cfg.model.options and f.default is not MISSING)
    spelled = replace(cfg, model=replace(cfg.model, options={**cfg.model.options,
                                                             unset.name: unset.default}))
    assert spelled.fingerprint() == cfg.fingerprint()
    later = make_dataclass("LaterTrainSettings", [("a_later_setting", int, 0)],
                           bases=(type(cfg.train),), frozen=True)
    assert replace(cfg, train=later(**asdict(cfg.train))).fingerprint() == cfg.fingerprint()
    assert replace(cfg, train=later(**asdict(cfg.train), a_later_setting=1)).fingerprint() \
        != cfg.fingerprint()


@pytest.mark.parametrize("override, ok", [
    ("federation.gpus_per_site=0.5", True), ("federation.gpus_per_site=2", True),
    ("federation.gpus_per_site=1.5", False), ("federation.gpus_per_site=-0.5", False), ("federation.gpus_per_site=-1", False),
    ("federation.gpus_per_site=nan", False), ("federation.cpus_per_site=0", False)])
def test_simulated_sites_resources_are_ray_shares(override, ok):
    if ok:
        assert load_experiment([override]).federation.gpus_per_site == float(
            override.split("=")[1])
    else:
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            load_experiment([override])


@pytest.mark.parametrize("overrides, message", [
    (["model.options.num_sequences=0"], "num_sequences"),
    (["task.image_size=60"], "not divisible by patch_size"),
    (["pretrain=mae", "pretrain.num_rounds=0"], "num_rounds >= 1"),
    (["pretrain.objective=classification", "pretrain.num_rounds=1"], "not a pretraining"),
    (["pretrain.objective=simclr", "pretrain.num_rounds=1"], "unknown task 'simclr'"),
    (["pretrain=mae", "pretrain.registered_model=medfed-classifier"], "must differ"),
    (["task.options.mode=adapters"], "unknown fine-tuning mode"),
    (["task.options.label_fraction=0"], "label_fraction"),
    (["pretrain=mm_dino", "privacy=dpsgd"], "pretraining phase: privacy.mechanism=dp-sgd refused"),
    (["pretrain=clip", "+pretrain.options.tokenizer_dir=/nonexistent/tokenizer"],
     "never reads a path"),
    (["pretrain=clip", "+pretrain.options.vocab_size=30522"], "vocab"),
    (["data/layout=mammography", "task.class_names=[a,b]", "pretrain=clip",
      "pretrain.num_rounds=1"], "pretraining phase: task=clip learns from radiology reports "
     "but data/layout=mammography declares none"),
])
def test_bad_foundation_model_settings_fail_before_training(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment(overrides)


def test_report_objectives_load_on_a_layout_with_reports_and_without_one_when_unused():
    chest = load_experiment(["data/layout=chest_xray", "task=chest3", "pretrain=clip",
                             "pretrain.num_rounds=1"])
    assert chest.pretrain_phase().task.name == "clip"
    load_experiment(["data/layout=mammography", "task.class_names=[a,b]",
                     "pretrain=mae", "pretrain.num_rounds=1"])     # MAE reads no reports
    load_experiment(["pretrain=clip", "pretrain.num_rounds=1"])  # brain_mri_4seq: as before


def test_dp_sgd_loads_for_lesion_segmentation():
    # its loss is a mean of per-sample terms and the UNETR decoder's layers have exact
    # per-sample rules (tests/models/test_objectives.py checks them against the batch gradient)
    assert load_experiment(["task=lesion_seg", "privacy=dpsgd"]).privacy.mechanism == "dp-sgd"


def test_chest_reports_fit_the_radiology_vocabulary_and_not_the_default():
    from client.data.report_deid import deidentify_report
    from medfed.synth.chest import generate_chest_site, make_chest_profiles
    reports = [deidentify_report(study.report)[0] for profile in make_chest_profiles(3, 0)
               for study in generate_chest_site(profile, 0).studies]
    from models.clip import CLIPConfig
    from models.text import load_tokenizer, shipped_tokenizer, tokenize
    cfg = load_experiment(["data/layout=chest_xray", "task=chest3", "pretrain=clip_chest"])
    assert cfg.pretrain_phase().task.name == "clip"
    chest = CLIPConfig(num_classes=3, **cfg.pretrain.options)
    cut = {}
    for name, config in (("default", CLIPConfig(num_classes=3)), ("radiology", chest)):
        tokenizer = load_tokenizer(shipped_tokenizer(config.tokenizer_dir))
        out = tokenize(tokenizer, reports, config.max_length)
        real = out["attention_mask"].bool()
        assert (out["input_ids"][real] == tokenizer.token_to_id("[UNK]")).sum() == 0
        cut[name] = out["truncated"].float().mean().item()
    assert cut["radiology"] == 0.0
    assert cut["default"] > 0.2          # what pretrain=clip_chest is for (27.6% at seed 0)


def test_the_heads_rate_and_per_group_clipping_are_fine_tuning_settings():
    """An objective's model has no class head to treat apart: sites refuse train.head_lr /
    privacy.head_clip_share for it. A two-phase run keeps them for fine-tuning only (phase 1
    went out with them, and every site refused it); a run of the objective alone is refused
    by the checks at config load, before any site is asked."""
    two = load_experiment(["pretrain=mae", "privacy=dpsgd", "train.head_lr=0.01",
                           "privacy.head_clip_share=0.8", "train.head_only_rounds=1"])
    assert (two.train.head_lr, two.privacy.head_clip_share) == (0.01, 0.8)
    assert two.train.head_only_rounds == 1
    phase1 = two.pretrain_phase()
    assert (phase1.train.head_lr, phase1.privacy.head_clip_share) == (None, None)
    assert phase1.train.head_only_rounds == 0
    assert phase1.privacy.mechanism == two.privacy.mechanism
    from dataclasses import replace

    from server.config.validation import validate

    validate(phase1)
    for alone in (replace(phase1, train=two.train), replace(phase1, privacy=two.privacy),
                  replace(phase1, train=replace(phase1.train, head_only_rounds=1))):
        with pytest.raises(ConfigError, match="the mae objective's model has none"):
            validate(alone)


@pytest.mark.parametrize("setting", ["train.head_lr=0.01", "train.head_only_rounds=1",
                                     "privacy.head_clip_share=0.5"])
def test_head_settings_are_refused_for_a_task_model_without_a_class_head(setting):
    """A segmenter has no class head: every site would refuse the round, so the config does."""
    overrides = ["federation.num_rounds=2", setting] + (["privacy=dpsgd"] if "privacy" in
                                                        setting else [])
    with pytest.raises(ConfigError, match=r"treats a class head apart, and the segmentation "
                                          r"task's UNETR has no class head that trains"):
        load_experiment(["task=lesion_seg", *overrides])
    load_experiment(overrides)      # the classifier's ViT has one


def test_head_lr_rounds_need_a_head_lr_and_are_a_fine_tuning_setting():
    cfg = load_experiment(["train.head_lr=0.01", "train.head_lr_rounds=5"])
    assert (cfg.train.head_lr, cfg.train.head_lr_rounds) == (0.01, 5)
    assert cfg.job_spec().train.head_lr_rounds == 5
    with pytest.raises(ConfigError, match=r"train.head_lr_rounds=5 limits the rounds of the "
                                          r"head's own rate, and train.head_lr is unset"):
        load_experiment(["train.head_lr_rounds=5"])
    two = load_experiment(["pretrain=mae", "train.head_lr=0.01", "train.head_lr_rounds=1"])
    assert two.pretrain_phase().train.head_lr_rounds == 0


def test_head_only_rounds_must_leave_a_round_for_the_rest():
    assert load_experiment(["federation.num_rounds=3",
                            "train.head_only_rounds=2"]).train.head_only_rounds == 2
    with pytest.raises(ConfigError, match=r"train.head_only_rounds=3 covers every one of the 3 "
                                          r"rounds.*model.options.method=linear_probe"):
        load_experiment(["federation.num_rounds=3", "train.head_only_rounds=3"])
    with pytest.raises(ConfigError, match=r"train.head_only_rounds must be >= 0, got -1"):
        load_experiment(["train.head_only_rounds=-1"])
