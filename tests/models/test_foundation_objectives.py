"""MM-DINOv2, MAE and CLIP/SigLIP image-report pretraining starting from a loaded foundation
model: tiny models built from configs, saved with ``save_pretrained`` (tokenizer beside the
CLIP/SigLIP weights), loaded back through the user path (``models.tasks.build`` with this
side's foundation directory) and trained through the site's one ``Engine``."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from client.engine import Engine
from client.privacy.persample import PerSampleClipper
from models.foundation.objectives import PretrainedMAEDecoder
from models.foundation.pair import PretrainedPair, sigmoid_loss
from models.mae import MAEDecoder, random_masking
from models.tasks import batch_coupling, build
from models.text import tokenizer_fingerprint, wordpiece_tokenizer
from protocol.job import TrainConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")     # never a hub, even by accident
import transformers  # noqa: E402

from .test_foundation import TINY, _randomise_trainable, _save  # noqa: E402

S, SIZE = 4, 32
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "enhancing", "lesion", "with", "oedema", "no",
         "findings", "cyst", "glioma", "high", "low", "grade", "consistent"]
REPORTS = ["enhancing lesion with oedema", "no findings", "cyst", "high grade glioma",
           "low grade glioma", "findings consistent with cyst"]
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            vocab_size=24, bos_token_id=2, eos_token_id=3, pad_token_id=0,
            max_position_embeddings=24)
ATOL = 1e-10


def _save_pair(family: str, directory) -> None:
    """A tiny CLIPModel / SiglipModel pair with its own tokenizer in the same directory."""
    torch.manual_seed(11)
    t = transformers
    vision = dict(TINY, intermediate_size=64)
    if family == "clip":
        model = t.CLIPModel(t.CLIPConfig(text_config=TEXT, vision_config=vision,
                                         projection_dim=16))
    else:
        model = t.SiglipModel(t.SiglipConfig(text_config=TEXT, vision_config=vision))
    model.save_pretrained(directory)
    wordpiece_tokenizer(WORDS).save(str(directory / "tokenizer.json"))


def _save_pair_with_big_tokenizer(directory) -> None:
    """A pair whose tokenizer has 4 more tokens than its text tower embeds."""
    _save_pair("clip", directory)
    extra = [f"word{i}" for i in range(TEXT["vocab_size"] + 4 - len(WORDS))]
    wordpiece_tokenizer(WORDS + extra).save(str(directory / "tokenizer.json"))


def _save_mae_pretraining(directory) -> None:
    """ViTMAEForPreTraining: the encoder and its decoder in one directory."""
    torch.manual_seed(5)
    config = transformers.ViTMAEConfig(**TINY, intermediate_size=64, decoder_hidden_size=16,
                                       decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                       decoder_intermediate_size=32)
    transformers.ViTMAEForPreTraining(config).save_pretrained(directory)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """This side's foundation directory: one saved model per name (saving is the slow part)."""
    root = tmp_path_factory.mktemp("encoders")
    for family in ("dinov2", "dinov3", "vit", "vit_mae", "siglip", "sam", "monai_vit"):
        _save(family, root / family)
    _save(("clip"), root / "clip_vision")       # a full CLIPModel without a tokenizer
    _save_mae_pretraining(root / "mae_pretraining")
    for family in ("clip", "siglip"):
        _save_pair(family, root / f"{family}_pair")
    _save_pair_with_big_tokenizer(root / "clip_big_tokenizer")
    return root


def _build(encoders, weights: str, objective: str, task_options: dict | None = None,
           **model_options):
    options = {"weights": weights, "num_channels": S, "image_size": SIZE, "lora_rank": 2}
    return build("foundation", options | model_options, objective, task_options or {},
                 foundation_dir=encoders)


def _studies(n: int = 6, reports: dict | None = None) -> list[dict]:
    """Synthetic studies: channel 2 of the first absent; half labelled (-1: unlabelled)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        present = torch.ones(S, dtype=torch.bool)
        present[2] = i != 0
        item = {"image": torch.randn(S, SIZE, SIZE, generator=g) * present[:, None, None],
                "present": present, "label": torch.tensor(i % 3 if i < n // 2 else -1)}
        if reports is not None:
            item |= {k: v[i] for k, v in reports.items()} | {"has_report": torch.tensor(True)}
        out.append(item)
    return out


def _train_one_epoch(model: nn.Module, task, data: list[dict]) -> dict[str, tuple]:
    """One epoch through the site's engine; returns ``name -> (before, after)``."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = Engine(task, torch.device("cpu")).fit(
        model, data, TrainConfig(local_epochs=1, batch_size=3, lr=1e-2))
    assert metrics["steps"] == 2 and torch.isfinite(torch.tensor(metrics["train_loss"]))
    return {n: (before[n], p.detach()) for n, p in model.named_parameters()}


def _assert_only_trainable_changed(model: nn.Module, moved: dict[str, tuple]) -> None:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, (a, b) in moved.items() if not torch.equal(a, b)}
    assert trainable and changed == trainable, (sorted(trainable - changed)[:5],
                                                sorted(changed - trainable)[:5])


def _on_the_wire(key: str, *, heads: tuple[str, ...]) -> bool:
    """What may travel: adapters, the adaptation's new parts, the objective's own heads."""
    return ("lora_" in key or key.startswith(("backbone.patch_embed.", "backbone.channel_embed.",
                                              "backbone.head.")) or key.startswith(heads))


# ---------------------------------------------------------------- MM-DINOv2

@pytest.mark.parametrize("weights", ["dinov2", "dinov3"])
def test_mm_dino_from_a_loaded_dinov2_trains_adapters_and_heads_with_a_site_local_teacher(
        encoders, weights):
    model, task = _build(encoders, weights, "mm_dino", {"local_crops": 1})
    moved = _train_one_epoch(model, task, _studies())
    _assert_only_trainable_changed(model, moved)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(_on_the_wire(k, heads=("dino_head.", "ibot_head.")) for k in trainable), trainable
    assert any("lora_B" in k for k in trainable)
    # student and teacher started from the loaded backbone: the frozen base is that of the
    # directory in both, and only the trainable part is averaged into the teacher
    teacher = dict(task.teacher.named_parameters())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for name in frozen:
        torch.testing.assert_close(teacher[name], dict(model.named_parameters())[name],
                                   rtol=0, atol=0)
    assert any(name.startswith("backbone.encoder.") for name in frozen)
    # the encoder is the directory's, not one the objective made: after training, every
    # tensor saved there is one of the student's frozen encoder weights, value for value
    # (by content: the family's module names differ from its checkpoint's)
    def digest(t: torch.Tensor) -> tuple:
        return tuple(t.shape), t.detach().contiguous().numpy().tobytes()

    frozen_weights = {digest(p) for p in model.backbone.encoder.parameters()
                      if not p.requires_grad}
    saved = load_file(str(encoders / weights / "model.safetensors"))
    assert [k for k, v in saved.items() if digest(v) not in frozen_weights] == []
    # the site state keeps the teacher's trainable part only (its base is the site's copy)
    state = task.site_state()
    kept = {k[len("teacher."):] for k in state if k.startswith("teacher.")}
    assert kept == set(model.state_dict()) - frozen
    again, task2 = _build(encoders, weights, "mm_dino", {"local_crops": 1})
    again.load_state_dict(model.state_dict())
    task2.load_site_state(again, state)
    for k, v in task.teacher.state_dict().items():
        torch.testing.assert_close(task2.teacher.state_dict()[k], v, rtol=0, atol=0)


def test_mm_dino_continued_pretraining_is_what_fine_tuning_starts_from(encoders):
    """Phase 2 (classification, the same foundation model) loads phase 1's backbone: the
    trained adapters, embeddings and semi-supervised head, over the same frozen base."""
    from models.tasks import backbone_weights

    model, task = _build(encoders, "dinov2", "mm_dino", {"local_crops": 0})
    _train_one_epoch(model, task, _studies())
    finetune, _ = build("foundation", {"weights": "dinov2", "num_channels": S,
                                       "image_size": SIZE, "lora_rank": 2},
                        "classification", {}, foundation_dir=encoders,
                        backbone_state=backbone_weights(model.state_dict()))
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(finetune.state_dict()[k], v, rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------- MAE

def test_mae_from_vitmae_pretraining_reuses_its_decoder(encoders):
    model, task = _build(encoders, "mae_pretraining", "mae")
    assert isinstance(model.decoder, PretrainedMAEDecoder)
    saved = transformers.ViTMAEForPreTraining.from_pretrained(
        str(encoders / "mae_pretraining"), local_files_only=True).decoder
    for k, v in saved.decoder_layers.state_dict().items():
        torch.testing.assert_close(model.decoder.layers.state_dict()[k], v, rtol=0, atol=0)
    # one-channel pixel predictor = the RGB one averaged over colours (pixels row, col, rgb)
    rgb = saved.decoder_pred.weight.reshape(64, 3, -1)
    torch.testing.assert_close(model.decoder.pred.weight, rgb.mean(1), rtol=0, atol=1e-7)
    moved = _train_one_epoch(model, task, _studies())
    _assert_only_trainable_changed(model, moved)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(_on_the_wire(k, heads=("decoder.",)) for k in trainable), trainable
    assert model.backbone.head is None
    assert Engine(task, torch.device("cpu")).evaluate(model, _studies()).n == 6


def test_mae_from_an_encoder_without_decoder_builds_a_new_one(encoders):
    model, task = _build(encoders, "vit_mae", "mae")
    assert isinstance(model.decoder, MAEDecoder)
    _assert_only_trainable_changed(model, _train_one_epoch(model, task, _studies()))


@pytest.mark.parametrize("weights", ["mae_pretraining", "dinov2", "dinov3"])
def test_mae_hidden_patches_reach_no_visible_token(encoders, weights):
    """Masked means masked: whatever a hidden patch holds, no visible token changes."""
    model, _ = _build(encoders, weights, "mae")
    model.eval()
    data = _studies(2)
    images = torch.stack([d["image"] for d in data])
    present = torch.stack([d["present"] for d in data])
    n = model.backbone.layout.patches_per_sequence
    masked = random_masking(present, n, 0.5, 1.0, torch.Generator().manual_seed(1))
    tokens = model.backbone.forward_features(images, present, hidden=masked)
    assert masked.any()
    pixels = masked.reshape(2, S, 4, 4)[..., None, :, None].expand(2, S, 4, 8, 4, 8)
    changed = images + 10 * torch.randn_like(images) * pixels.reshape(2, S, 32, 32)
    again = model.backbone.forward_features(changed, present, hidden=masked)
    visible = torch.cat([torch.ones(2, 1, dtype=torch.bool), ~masked], dim=1)
    torch.testing.assert_close(again[visible], tokens[visible], rtol=0, atol=1e-5)
    assert not torch.allclose(again[~visible], tokens[~visible], atol=1e-3)


@pytest.mark.parametrize("weights,objective,options", [
    ("mae_pretraining", "mae", {}), ("clip_pair", "clip", {"max_length": 16})])
def test_a_pretrained_backbone_without_head_exports_and_reloads(encoders, tmp_path, weights,
                                                                 objective, options):
    """What a pretraining phase registers (no class head) in the family's own format."""
    from models.foundation.export import export_foundation, load_export

    model, _ = _build(encoders, weights, objective, options)
    _randomise_trainable(model.backbone, seed=4)
    backbone = model.backbone.eval()
    assert backbone.head is None
    reloaded = load_export(export_foundation(backbone, tmp_path / "export"))
    assert reloaded.head is None
    data = _studies(2)
    images = torch.stack([d["image"] for d in data])
    present = torch.stack([d["present"] for d in data])
    expected = backbone.pool(backbone.forward_features(images, present), present)
    got = reloaded.pool(reloaded.forward_features(images, present), present)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- CLIP / SigLIP

@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_clip_from_a_loaded_pair_trains_adapters_on_both_towers(encoders, family):
    model, task = _build(encoders, f"{family}_pair", "clip",
                         {"max_length": 16, "class_names": ["glioma", "cyst", "lesion"]})
    assert isinstance(model, PretrainedPair)
    # the tokenizer is the directory's own: reports are tokenized with it at the site
    assert task.reports.tokenizer_dir == str(encoders / f"{family}_pair")
    assert task.reports.fingerprint == tokenizer_fingerprint(encoders / f"{family}_pair")
    tokens = task.data_needs.reports.transform()(REPORTS)
    assert tokens["input_ids"].max() < len(WORDS)
    moved = _train_one_epoch(model, task, _studies(reports=tokens))
    _assert_only_trainable_changed(model, moved)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(k.startswith("text.") and "lora_B" in k for k in trainable)
    assert any(k.startswith("backbone.encoder.") and "lora_B" in k for k in trainable)
    scalars = {"logit_scale", "logit_bias"}
    assert all(_on_the_wire(k, heads=("text.",)) or k in scalars for k in trainable), trainable
    assert all("lora_" in k for k in trainable if k.startswith("text."))
    metrics = Engine(task, torch.device("cpu")).evaluate(model, _studies(reports=tokens))
    assert metrics.n == 6 and metrics.auroc is not None


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_pretrained_pair_is_exported_whole_in_its_familys_format(encoders, family, tmp_path):
    """Weights out after CLIP/SigLIP pretraining: the whole pair, both towers' adapters
    merged, the trained temperature, the tokenizer - ``from_pretrained`` gives what the pair
    computes, without MedFed."""
    from models.foundation.export import merge_adapters, save_pair

    model, task = _build(encoders, f"{family}_pair", "clip", {"max_length": 16})
    tokens = task.data_needs.reports.transform()(REPORTS)
    _train_one_epoch(model, task, _studies(reports=tokens))
    with torch.no_grad():                 # trained adapters and scale move the outputs apart
        for name, p in model.named_parameters():
            if "lora_B" in name or name in ("logit_scale", "logit_bias"):
                p.add_(0.05 * torch.randn_like(p))
    save_pair(model, tmp_path / "pair")
    cls = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel}[family]
    loaded = cls.from_pretrained(str(tmp_path / "pair"), use_safetensors=True).eval()
    model.eval()
    ids, mask = tokens["input_ids"][:4], tokens["attention_mask"][:4]
    with torch.no_grad():
        text = loaded.get_text_features(input_ids=ids, attention_mask=mask)
        text = getattr(text, "pooler_output", text)
        torch.testing.assert_close(torch.nn.functional.normalize(text, dim=-1),
                                   model.encode_text(ids, mask), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loaded.logit_scale.detach(), model.logit_scale.detach())
    if family == "siglip":
        torch.testing.assert_close(loaded.logit_bias.detach(), model.logit_bias.detach())
    vision = merge_adapters(model.backbone).encoder.state_dict()
    assert set(loaded.vision_model.state_dict()) == set(vision)
    for k, v in loaded.vision_model.state_dict().items():
        torch.testing.assert_close(v, vision[k], rtol=0, atol=0)
    # the directory's own tokenizer comes along, byte for byte
    assert (tmp_path / "pair" / "tokenizer.json").read_bytes() == \
        (encoders / f"{family}_pair" / "tokenizer.json").read_bytes()


def test_a_site_whose_tokenizer_differs_refuses_the_job(encoders, tmp_path):
    """The tokenizer is part of the pair's base: same weights, another tokenizer.json at the
    site -> another base digest -> the site refuses before training (as for other weights)."""
    import shutil

    from client.foundation import FoundationRefused, check_site_model
    from models.foundation import base_digest

    site_dir = tmp_path / "site-encoders"
    shutil.copytree(encoders / "clip_pair", site_dir / "clip_pair")
    options = {"max_length": 16}
    coordinator, _ = _build(encoders, "clip_pair", "clip", options)
    same, _ = _build(site_dir, "clip_pair", "clip", options)
    assert base_digest(same) == base_digest(coordinator)
    reordered = WORDS[:4] + WORDS[:3:-1]         # the same tokens, other ids
    wordpiece_tokenizer(reordered).save(str(site_dir / "clip_pair" / "tokenizer.json"))
    other, _ = _build(site_dir, "clip_pair", "clip", options)
    job = _job(base_digest(coordinator))
    assert check_site_model(same, job) is True
    with pytest.raises(FoundationRefused, match="differ"):
        check_site_model(other, job)


def _job(digest: str):
    from dataclasses import replace

    from protocol.job import JobSpec

    spec = JobSpec(model_name="foundation", model_options={"weights": "clip_pair"},
                   task_name="clip", task_options={}, class_names=("a", "b", "c"), image_size=SIZE)
    return replace(spec, base_digest=digest)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_the_pairs_own_image_path_is_kept(encoders, family):
    """With one channel holding a grey image, the adapted image tower embeds as the pair does
    on the RGB version of it (patch kernel averaged over RGB, zero channel embedding; CLIP's
    projected CLS, SigLIP's attention pooling): the pretrained alignment is where
    pretraining starts."""
    model, _ = _build(encoders, f"{family}_pair", "clip", {"max_length": 16}, num_channels=1)
    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    pair = cls.from_pretrained(str(encoders / f"{family}_pair"), local_files_only=True).eval()
    model.eval()
    gray = torch.randn(2, 1, SIZE, SIZE)
    ours = model.encode_image(gray, torch.ones(2, 1, dtype=torch.bool))
    # our one-channel kernel is the RGB kernels' mean: a third of their sum
    theirs = pair.get_image_features(pixel_values=gray.expand(-1, 3, -1, -1) / 3)
    theirs = getattr(theirs, "pooler_output", theirs)
    torch.testing.assert_close(ours, nn.functional.normalize(theirs, dim=-1), rtol=0,
                               atol=1e-5)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_an_absent_channel_does_not_reach_the_image_embedding(encoders, family):
    """Whatever an absent channel holds (SigLIP: its tokens masked out of the attention
    pooling as well as out of the encoder's attention)."""
    model, _ = _build(encoders, f"{family}_pair", "clip", {"max_length": 16})
    model.eval()
    images = torch.randn(2, S, SIZE, SIZE)
    present = torch.ones(2, S, dtype=torch.bool)
    present[:, 1] = False
    images[:, 1] = 0
    base = model.encode_image(images, present)
    garbage = images.clone()
    garbage[:, 1] = 10 * torch.randn(2, SIZE, SIZE)
    torch.testing.assert_close(model.encode_image(garbage, present), base, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_fused_tokens_keep_the_pairs_image_path_ignore_an_absent_channel_and_train(encoders,
                                                                                  family):
    """channel_tokens=fused on the image tower of a CLIPModel / SiglipModel: a study whose S
    channels all hold x embeds as the pair embeds the grey picture (x, x, x) (the inflated
    kernel keeps the pretrained alignment); an absent channel changes nothing (SigLIP: also
    not as a key of its attention pooling); one epoch of CLIP pretraining moves only what
    is trainable."""
    model, task = _build(encoders, f"{family}_pair", "clip",
                         {"max_length": 16, "class_names": ["glioma", "cyst", "lesion"]},
                         channel_tokens="fused")
    assert model.backbone.fused and model.backbone.channel_embed is None
    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    pair = cls.from_pretrained(str(encoders / f"{family}_pair"), local_files_only=True).eval()
    model.eval()
    gray = torch.randn(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    all_present = torch.ones(2, S, dtype=torch.bool)
    with torch.no_grad():
        ours = model.encode_image(gray.expand(-1, S, -1, -1), all_present)
        theirs = pair.get_image_features(pixel_values=gray.expand(-1, 3, -1, -1))
    theirs = getattr(theirs, "pooler_output", theirs)
    torch.testing.assert_close(ours, nn.functional.normalize(theirs, dim=-1), rtol=0,
                               atol=1e-5)
    present = all_present.clone()
    present[0, 1] = False
    images = torch.randn(2, S, SIZE, SIZE) * present[..., None, None]
    with torch.no_grad():
        base = model.encode_image(images, present)
        garbage = images.clone()
        garbage[0, 1] = 10 * torch.randn(SIZE, SIZE)
        torch.testing.assert_close(model.encode_image(garbage, present), base, rtol=0,
                                   atol=1e-5)
        changed = images.clone()
        changed[0, 2] = torch.randn(SIZE, SIZE)
        assert not torch.allclose(model.encode_image(changed, present)[0], base[0], atol=1e-4)
    model.train()
    tokens = task.data_needs.reports.transform()(REPORTS)
    _assert_only_trainable_changed(model, _train_one_epoch(model, task, _studies(reports=tokens)))
    assert "backbone.patch_embed.weight" in {n for n, p in model.named_parameters()
                                             if p.requires_grad}


def test_sigmoid_loss_is_siglips():
    logits = torch.randn(5, 5, dtype=torch.float64)
    signs = 2 * torch.eye(5, dtype=torch.float64) - 1
    reference = -nn.functional.logsigmoid(signs * logits).sum() / 5      # HF's SiglipModel
    torch.testing.assert_close(sigmoid_loss(logits).mean().double(), reference)


# ---------------------------------------------------------------- refusals, one line each

@pytest.mark.parametrize("weights,objective,options,message", [
    ("siglip", "mm_dino", {}, "needs an encoder with a CLS token"),
    ("sam", "mae", {}, "needs an encoder with a CLS token"),
    ("dinov2", "clip", {}, "needs a CLIPModel or SiglipModel directory"),
    ("clip_vision", "clip", {"max_length": 16}, "tokenizer"),     # weights without a tokenizer
    ("clip_pair", "clip", {"max_length": 64}, "exceeds"),
    ("clip_big_tokenizer", "clip", {"max_length": 16}, "has 28 tokens but its text tower "
                                                        "embeds 24"),
    ("clip_pair", "clip", {"tokenizer_dir": "report_vocab"}, "tokenizer_dir must be unset"),
    ("dinov2", "mm_dino", {"num_classes": 4}, "classes"),
    ("clip_pair", "clip", {"max_length": 16, "num_layers": 4}, "num_layers size the"),
])
def test_combinations_that_cannot_work_are_refused_in_one_line(encoders, weights, objective,
                                                               options, message):
    with pytest.raises(ValueError, match=message) as err:
        _build(encoders, weights, objective, options)
    assert "\n" not in str(err.value)


def test_sam_cannot_hide_tokens_and_a_linear_probe_cannot_pretrain(encoders):
    from models import MODELS

    sam = MODELS.build("foundation", {"weights": "sam", "num_channels": S,
                                      "image_size": SIZE}, foundation_dir=encoders)
    with pytest.raises(ValueError, match="cannot hide tokens"):
        sam.forward_features(torch.zeros(1, S, SIZE, SIZE), torch.ones(1, S, dtype=torch.bool),
                             hidden=torch.zeros(1, S * 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="linear_probe"):
        _build(encoders, "dinov2", "mae", method="linear_probe")


def test_objectives_that_couple_the_batch_stay_refused_under_dp_sgd():
    """MM-DINOv2's centring/KoLeo and CLIP/SigLIP's contrast over the batch: DP-SGD refused
    whatever the backbone (the server refuses the configuration; see test_config)."""
    assert batch_coupling("mm_dino") and batch_coupling("clip")
    assert batch_coupling("mae") is None


# ---------------------------------------------------------------- DP-SGD for MAE

@pytest.mark.parametrize("weights", ["dinov2", "dinov3", "vit", "vit_mae", "mae_pretraining",
                                     "clip_vision", "monai_vit"])
def test_mae_per_sample_gradients_are_exact(encoders, weights):
    """Summed per-sample gradients equal the batch gradient (and each norm one backward per
    sample), float64, every trainable parameter: LoRA, new parts and the decoder."""
    model, task = _build(encoders, weights, "mae")
    model = model.double().train()
    _randomise_trainable(model)
    data = _studies(2)
    batch = {k: torch.stack([d[k] for d in data]) for k in ("image", "present")}
    batch["image"] = batch["image"].double()
    # a whole hidden sequence is exercised in test_mae_hidden_patches_reach_no_visible_token;
    # here every present channel keeps visible patches, so every embedding gets a gradient
    masked = random_masking(batch["present"], model.backbone.layout.patches_per_sequence, 0.5,
                            0.0, torch.Generator().manual_seed(2))

    def summed(b):
        loss, _ = model.forward_loss(b["image"], b["present"], masked=b["masked"])
        return loss.sum()

    batch["masked"] = masked
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    individual = []
    for i in range(2):
        model.zero_grad(set_to_none=True)
        summed({k: v[i:i + 1] for k, v in batch.items()}).backward()
        individual.append({n: p.grad.clone() for n, p in params.items()})
    expected = torch.stack([torch.sqrt(sum(g.square().sum() for g in grads.values()))
                            for grads in individual])
    model.zero_grad(set_to_none=True)
    clipper = PerSampleClipper(model, max_grad_norm=1e12)
    with clipper.capture():
        summed(batch).backward()
    grads, norms = clipper.clipped_sum()
    torch.testing.assert_close(norms, expected, rtol=0, atol=ATOL)
    model.zero_grad(set_to_none=True)
    summed(batch).backward()
    assert {id(p) for p in grads} == {id(p) for p in params.values()}
    for name, p in params.items():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(grads[p], p.grad, rtol=0, atol=ATOL, msg=name)
        torch.testing.assert_close(grads[p], individual[0][name] + individual[1][name],
                                   rtol=0, atol=ATOL, msg=name)


def test_mae_from_a_loaded_model_trains_under_dp_sgd_through_the_engine(encoders):
    """The site's DP-SGD path (Poisson batches, per-sample clipping, noise) end to end on the
    MAE objective with the pretrained decoder: only trainable weights move."""
    from client.privacy.dpsgd import DPSGDConfig

    model, task = _build(encoders, "mae_pretraining", "mae")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    privacy = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                          secure_mode=False, seed=3)
    metrics = Engine(task, torch.device("cpu")).fit(
        model, _studies(), TrainConfig(local_epochs=1, batch_size=3, lr=1e-2), privacy=privacy)
    assert metrics["steps"] == 2
    moved = {n: (before[n], p.detach()) for n, p in model.named_parameters()}
    _assert_only_trainable_changed(model, moved)


def test_a_pad_token_named_only_in_tokenizer_config_is_used(tmp_path):
    """CLIP's tokenizer pads with its end-of-text token, which only tokenizer_config.json
    names; without it the directory is refused (no padding token), as before."""
    from models.text import load_tokenizer, pad_id, tokenize

    words = ["[UNK]", "[CLS]", "[SEP]", "<|endoftext|>", "cyst", "glioma"]
    wordpiece_tokenizer(words).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="no padding token"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"pad_token": {"content": "<|endoftext|>"}}')
    tokenizer = load_tokenizer(tmp_path)
    assert pad_id(tokenizer) == 3
    ids = tokenize(tokenizer, ["cyst"], 6)["input_ids"][0].tolist()
    assert ids == [1, 4, 2, 3, 3, 3]


def test_mae_decoder_with_another_patch_size_gets_a_new_pixel_predictor(encoders, caplog):
    with caplog.at_level("INFO", logger="models.foundation.objectives"):
        model, task = _build(encoders, "mae_pretraining", "mae", patch_size=4)
    assert "a new predictor is trained from scratch" in caplog.text     # said, not silent
    assert isinstance(model.decoder, PretrainedMAEDecoder)
    assert model.decoder.pred.out_features == 16 and model.decoder.pos_embed.shape[1] == 64
    _assert_only_trainable_changed(model, _train_one_epoch(model, task, _studies()))


def test_a_mae_pretraining_directory_also_fine_tunes_supervised(encoders):
    """The decoder beside the encoder is not part of a supervised model: not held, not
    digested, not sent."""
    model, task = _build(encoders, "mae_pretraining", "classification")
    assert not any("decoder" in k for k in model.state_dict())
    _assert_only_trainable_changed(model, _train_one_epoch(model, task, _studies(12)[:6]))
