"""End to end: MM-DINOv2 continued federated pretraining from a Dinov2Model saved as a
transformers directory, then fine-tuning from its result - 2 sites, 1 round per phase. The
coordinator and every site resolve the encoder's NAME in their own foundation directory; in
both phases and both directions only adapters, the adaptation's new parts, the class head and
(phase 1) the DINO/iBOT projection heads travel; the teacher never does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import transformers  # noqa: E402

from client.mods import egress_log  # noqa: E402
from medfed.simulation import simulate  # noqa: E402
from server.config import load_experiment  # noqa: E402

from .test_foundation_simulation import ingress_log, trainable_shapes  # noqa: E402

pytestmark = pytest.mark.slow

NEW_PARTS = ("patch_embed.", "channel_embed.", "head.")
OBJECTIVE_HEADS = ("dino_head.", "ibot_head.")


def _travels(key: str, *, pretraining: bool) -> bool:
    if "lora_" in key:
        return True
    if pretraining:
        return key.startswith(OBJECTIVE_HEADS) or (
            key.startswith("backbone.") and key[len("backbone."):].startswith(NEW_PARTS))
    return key.startswith(NEW_PARTS)


def test_mm_dino_from_a_saved_dinov2_then_fine_tuning(tiny_sites, tmp_path):
    encoders = tmp_path / "encoders"
    torch.manual_seed(0)
    base = transformers.Dinov2Model(transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, mlp_ratio=2))
    base.save_pretrained(encoders / "dino-tiny")
    n_base = len(base.state_dict())
    cfg = load_experiment([
        "model=foundation", "model.options.weights=dino-tiny",
        f"model.foundation_dir={encoders}", "model.options.lora_rank=2",
        "pretrain=mm_dino", "pretrain.num_rounds=1", "pretrain.options.local_crops=1",
        "pretrain.options.out_dim=32",
        "task.image_size=32", "federation=sim2", "federation.num_rounds=1",
        "train.local_epochs=1", "train.batch_size=8", f"data.root={tiny_sites}",
        f"runs_dir={tmp_path / 'runs'}", "name=foundation-mm-dino"])
    run_dir = simulate(cfg, client_mods=[egress_log(tmp_path / "egress"),
                                         ingress_log(tmp_path / "ingress")])
    assert (run_dir / "mlflow.db").is_file()

    sent = [json.loads(p.read_text()) for p in sorted((tmp_path / "ingress").glob("*.json"))]
    replies = [json.loads(p.read_text()) for p in (tmp_path / "egress").glob("*.json")]
    train = [r for r in replies if r.get("message_type", "").startswith("train")]
    assert len(sent) == 4 and len(train) == 4 and not any(s["frozen"] for s in sent)
    key_sets = [set(s["arrays"]) for s in sent] + [set(r["records"]["arrays"]) for r in train]
    phases = {"pretrain": [k for k in key_sets if any(x.startswith("dino_head.") for x in k)],
              "finetune": [k for k in key_sets if not any(x.startswith("dino_head.") for x in k)]}
    assert len(phases["pretrain"]) == 4 and len(phases["finetune"]) == 4
    for phase, sets in phases.items():
        for keys in sets:
            assert keys == sets[0]                    # the same keys both ways, every site
            assert all(_travels(k, pretraining=phase == "pretrain") for k in keys), \
                sorted(k for k in keys if not _travels(k, pretraining=phase == "pretrain"))
            assert any("lora_A" in k for k in keys) and not any("teacher" in k for k in keys)
            assert len(keys) < n_base + 10            # never the base's tensors
    # fine-tuning started from phase 1's global backbone, adapters included
    from server.checkpoint import latest_weights

    pre = latest_weights(run_dir / "pretrain")
    fine_start = {k[len("backbone."):]: v for k, v in pre.items() if k.startswith("backbone.")}
    assert any("lora_B" in k and torch.as_tensor(v).abs().max() > 0
               for k, v in fine_start.items())


def test_clip_from_a_saved_clip_pair_with_its_tokenizer(tiny_sites, tmp_path):
    """Image-report pretraining from a CLIPModel directory holding its own tokenizer (here the
    shipped report vocabulary, copied in): text-tower adapters and the temperature travel
    beside the image tower's; neither tower's base nor the projections do. Then fine-tuning
    of the image tower as a classifier: its adapters, new parts and head only."""
    import shutil

    from models.text import DEFAULT_TOKENIZER_DIR, load_tokenizer, pad_id, vocab_size

    encoders = tmp_path / "encoders"
    tokenizer = load_tokenizer(DEFAULT_TOKENIZER_DIR)
    torch.manual_seed(0)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=64, vocab_size=vocab_size(tokenizer),
                max_position_embeddings=32, pad_token_id=pad_id(tokenizer),
                bos_token_id=tokenizer.token_to_id("[CLS]"),
                eos_token_id=tokenizer.token_to_id("[SEP]"))
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8, intermediate_size=64)
    pair = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                          projection_dim=16))
    pair.save_pretrained(encoders / "clip-tiny")
    n_base = len(pair.state_dict())
    shutil.copy(DEFAULT_TOKENIZER_DIR / "tokenizer.json", encoders / "clip-tiny")
    cfg = load_experiment([
        "model=foundation", "model.options.weights=clip-tiny",
        f"model.foundation_dir={encoders}", "model.options.lora_rank=2",
        "pretrain=clip", "pretrain.num_rounds=1", "pretrain.options.max_length=32",
        "task.image_size=32", "federation=sim2", "federation.num_rounds=1",
        "train.local_epochs=1", "train.batch_size=8", f"data.root={tiny_sites}",
        f"runs_dir={tmp_path / 'runs'}", "name=foundation-clip"])
    run_dir = simulate(cfg, client_mods=[egress_log(tmp_path / "egress"),
                                         ingress_log(tmp_path / "ingress")])
    sent = [json.loads(p.read_text()) for p in (tmp_path / "ingress").glob("*.json")]
    replies = [json.loads(p.read_text()) for p in (tmp_path / "egress").glob("*.json")]
    train = [r for r in replies if r.get("message_type", "").startswith("train")]
    assert len(sent) == 4 and len(train) == 4 and not any(s["frozen"] for s in sent)
    key_sets = [set(s["arrays"]) for s in sent] + [set(r["records"]["arrays"]) for r in train]
    pretraining = [k for k in key_sets if "logit_scale" in k]
    assert len(pretraining) == 4
    for keys in pretraining:
        assert keys == pretraining[0]
        outside = sorted(k for k in keys if not ("lora_" in k or k == "logit_scale" or (
            k.startswith("backbone.") and k[len("backbone."):].startswith(NEW_PARTS))))
        assert not outside, outside
        assert any(k.startswith("text.") and "lora_B" in k for k in keys)
        assert not any("projection" in k and "lora_" not in k for k in keys)
    finetuning = [k for k in key_sets if "logit_scale" not in k]
    assert len(finetuning) == 4
    for keys in finetuning:
        assert keys == set(trainable_shapes(cfg))     # the classifier's, both ways
        assert all(_travels(k, pretraining=False) for k in keys), \
            sorted(k for k in keys if not _travels(k, pretraining=False))
        assert any("lora_A" in k for k in keys) and any(k.startswith("head.") for k in keys)
        assert not any("text" in k or "projection" in k for k in keys)
        assert len(keys) < n_base
    # weights out: the pretraining version carries the whole pair in CLIP's own format
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    (version,) = client.search_model_versions(f"name='{cfg.pretrain.registered_model}'")
    pair_dir = client.download_artifacts(version.run_id, f"{version.tags['weights']}/pair",
                                         str(tmp_path / "out"))
    exported = transformers.CLIPModel.from_pretrained(pair_dir, use_safetensors=True)
    assert exported.text_projection.out_features == 16
    assert (Path(pair_dir) / "tokenizer.json").read_bytes() == \
        (encoders / "clip-tiny" / "tokenizer.json").read_bytes()
