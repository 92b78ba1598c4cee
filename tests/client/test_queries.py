"""The site's activation estimates (``client.queries``), checked against hand counts and
against what autograd keeps on every shipped task and foundation family."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

from client.queries import forward_activations, step_activations, step_size


class _Attention(nn.Module):
    """Tokens ``[rows, T, C]`` -> ``[rows, T, C]``, holding ``num_heads`` scores a pair."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.num_heads = heads
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return self.proj(x)


class _Segmenter(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 2, stride=2)          # [B, 6, 4, 4] from 8 x 8
        self.attention = _Attention(6, heads=3)

    def forward(self, images, present):
        tokens = self.conv(images).flatten(2).transpose(1, 2)          # [B, 16, 6]
        return self.attention(tokens)


def test_a_meta_forward_counts_every_leaf_output_and_every_attention_score():
    with torch.device("meta"):
        model = _Segmenter()
    b = 5
    leaves = b * 6 * 16 + b * 16 * 6                                  # conv, proj outputs
    scores = b * 3 * 16 * 16                                          # rows x heads x T^2
    assert forward_activations(model, (2, 8, 8), b) == leaves + scores


def test_the_static_estimate_counts_widths_heads_and_strided_convolutions():
    model = _Segmenter()
    tokens, voxels, b = 16, 64, 5
    width, heads = 6 + 6, 3              # proj: its input and output; conv: 6 over 2 x 2
    assert step_activations(model, [(tokens, voxels)], b) == \
        b * (tokens * (width + heads * tokens) + voxels * 6 // 4)


def test_every_familys_attention_heads_are_counted():
    """Attention modules name their head count three ways (ours ``heads``; timm, MONAI,
    DINOv3, CLIP ``num_heads``; DINOv2, ViT, BERT, SAM ``num_attention_heads``): each
    layer's heads count once."""
    import transformers
    from monai.networks.nets import ViT

    from client.queries import _heads
    from models.vit import MultiModalViT, ViTConfig

    size = dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3)
    with torch.device("meta"):
        models = [transformers.Dinov2Model(transformers.Dinov2Config(**size)),
                  transformers.BertModel(transformers.BertConfig(**size)),
                  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**size)),
                  transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(
                      **size, intermediate_size=48)),
                  ViT(in_channels=1, img_size=32, patch_size=8, hidden_size=24, mlp_dim=48,
                      num_layers=2, num_heads=3, spatial_dims=2),
                  MultiModalViT(ViTConfig(dim=24, depth=2, heads=3))]
    for model in models:
        assert sum(_heads(m) for m in model.modules()) == 2 * 3, type(model).__name__


def test_a_model_the_site_cannot_size_is_refused_not_waved_through():
    """Every registered model has a token layout or an input shape; one with neither (a
    future family, a registry mistake) would skip the activation check - refused instead."""
    import pytest

    from client.queries import QueryLimits, QueryRefused

    with pytest.raises(QueryRefused, match="cannot size what a training step of it holds"):
        QueryLimits().check_model_size(lambda: (nn.Linear(4, 4), None))


def test_a_backbone_member_that_fails_is_raised_not_taken_for_a_missing_one(monkeypatch):
    """The site finds the token backbone by its class (``models.backbone.token_backbone``),
    reading no member: a register count that fails when read raises here, where a check
    that read it (``isinstance`` on the runtime protocol) took the error for a missing member
    and sized the ViT as a whole network, without its token caps."""
    from models import MODELS
    from models.vit import MultiModalViT

    def unreadable(self):
        raise AttributeError("the register count cannot be read")
    monkeypatch.setattr(MultiModalViT, "register_tokens", property(unreadable))
    options = {"dim": 32, "depth": 1, "heads": 2, "img_size": 32, "patch_size": 8}
    with pytest.raises(AttributeError, match="register_tokens"):   # nn.Module rewords it
        step_size(lambda: (MODELS.build("mmvit", options), None))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """A small DINOv2 and a small SwinUNETR, saved as a site holds them."""
    from monai.networks.nets import SwinUNETR

    from models.foundation.monai_nets import SWIN_UNETR_TYPE, save_monai
    from tests.client.test_foundation_site import save_dinov2

    root = tmp_path_factory.mktemp("encoders")
    save_dinov2(root / "dino")
    swin = dict(in_channels=1, out_channels=2, feature_size=12, depths=[2, 1, 1, 1],
                num_heads=[1, 1, 2, 2], window_size=4, spatial_dims=2)
    save_monai(SwinUNETR(**swin), swin, root / "swin", model_type=SWIN_UNETR_TYPE)
    return root


_DINO = ("model=foundation", "model.options.weights=dino", "task.image_size=32")
# (experiment overrides, whether the case is the pretraining phase)
SHIPPED = {
    "classification": (["experiment=smoke"], False),
    "demo": (["experiment=demo"], False),
    "ct-3d": (["experiment=ct3"], False),
    "segmentation": (["experiment=smoke", "task=lesion_seg"], False),
    "mm-dino": (["experiment=pretrain_finetune", "pretrain=mm_dino"], True),
    "mae": (["experiment=pretrain_finetune", "pretrain=mae"], True),
    "clip": (["experiment=pretrain_finetune", "pretrain=clip"], True),
    "dinov2-lora": (["experiment=smoke", *_DINO, "model.options.lora_rank=4"], False),
    "dinov2-full": (["experiment=smoke", *_DINO, "model.options.method=full"], False),
    "dinov2-mm-dino": (["experiment=pretrain_finetune", *_DINO, "pretrain=mm_dino"], True),
    "swin-unetr": (["experiment=smoke", "model=foundation_swin", "model.options.weights=swin",
                    "task=lesion_seg", "task.image_size=64"], False),
    "wide-mlp": (["experiment=smoke", "model.options.mlp_ratio=64"], False),
}


@pytest.mark.parametrize("case", list(SHIPPED))
def test_the_activation_estimate_is_at_least_what_autograd_keeps(case, encoders):
    """The site refuses a job by its estimate (``step_size``), so an estimate below what a
    step really keeps would let a job past the operator's cap (set from the GPU's memory)
    with more: on every shipped task and foundation family, and an MLP 64 times wider than
    it is deep, it is at least what autograd saves for backward in one training step (the
    task's own step on a batch of 4; each storage once, beyond the weights) and at most 5x
    it (SDPA keeps no scores, MM-DINOv2's teacher passes nothing)."""
    from models.checkpointing import counting_saved_activations
    from server.config import load_experiment
    from tests.models.test_objectives import _for

    overrides, pretraining = SHIPPED[case]
    if any(o.startswith("model=foundation") for o in overrides):
        overrides = [*overrides, f"model.foundation_dir={encoders}"]
    cfg = load_experiment(overrides)
    spec = (cfg.pretrain_phase() if pretraining else cfg).job_spec("r")
    build, b = partial(spec.build, foundation_dir=encoders), 4
    estimate = step_size(build, batch=b).activations
    torch.manual_seed(0)
    model, task = build()
    channels = len(spec.layout.input_channels) if spec.layout else 4
    shape = getattr(model, "input_shape", None) or \
        (channels, *[spec.image_size] * (len(spec.layout.size) if spec.layout else 2))
    images = torch.randn(b, *shape, generator=torch.Generator().manual_seed(0))
    batch = _for(task, {"image": images, "present": torch.ones(b, shape[0], dtype=torch.bool),
                        "label": torch.arange(b) % 2})
    with counting_saved_activations(model.train()) as saved:
        task.step(model, batch)
    kept = saved["bytes"] / 4                                   # float32 values
    assert kept <= estimate <= 5 * kept, (case, estimate / kept)


def test_the_sites_query_log_and_kept_replies_are_its_own_users_alone(tmp_path, caplog):
    """The state folder the query log creates is 0700 and every file in it 0600: a kept
    reply holds the update the site sent, the log the rounds it served (a simulation's sit
    in the data folder, a deployed site's in its privacy-dir). Under the usual umask (022,
    pinned here) files and folders would be 0644/0755; a folder and a ledger made so before
    this rule are tightened, with a warning."""
    import os
    import stat

    from flwr.app import ArrayRecord, RecordDict

    from client.privacy.ledger import PrivacyLedger
    from client.queries import SiteQueryLog

    old = os.umask(0o022)
    try:
        _state_files_are_private(tmp_path, caplog, stat, ArrayRecord, RecordDict,
                                 PrivacyLedger, SiteQueryLog)
    finally:
        os.umask(old)


def _state_files_are_private(tmp_path, caplog, stat, ArrayRecord, RecordDict, PrivacyLedger,
                             SiteQueryLog):
    log = SiteQueryLog(tmp_path / ".medfed", run_id=3)
    log.store_reply("classification", 1, RecordDict({"arrays": ArrayRecord(
        {"w": torch.zeros(2)})}), admission="a")
    folders = [tmp_path / ".medfed", *[p for p in (tmp_path / ".medfed").rglob("*")
                                       if p.is_dir()]]
    files = [p for p in (tmp_path / ".medfed").rglob("*") if p.is_file()]
    assert len(files) == 2 and len(folders) == 2
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o700}
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    loose = tmp_path / "old-privacy-dir"             # made before the rule: 0755 and 0644
    loose.mkdir(mode=0o755)
    PrivacyLedger(loose / "privacy-ledger.sqlite")
    (loose / "privacy-ledger.sqlite").chmod(0o644)
    loose.chmod(0o755)
    PrivacyLedger(loose / "privacy-ledger.sqlite")
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    assert stat.S_IMODE((loose / "privacy-ledger.sqlite").stat().st_mode) == 0o600
    assert "was readable by others (mode 755): now 700" in caplog.text


def test_the_job_run_ids_of_one_task_in_a_flower_run_count_as_one_run(tmp_path):
    """What the per-run epsilon cap counts together (``authorize``'s ``same_run``): every id
    one task asked for in the Flower run (a coordinator renaming its run each round); a
    pretraining and a fine-tuning phase of the run apart; another Flower run afresh."""
    from client.queries import SiteQueryLog

    log = SiteQueryLog(tmp_path / ".medfed", run_id=3)
    assert log.privacy_runs("classification", "r.finetune") == {"r.finetune"}
    assert log.privacy_runs("mm_dino", "r.pretrain") == {"r.pretrain"}
    assert log.privacy_runs("classification", "r-b") == {"r.finetune", "r-b"}
    again = SiteQueryLog(tmp_path / ".medfed", run_id=3)      # a restarted ClientApp
    assert again.privacy_runs("classification", "r-c") == {"r.finetune", "r-b", "r-c"}
    assert SiteQueryLog(tmp_path / ".medfed", run_id=4).privacy_runs(
        "classification", "r2") == {"r2"}


def test_the_daily_evaluation_budget_survives_a_restart_and_rolls_over_24_hours(tmp_path):
    """``max-evaluations-per-day`` counts every run's evaluate requests in the site's state
    file: a fresh ``SiteQueryLog`` (a restarted ClientApp) of another run sees them. A
    request counts for at least 24 hours, then the window rolls past it (an injected clock:
    no waiting), and the stored history stays within the window."""
    import json

    from client.queries import STATE_FILE, QueryLimits, QueryRefused, SiteQueryLog

    start = 400_000 * 3600.0 + 1800           # half past an hour
    now = [start]
    limits = QueryLimits(max_evaluations=100, max_daily_evaluations=3)

    def admit(run_id, digest, server_round=1):
        SiteQueryLog(tmp_path / ".medfed", run_id, clock=lambda: now[0]).admit_evaluation(
            "classification", server_round, digest, limits)
    admit(1, "a")
    admit(2, "b")
    now[0] = start + 12 * 3600
    admit(3, "c")
    daily = r"at most 3 evaluate requests a day over all runs \(node config " \
            r"'max-evaluations-per-day'\)"
    with pytest.raises(QueryRefused, match=daily):
        admit(4, "d")
    with pytest.raises(QueryRefused, match=daily):   # a repeat counts, as in the per-run cap
        admit(3, "c")
    now[0] = start + 24 * 3600                # the first two are 24 hours old: still counted
    with pytest.raises(QueryRefused, match=daily):
        admit(5, "e")
    now[0] = start + 25 * 3600                # ... and after 25 hours no longer
    admit(5, "e")
    admit(6, "f")
    with pytest.raises(QueryRefused, match=daily):
        admit(7, "g")
    limits = QueryLimits(max_evaluations=100, max_daily_evaluations=1000)
    for hour in range(100):                   # one a hour for 100 hours: 25 buckets kept
        now[0] = start + (26 + hour) * 3600
        admit(8, f"h{hour}", server_round=hour + 1)
    state = json.loads((tmp_path / ".medfed" / STATE_FILE).read_text())
    assert len(state["site"]["evaluations-by-hour"]) == 25


def test_the_total_evaluation_budget_counts_every_day_in_a_bounded_file(tmp_path):
    """``max-evaluations-total`` counts every request the site ever answered: an hour bucket
    leaving the day's window moves into the site's running total, so waiting out the days
    buys a coordinator nothing once the total is spent, while the file keeps 25 buckets and
    one number however long the site runs. A clock set back (hours "after" now) leaves the
    window, never the total."""
    import json

    from client.queries import STATE_FILE, QueryLimits, QueryRefused, SiteQueryLog

    start = 400_000 * 3600.0
    now = [start]
    limits = QueryLimits(max_evaluations=10**6, max_daily_evaluations=10**6,
                         max_total_evaluations=200)

    def admit(run_id, server_round):
        SiteQueryLog(tmp_path, run_id, clock=lambda: now[0]).admit_evaluation(
            "classification", server_round, "w", limits)
    for day in range(10):                     # 19 a day, one an hour, on 10 days: 190
        for hour in range(19):
            now[0] = start + (48 * day + hour) * 3600
            admit(day, hour)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert len(state["site"]["evaluations-by-hour"]) == 19     # the last day's window
    assert state["site"]["evaluations-before"] == 171          # the 9 days before it
    now[0] = start + 1000 * 3600               # 2 days on: an empty window
    for server_round in range(5):
        admit(10, server_round)
    now[0] = start - 100 * 3600                # the clock set back: all of it "after" now
    for server_round in range(5):
        admit(11, server_round)                # 200 in all
    total = r"at most 200 evaluate requests in all, .*'max-evaluations-total'"
    with pytest.raises(QueryRefused, match=total):
        admit(12, 1)
    now[0] = start + 10**6 * 3600              # over a century later: still spent
    with pytest.raises(QueryRefused, match=total):
        admit(13, 1)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert set(state["site"]) == {"evaluations-by-hour", "evaluations-before"}
    assert sum(state["site"]["evaluations-by-hour"].values()) + \
        state["site"]["evaluations-before"] == 200


def test_an_upgraded_file_starts_the_total_from_what_its_kept_runs_counted(tmp_path):
    """A site-queries.json written before the running total existed dropped its day-old hour
    buckets: the total starts from what its kept runs counted beyond the buckets it still
    holds, not from zero - a coordinator cannot wipe a site's history by its upgrade."""
    import json

    from client.queries import SITE_WIDE, STATE_FILE, QueryLimits, QueryRefused, SiteQueryLog

    hour = 400_000
    old = {"7": {"evaluations": 50}, "8": {"evaluations": 30},         # runs of earlier days
           SITE_WIDE: {"evaluations-by-hour": {str(hour): 10}}}        # today's window only
    (tmp_path / STATE_FILE).write_text(json.dumps(old))
    limits = QueryLimits(max_evaluations=10**6, max_daily_evaluations=10**6,
                         max_total_evaluations=90)
    log = SiteQueryLog(tmp_path, 9, clock=lambda: hour * 3600.0 + 60)
    for server_round in range(10):                     # 70 before + 10 + 10 = 90
        log.admit_evaluation("classification", server_round, "w", limits)
    with pytest.raises(QueryRefused, match="at most 90 evaluate requests in all"):
        log.admit_evaluation("classification", 10, "w", limits)
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state[SITE_WIDE]["evaluations-before"] == 70


def test_runs_that_never_evaluate_do_not_prune_an_upgraded_files_count_away(tmp_path):
    """Every write prunes the oldest runs: in an upgraded file the total is taken from the
    kept runs first, so a coordinator starting KEEP_RUNS runs that never ask for an
    evaluation (each site sends its first message) cannot drop their counts before it."""
    import json

    from client.queries import (KEEP_RUNS, SITE_WIDE, STATE_FILE, QueryLimits, QueryRefused,
                                SiteQueryLog)

    hour = 400_000
    old = {"7": {"evaluations": 50}, "8": {"evaluations": 30},
           SITE_WIDE: {"evaluations-by-hour": {str(hour): 10}}}
    (tmp_path / STATE_FILE).write_text(json.dumps(old))
    for run_id in range(100, 100 + KEEP_RUNS + 2):
        assert SiteQueryLog(tmp_path, run_id).first_message()
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert "7" not in state and "8" not in state                 # pruned, their count kept
    limits = QueryLimits(max_evaluations=10**6, max_daily_evaluations=10**6,
                         max_total_evaluations=80)
    log = SiteQueryLog(tmp_path, 999, clock=lambda: hour * 3600.0 + 60)
    with pytest.raises(QueryRefused, match="at most 80 evaluate requests in all"):
        log.admit_evaluation("classification", 1, "w", limits)   # 70 before + 10 today


def test_the_daily_evaluation_budget_is_not_pruned_with_old_runs(tmp_path):
    """Per-run counters are dropped after ``KEEP_RUNS`` runs (their rounds are over); the
    daily count is not, or a coordinator cycling through that many runs would reset it."""
    from client.queries import KEEP_RUNS, QueryLimits, QueryRefused, SiteQueryLog

    runs = KEEP_RUNS + 8
    limits = QueryLimits(max_daily_evaluations=runs)
    for run_id in range(runs):
        SiteQueryLog(tmp_path, run_id).admit_evaluation("classification", 1, "w", limits)
    with pytest.raises(QueryRefused, match="max-evaluations-per-day"):
        SiteQueryLog(tmp_path, runs).admit_evaluation("classification", 1, "w", limits)


@pytest.mark.parametrize("value, reason", [("many", "must be an integer"),
                                           (None, "must be an integer"), (-1, "must be >= 0"),
                                           ("2.5", "must be an integer")])
def test_a_bad_daily_evaluation_budget_in_node_config_is_refused(value, reason):
    from client.queries import QueryLimits, QueryRefused
    from protocol import wire

    assert QueryLimits.from_settings({}).max_daily_evaluations == 2000
    assert QueryLimits.from_settings({}).max_total_evaluations == 100_000
    assert QueryLimits.from_settings({}, simulated=True).max_total_evaluations >= 2**62
    assert QueryLimits.from_settings({wire.NODE_MAX_TOTAL_EVALUATIONS: "7"}) \
        .max_total_evaluations == 7
    # a simulated partition (synthetic, the user's own coordinator): no daily cap by default
    assert QueryLimits.from_settings({}, simulated=True).max_daily_evaluations >= 2**62
    assert QueryLimits.from_settings({wire.NODE_MAX_DAILY_EVALUATIONS: "5"},
                                     simulated=True).max_daily_evaluations == 5
    assert QueryLimits.from_settings({wire.NODE_MAX_DAILY_EVALUATIONS: "5"}) \
        .max_daily_evaluations == 5
    with pytest.raises(QueryRefused, match=rf"node config 'max-evaluations-per-day' {reason}"):
        QueryLimits.from_settings({wire.NODE_MAX_DAILY_EVALUATIONS: value})
