"""``freeze_lora_a`` (FFA-LoRA): every ``lora_A`` kept at its seeded init and only ``lora_B``
trains - off by default, on: A never trains and never travels, is part of the base digest
(sites with another A are refused), the same seed gives every site the same A, the average of
the sites' B times their shared A is exactly the average of their updates, A is drawn from
its name (the same at every site and the server whatever their RNG state), DP-SGD's per-sample rule
stays exact, and the export records it."""

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


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffa")
    for family in FAMILIES:
        _save(family, root / family)
    return {family: root / family for family in FAMILIES}


def _keys(model, part: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if f".{part}." in n}


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_on_only_lora_a_stops_training_and_the_model_is_the_same(weights, family, method):
    torch.manual_seed(0)
    off = _build(weights[family], method=method, channel_tokens="fused").eval()
    torch.manual_seed(0)
    on = _build(weights[family], method=method, channel_tokens="fused",
                freeze_lora_a=True).eval()
    a, b = _keys(on, "lora_A"), _keys(on, "lora_B")
    assert a and b and a <= set(trainable_keys(off))
    assert set(trainable_keys(on)) == set(trainable_keys(off)) - a
    # the rest as before; A redrawn as peft draws it (Kaiming-uniform, bound 1/sqrt(fan in))
    assert all(torch.equal(v, on.state_dict()[k]) for k, v in off.state_dict().items()
               if ".lora_A." not in k)
    for name, p in on.named_parameters():
        if ".lora_A." in name:
            assert 0 < p.abs().max() <= p.shape[1] ** -0.5
    assert base_digest(on) != base_digest(off)             # A is now part of the base
    batch = _batch()
    with torch.no_grad():                                  # B = 0: the base model's outputs
        torch.testing.assert_close(on(batch["image"], batch["present"]),
                                   off(batch["image"], batch["present"]), rtol=0, atol=0)


def test_only_lora_methods_take_it(weights):
    for method in ("full", "linear_probe", "ia3"):
        with pytest.raises(ValueError, match="freeze_lora_a"):
            _build(weights["dinov2"], method=method, freeze_lora_a=True)
    with pytest.raises(ValueError, match="freeze_lora_a must be true or false"):
        _build(weights["dinov2"], freeze_lora_a="false")


def test_a_never_trains_never_travels_and_every_builder_gets_the_same_a(weights):
    options = {"weights": "dinov2", "num_channels": 4, "image_size": 32, "method": "lora",
               "channel_tokens": "fused", "freeze_lora_a": True}
    digests = []
    for site in range(2):
        # whatever the builder's RNG drew before (the server builds other things first: the
        # preflight refused the first bench run when A came from the global RNG)
        torch.manual_seed(7 + site)
        model, task = build("foundation", options, "classification", {},
                            foundation_dir=weights["dinov2"].parent)
        digests.append(base_digest(model))
        a = _keys(model, "lora_A")
        assert a and not a & expected_arrays(model, [])           # never sent
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        batch = _batch()
        data = [{"image": batch["image"][i], "present": batch["present"][i],
                 "label": batch["label"][i]} for i in range(2)]
        Engine(task, torch.device("cpu")).fit(model, data, TrainConfig(
            local_epochs=2, lr=0.1, batch_size=2))
        after = dict(model.named_parameters())
        assert all(torch.equal(after[n], before[n]) for n in a)
        assert any(not torch.equal(after[n], before[n]) for n in _keys(model, "lora_B"))
    assert digests[0] == digests[1]
    other, _ = build("foundation", options, "classification", {},
                     foundation_dir=weights["dinov2"].parent)
    with torch.no_grad():              # a site whose A is not the coordinator's: refused
        next(p for n, p in other.named_parameters() if ".lora_A." in n).view(-1)[0] += 1e-3
    assert base_digest(other) != digests[0]


def test_the_sites_averaged_b_gives_exactly_the_average_of_their_updates(weights):
    """Why it is meant for federated LoRA: three sites (each its own RNG state) train their
    own B; FedAvg's mean of B times the A each site holds equals the mean of the sites'
    updates B_k A_k - because every site holds the same A (drawn from the RNG, as before the
    fix, the A_k differ and the two disagree)."""
    sites = []
    for k in range(3):
        torch.manual_seed(100 + k)
        model = _build(weights["dinov2"], method="lora", lora_rank=2, channel_tokens="fused",
                       freeze_lora_a=True).double()
        _randomise_trainable(model, seed=k)        # each site's own trained B
        sites.append(dict(model.named_parameters()))
    names = [n for n in sites[0] if ".lora_B." in n]
    assert names
    for b_name in names:
        a_name = b_name.replace(".lora_B.", ".lora_A.")
        mean_b = torch.stack([s[b_name].detach() for s in sites]).mean(0)
        updates = torch.stack([s[b_name].detach() @ s[a_name].detach() for s in sites])
        torch.testing.assert_close(mean_b @ sites[0][a_name].detach(), updates.mean(0),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rank", [1, 2])
def test_per_sample_gradients_stay_exact_with_lora_a_frozen(weights, family, rank):
    torch.manual_seed(0)
    model = _build(weights[family], method="lora", lora_rank=rank, channel_tokens="fused",
                   freeze_lora_a=True).double().train()
    assert model.dp_unsupported is None and not _keys(model, "lora_A") & set(
        trainable_keys(model))
    _randomise_trainable(model)
    assert_exact_per_sample(model, _batch(dtype=torch.float64))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_export_records_it_and_reloads_the_same_model(weights, family, tmp_path):
    torch.manual_seed(0)
    model = _build(weights[family], method="lora", lora_rank=2, channel_tokens="fused",
                   freeze_lora_a=True)
    _randomise_trainable(model, seed=3)       # A keeps its init, B and the rest move
    model.eval()
    out = export_foundation(model, tmp_path / "export")
    assert '"freeze_lora_a": true' in (out / ADAPTATION_CONFIG).read_text()
    again = load_export(out)
    assert again.config.freeze_lora_a
    batch = _batch()
    with torch.no_grad():
        torch.testing.assert_close(again(batch["image"], batch["present"]),
                                   model(batch["image"], batch["present"]), rtol=0, atol=1e-4)


def test_a_is_the_same_on_any_device_and_dtype_and_a_meta_model_draws_nothing():
    from models.foundation.lora import fixed_init_

    values = []
    for dtype in (torch.float32, torch.float64):
        w = torch.nn.Parameter(torch.zeros(4, 16, dtype=dtype))
        fixed_init_("encoder.layer.0.q.lora_A.default.weight", w)
        values.append(w.detach().float())
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)
    other = torch.nn.Parameter(torch.zeros(4, 16))
    fixed_init_("encoder.layer.1.q.lora_A.default.weight", other)
    assert not torch.equal(other.detach(), values[0])          # each A its own draw
    meta = torch.nn.Parameter(torch.empty(4, 16, device="meta"))
    fixed_init_("encoder.layer.0.q.lora_A.default.weight", meta)   # sized, not drawn
    assert meta.is_meta
