"""``freeze_patch_embed``: the new patch embedding kept at its pretrained-derived init - off by
default (what trains and what the model computes as before), on: frozen whatever the method
(the channel/presence embeddings, adapters and head still train), never in the travelling set,
in the base digest, exported and read back, and DP-SGD's per-sample rule still exact."""

from __future__ import annotations

import pytest
import torch

from client.engine import Engine
from client.foundation import expected_arrays
from models.foundation import base_digest
from models.foundation.export import ADAPTATION_CONFIG, export_foundation, load_export
from models.foundation.lora import trainable_keys
from models.tasks import build
from protocol.job import TrainConfig

from .test_foundation import _batch, _build, _randomise_trainable, _save, assert_exact_per_sample

FAMILIES = ("dinov2", "siglip", "monai_vit")     # with and without a CLS token, HF and MONAI
TOKENS = ("per_channel", "fused")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("freeze")
    for family in FAMILIES:
        _save(family, root / family)
    return {family: root / family for family in FAMILIES}


def _patch_keys(model) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith("patch_embed.")}


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("family", FAMILIES)
def test_off_by_default_trains_and_computes_as_before(weights, family, tokens):
    torch.manual_seed(0)
    default = _build(weights[family], channel_tokens=tokens).eval()
    torch.manual_seed(0)
    off = _build(weights[family], channel_tokens=tokens, freeze_patch_embed=False).eval()
    assert trainable_keys(default) == trainable_keys(off)
    assert _patch_keys(default) and _patch_keys(default) <= set(trainable_keys(default))
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(off(batch["image"], batch["present"]),
                                   default(batch["image"], batch["present"]), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "full", "dora", "linear_probe"])
@pytest.mark.parametrize("tokens", TOKENS)
def test_on_only_the_patch_embedding_stops_training(weights, tokens, method):
    torch.manual_seed(0)
    off = _build(weights["dinov2"], channel_tokens=tokens, method=method).eval()
    torch.manual_seed(0)
    on = _build(weights["dinov2"], channel_tokens=tokens, method=method,
                freeze_patch_embed=True).eval()
    patch = _patch_keys(on)
    assert patch and not patch & set(trainable_keys(on))
    assert set(trainable_keys(on)) == set(trainable_keys(off)) - patch
    # the same pretrained-derived init, the same outputs: only what trains differs
    assert all(torch.equal(v, on.state_dict()[k]) for k, v in off.state_dict().items())
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(on(batch["image"], batch["present"]),
                                   off(batch["image"], batch["present"]), rtol=0, atol=0)


@pytest.mark.parametrize("tokens", TOKENS)
def test_the_frozen_patch_embedding_never_trains_and_never_travels(weights, tokens):
    options = {"weights": "dinov2", "num_channels": 4, "image_size": 32, "method": "lora",
               "channel_tokens": tokens}
    kinds = {}
    for freeze in (False, True):
        model, task = build("foundation", options | {"freeze_patch_embed": freeze},
                            "classification", {}, foundation_dir=weights["dinov2"].parent)
        patch = {n for n in dict(model.named_parameters()) if ".patch_embed." in f".{n}"}
        assert patch
        kinds[freeze] = patch & expected_arrays(model, [])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        batch = _batch()
        data = [{"image": batch["image"][i], "present": batch["present"][i],
                 "label": batch["label"][i]} for i in range(2)]
        Engine(task, torch.device("cpu")).fit(model, data, TrainConfig(
            local_epochs=1, lr=0.1, batch_size=2))
        after = dict(model.named_parameters())
        moved = {n for n in patch if not torch.equal(after[n], before[n])}
        head = [n for n in after if n.endswith("head.weight")]
        assert not torch.equal(after[head[0]], before[head[0]])      # the step happened
        assert moved == (set() if freeze else patch)
    assert kinds[False] and not kinds[True]       # sent when it trains, never when frozen


@pytest.mark.parametrize("tokens", TOKENS)
def test_the_frozen_patch_embedding_is_part_of_the_base_digest(weights, tokens):
    def digest(freeze: bool, nudge: bool) -> str:
        model = _build(weights["dinov2"], channel_tokens=tokens, freeze_patch_embed=freeze)
        if nudge:      # a site whose patch embedding is not the coordinator's
            first = next(p for n, p in model.named_parameters() if n.startswith("patch_embed"))
            with torch.no_grad():
                first.view(-1)[0] += 1e-3
        return base_digest(model)

    on = digest(True, nudge=False)
    assert digest(True, nudge=False) == on                  # deterministic init: sites agree
    assert digest(True, nudge=True) != on                   # a different one is refused
    assert digest(False, nudge=False) != on                 # off: not in the base
    assert digest(False, nudge=True) == digest(False, nudge=False)   # off: it trains, not base


@pytest.mark.parametrize("family", FAMILIES)
def test_the_export_records_it_and_reloads_the_same_model(weights, family, tmp_path):
    torch.manual_seed(0)
    model = _build(weights[family], method="lora", lora_rank=2, channel_tokens="fused",
                   freeze_patch_embed=True)
    _randomise_trainable(model, seed=3)       # the patch embedding keeps its init
    model.eval()
    out = export_foundation(model, tmp_path / "export")
    assert '"freeze_patch_embed": true' in (out / ADAPTATION_CONFIG).read_text()
    again = load_export(out)
    assert again.config.freeze_patch_embed
    torch.testing.assert_close(again.patch_embed.weight, model.patch_embed.weight,
                               rtol=0, atol=0)
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(batch["image"], batch["present"]),
                                   model(batch["image"], batch["present"]), rtol=0, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("rank", [1, 2])
def test_per_sample_gradients_stay_exact_with_a_frozen_patch_embedding(weights, family, tokens,
                                                                      rank):
    torch.manual_seed(0)
    model = _build(weights[family], method="lora", lora_rank=rank, channel_tokens=tokens,
                   freeze_patch_embed=True).double().train()
    assert model.dp_unsupported is None and not _patch_keys(model) & set(trainable_keys(model))
    _randomise_trainable(model)
    assert_exact_per_sample(model, _batch(dtype=torch.float64))


def test_a_non_boolean_is_refused(weights):
    with pytest.raises(ValueError, match="freeze_patch_embed must be true or false"):
        _build(weights["dinov2"], freeze_patch_embed="false")
