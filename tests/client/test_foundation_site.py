"""A foundation model's base weights belong to each side: the job names them by a bare name,
a site resolves it in its own node config ``foundation-dir``, checks the coordinator's digest
and exchanges only the trainable arrays."""

from __future__ import annotations

import json
import os

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

from client.app import load_global  # noqa: E402
from client.foundation import FoundationRefused, check_site_model, site_foundation_dir  # noqa: E402
from client.job import JobError, decode_job  # noqa: E402
from client.mods.errors import sanitize  # noqa: E402
from client.privacy.policy import PrivacyRefused  # noqa: E402
from models.foundation.lora import frozen_keys, trainable_keys  # noqa: E402
from protocol import wire  # noqa: E402
from server.config import ConfigError, load_experiment  # noqa: E402
from server.federation import build_strategy, job_config  # noqa: E402
from strategies.partial import FrozenSharing  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8)


def save_dinov2(directory, seed: int = 0) -> None:
    torch.manual_seed(seed)
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY, mlp_ratio=2)).save_pretrained(
        directory)


def save_sam(directory) -> None:
    torch.manual_seed(0)
    vision = dict(TINY, mlp_dim=64, window_size=2, global_attn_indexes=[1], output_channels=16)
    transformers.SamModel(transformers.SamConfig(vision_config=vision)).save_pretrained(directory)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """The coordinator's directory of encoders, and a site's with other dinov2 weights."""
    root = tmp_path_factory.mktemp("encoders")
    save_dinov2(root / "coordinator" / "dino")
    save_sam(root / "coordinator" / "sam")
    save_dinov2(root / "other-site" / "dino", seed=1)
    return root


def experiment(encoders, *extra):
    return load_experiment(["model=foundation", "model.options.weights=dino",
                            f"model.foundation_dir={encoders / 'coordinator'}",
                            "model.options.lora_rank=2", "task.image_size=32",
                            "federation=sim2", "tracking.log_models=false", *extra])


def site_context(foundation_dir) -> Context:
    node = {wire.NODE_FOUNDATION_DIR: str(foundation_dir)} if foundation_dir else {}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def server_side(cfg):
    """The coordinator's initial model, digest and first train message content."""
    from models.foundation import base_digest
    from models.tasks import build

    model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name, cfg.task_options(),
                     foundation_dir=cfg.model.foundation_dir)
    return model, base_digest(model)


# ---------------------------------------------------------------- 1. site-owned weights

@pytest.mark.parametrize("options, message", [
    ({"weights": "../x"}, "bare name"),
    ({"weights": "/etc"}, "bare name"),
    ({"weights": "models/dino"}, "bare name"),
    ({"weights": ".."}, "bare name"),
    ({"weights": "dino", "weights_dir": "/etc"}, "unknown option"),
])
def test_a_job_naming_a_path_is_refused_before_anything_is_read(encoders, options, message,
                                                                 monkeypatch):
    import models.foundation.loading as loading

    def no_read(*_, **__):
        raise AssertionError("the site read something for a refused job")
    record = job_config(experiment(encoders), base_digest="0" * 64)   # the coordinator's
    record[wire.MODEL_OPTIONS] = json.dumps(
        json.loads(record[wire.MODEL_OPTIONS]) | options)
    monkeypatch.setattr(loading, "read_config", no_read)      # from here on: the site
    monkeypatch.setattr(loading, "load_encoder", no_read)
    with pytest.raises(JobError, match=message):
        decode_job(record, site_seed=0)


def test_the_coordinator_refuses_a_path_or_a_name_it_cannot_resolve(encoders):
    with pytest.raises(ConfigError, match="bare name"):
        experiment(encoders, "model.options.weights=../coordinator/dino")
    with pytest.raises(ConfigError, match="does not exist"):
        experiment(encoders, "model.options.weights=absent")
    with pytest.raises(ConfigError, match="foundation-dir"):
        experiment(encoders, "model.foundation_dir=null")
    with pytest.raises(ConfigError, match="loads no pretrained encoder"):
        load_experiment([f"model.foundation_dir={encoders}"])
    # registering versions in MLflow is built (server/tracking.py): not refused any more
    assert experiment(encoders, "tracking.log_models=true").tracking.log_models


def test_a_site_builds_from_its_own_directory_and_accepts_the_same_base(encoders):
    cfg = experiment(encoders)
    _, digest = server_side(cfg)
    job = decode_job(job_config(cfg, base_digest=digest), site_seed=3)
    assert job.base_digest == digest
    model, _ = job.build(foundation_dir=encoders / "coordinator")
    assert check_site_model(model, job) is True


def test_a_site_with_other_base_weights_refuses_with_a_policy_reason(encoders):
    cfg = experiment(encoders)
    _, digest = server_side(cfg)
    job = decode_job(job_config(cfg, base_digest=digest), site_seed=3)
    model, _ = job.build(foundation_dir=encoders / "other-site")
    with pytest.raises(FoundationRefused, match="differ from the coordinator's") as refused:
        check_site_model(model, job)
    sent = sanitize(refused.value)
    assert str(sent).startswith("site-policy: ") and "foundation-dir" in str(sent)
    assert str(encoders) not in str(sent)        # no site path leaves


def test_a_job_without_a_digest_is_refused(encoders):
    job = decode_job(job_config(experiment(encoders)), site_seed=0)
    model, _ = job.build(foundation_dir=encoders / "coordinator")
    with pytest.raises(FoundationRefused, match="no base digest"):
        check_site_model(model, job)


def test_a_site_without_foundation_dir_cannot_build(encoders, tmp_path):
    from models.foundation.loading import FoundationLoadError

    job = decode_job(job_config(experiment(encoders), base_digest="0" * 64), site_seed=0)
    assert site_foundation_dir({}, tmp_path) is None
    with pytest.raises(FoundationLoadError, match="foundation-dir"):
        job.build(foundation_dir=site_foundation_dir({}, tmp_path))
    # relative: under the site's data directory, like privacy-dir
    assert site_foundation_dir({wire.NODE_FOUNDATION_DIR: "enc"}, tmp_path) == tmp_path / "enc"


# ---------------------------------------------------------------- 2. only trainable arrays travel

def test_the_coordinator_sends_only_trainable_arrays_and_no_base(encoders):
    cfg = experiment(encoders)
    model, _ = server_side(cfg)
    strategy = build_strategy(cfg, frozen_keys(model), send_frozen=False)
    assert isinstance(strategy, FrozenSharing) and not strategy.send_frozen
    sent = strategy._split(ArrayRecord(model.state_dict()))
    assert set(sent.keys()) == set(trainable_keys(model))
    assert len(sent.keys()) < len(frozen_keys(model))
    assert not any(k.startswith("encoder.") and "lora_" not in k for k in sent.keys())
    assert strategy._attach([_Msg()])[0].content.array_records == {}


class _Msg:
    def __init__(self):
        self.content = RecordDict()


def _content(arrays: dict, frozen: dict | None = None) -> RecordDict:
    content = RecordDict({wire.ARRAYS: ArrayRecord(arrays)})
    if frozen is not None:
        content[wire.FROZEN_ARRAYS] = ArrayRecord(frozen)
    return content


def test_a_site_loads_the_trainable_arrays_onto_its_own_base(encoders):
    cfg = experiment(encoders)
    server, digest = server_side(cfg)
    job = decode_job(job_config(cfg, base_digest=digest), site_seed=5)
    model, _ = job.build(foundation_dir=encoders / "coordinator")
    state = server.state_dict()
    trainable = {k: state[k] + 1.0 for k in trainable_keys(server)}
    load_global(model, _content(trainable), job, site_context(None), site_base=True)
    own = model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in trainable.items())
    assert all(torch.equal(own[k], state[k]) for k in frozen_keys(server))


@pytest.mark.parametrize("change", ["missing", "extra-base", "frozen-record"])
def test_a_site_refuses_another_key_set_or_base_weights_from_the_coordinator(encoders, change):
    cfg = experiment(encoders)
    server, digest = server_side(cfg)
    job = decode_job(job_config(cfg, base_digest=digest), site_seed=5)
    model, _ = job.build(foundation_dir=encoders / "coordinator")
    state = server.state_dict()
    trainable = {k: state[k] for k in trainable_keys(server)}
    frozen = None
    if change == "missing":
        trainable.pop(sorted(trainable)[0])
    elif change == "extra-base":
        base = frozen_keys(server)[0]
        trainable[base] = torch.zeros_like(state[base])
    else:
        frozen = {k: torch.zeros_like(state[k]) for k in frozen_keys(server)}
    with pytest.raises(FoundationRefused):
        load_global(model, _content(trainable, frozen), job, site_context(None), site_base=True)


# ---------------------------------------------------------------- 5. DP and SAM

def test_dp_sgd_takes_sam_lora_and_refuses_sam_full_in_one_line(encoders):
    sam = ["model.options.weights=sam"]
    assert experiment(encoders, "privacy=dpsgd", *sam).privacy.mechanism == wire.DP_SGD
    full = ["privacy=dpsgd", *sam, "model.options.method=full"]
    with pytest.raises(ConfigError, match="dp-sgd refused for a sam foundation model: "
                                          "method=full") as err:
        experiment(encoders, *full)
    assert "\n" not in str(err.value)
    # a site decides for itself, before training or charging its budget (a coordinator may
    # not validate): LoRA passes, full is refused with the same line, as a privacy refusal
    for method, refused in (("lora", False), ("full", True)):
        cfg = experiment(encoders, *sam, f"model.options.method={method}")
        _, digest = server_side(cfg)
        record = job_config(experiment(encoders, "privacy=dpsgd"), "run-x", base_digest=digest)
        record[wire.MODEL_OPTIONS] = json.dumps(json.loads(record[wire.MODEL_OPTIONS])
                                                | {"weights": "sam", "method": method})
        job = decode_job(record, site_seed=0)
        model, _ = job.build(foundation_dir=encoders / "coordinator")
        if not refused:
            assert check_site_model(model, job)
            continue
        with pytest.raises(PrivacyRefused, match="dp-sgd refused for this foundation model: "
                                                 "method=full") as site:
            check_site_model(model, job)
        assert "\n" not in str(site.value)


def test_dp_sgd_on_layers_the_clipper_cannot_cover_is_refused_before_the_round_is_charged(
        encoders, monkeypatch):
    """A coordinator may not validate: the site's check, which runs before ``admit_round``
    charges the ledger, refuses DP-SGD on Dinov2 ``method=full`` (declared: its embeddings
    and layer scales have no per-sample rule) and on a layer declared nowhere (here DoRA's
    magnitude vectors with their rule taken away, as a new peft layer would be: only the
    clipper knows) - and accepts LoRA and IA3."""
    from client.privacy import adapter_grads

    covered = adapter_grads.missing
    monkeypatch.setattr(adapter_grads, "missing", lambda module, owner, *base: (
        "no rule" if adapter_grads.is_dora(module) else covered(module, owner, *base)))
    with pytest.raises(ConfigError, match="dp-sgd refused for a dinov2 foundation model: "
                                          "method=full"):
        experiment(encoders, "privacy=dpsgd", "model.options.method=full")
    for method, expected in (("full", "method=full trains"),
                             ("dora", "no exact per-sample gradient rule .*lora_magnitude"),
                             ("lora", None), ("ia3", None)):
        cfg = experiment(encoders, f"model.options.method={method}")
        _, digest = server_side(cfg)
        record = job_config(experiment(encoders, "privacy=dpsgd"), "run-x", base_digest=digest)
        record[wire.MODEL_OPTIONS] = json.dumps(json.loads(record[wire.MODEL_OPTIONS])
                                                | {"method": method})
        job = decode_job(record, site_seed=0)
        model, _ = job.build(foundation_dir=encoders / "coordinator")
        if expected is None:
            check_site_model(model, job)
            continue
        with pytest.raises(PrivacyRefused, match="dp-sgd refused .*" + expected) as err:
            check_site_model(model, job)
        assert "\n" not in str(err.value)
        plain = decode_job(job_config(cfg, "run-x", base_digest=digest), site_seed=0)
        check_site_model(model, plain)          # the same model without DP-SGD: accepted


# ---------------------------------------------------------------- 3. the site's own training

@pytest.mark.parametrize("private", [False, True], ids=["sgd", "dp-sgd"])
def test_a_site_trains_a_checkpointed_encoder_when_the_job_asks(encoders, tiny_sites, tmp_path,
                                                                monkeypatch, private,
                                                                task_identity):
    """``model.options.gradient_checkpointing=true`` travels in the job's model options and
    the site's own build wraps the encoder's blocks: a train message through the ClientApp
    runs each block of every training step under ``torch.utils.checkpoint`` and again in
    backward (counted), plain and under DP-SGD; without the option, neither."""
    import shutil

    import models.checkpointing as checkpointing
    from client.app import make_client_app
    from flwr.app import Message, MessageType

    calls = {"checkpoint": 0, "recomputed": 0}
    checkpoint, announced = checkpointing.checkpoint, checkpointing._announced

    def counted_checkpoint(*args, **kwargs):
        calls["checkpoint"] += 1
        return checkpoint(*args, **kwargs)

    def counted_announced():
        calls["recomputed"] += 1
        return announced()
    monkeypatch.setattr(checkpointing, "checkpoint", counted_checkpoint)
    monkeypatch.setattr(checkpointing, "_announced", counted_announced)
    dp = ["privacy=dpsgd", "privacy.epsilon=50"] if private else []
    for on in (False, True):
        cfg = experiment(encoders, "train.local_epochs=1", "train.batch_size=8", *dp,
                         f"+model.options.gradient_checkpointing={str(on).lower()}")
        server, digest = server_side(cfg)
        state = server.state_dict()
        record = job_config(cfg, "run-c", base_digest=digest)
        record[wire.SERVER_ROUND] = 1
        content = _content({k: state[k] for k in trainable_keys(server)})
        content[wire.CONFIG] = record
        site = shutil.copytree(tiny_sites / "site-0", tmp_path / str(on) / "site-0")
        node = {wire.NODE_DATA_DIR: str(site), wire.NODE_MIN_EVAL_SPLIT: 1,
                wire.NODE_FOUNDATION_DIR: str(encoders / "coordinator")}
        if private:
            node |= {wire.NODE_DP_EPSILON: 100.0, wire.NODE_DP_DELTA: 1e-5}
        calls.update(checkpoint=0, recomputed=0)
        reply = make_client_app()(Message(content, dst_node_id=7,
                                          message_type=MessageType.TRAIN),
                                  Context(run_id=1, node_id=7, node_config=node,
                                          state=RecordDict(), run_config={}))
        assert not reply.has_error(), reply.error
        if on:        # 2 blocks a step, each run again in backward
            assert calls["checkpoint"] >= 2 and calls["recomputed"] == calls["checkpoint"]
        else:
            assert calls == {"checkpoint": 0, "recomputed": 0}
