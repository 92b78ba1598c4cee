"""A pretrained MONAI SwinUNETR fine-tuned with LoRA (``models/foundation/swin.py``): DP-SGD's
per-sample gradients are exact for every trainable module (2D and 3D, float64), a short DP run
goes through the engine, and what a registered version holds serves and exports like the
round's model."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

from client.privacy.persample import PerSampleClipper, UnsupportedLayerError
from models.foundation.monai_nets import SWIN_UNETR_TYPE, save_monai

from .test_foundation import assert_clipped_sum, looped_per_sample, views_of

# depth 2 in the first stage: its second block attends in SHIFTED windows (masked, rolled)
SWIN2D = dict(in_channels=1, out_channels=2, feature_size=12, depths=[2, 1, 1, 1],
              num_heads=[1, 1, 2, 2], window_size=4, spatial_dims=2)
SWIN3D = dict(in_channels=1, out_channels=3, feature_size=12, depths=[2, 1, 1, 1],
              num_heads=[1, 1, 2, 2], window_size=2, spatial_dims=3)
S = 3
ATOL = 1e-10


def _segmenter(tmp_path, args: dict, **options):
    from models.tasks import build

    torch.manual_seed(0)
    save_monai(SwinUNETR(**args), args, tmp_path / "swin", model_type=SWIN_UNETR_TYPE)
    options = {"weights": "swin", "num_channels": S, "image_size": 64,
               "spatial_dims": args["spatial_dims"], "lora_rank": 2} | options
    return build("foundation_swin", options, "segmentation", {}, foundation_dir=tmp_path)


def test_a_meta_device_build_has_the_real_builds_parameters(tmp_path):
    """The site's size check (client.queries ``check_model_size``) builds on the meta device."""
    model, _ = _segmenter(tmp_path, SWIN2D)
    from models.tasks import build
    with torch.device("meta"):
        sized, _ = build("foundation_swin", {"weights": "swin", "num_channels": S,
                                             "image_size": 64, "spatial_dims": 2,
                                             "lora_rank": 2}, "segmentation", {},
                         foundation_dir=tmp_path)
    assert ({k: tuple(v.shape) for k, v in sized.named_parameters()}
            == {k: tuple(v.shape) for k, v in model.named_parameters()})


def _batch(n: int, spatial: tuple[int, ...], dtype=torch.float64, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    present = torch.ones(n, S, dtype=torch.bool)
    present[0, 1] = False
    dims = len(spatial)
    images = torch.randn((n, S, *spatial), generator=g, dtype=dtype) \
        * present.reshape(n, S, *[1] * dims)
    mask = (torch.rand((n, *spatial), generator=g) > 0.8).long()
    return {"image": images, "present": present, "mask": mask,
            "has_mask": torch.ones(n, dtype=torch.long)}


def _randomise_trainable(model, seed: int = 0) -> None:
    """LoRA's B starts at zero: random values make every gradient visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def _summed(model, task, batch):
    out = task.step(model, batch)
    return out.loss * out.n


@pytest.mark.parametrize("args", [SWIN2D, pytest.param(SWIN3D, marks=pytest.mark.slow)],
                         ids=["2d", "3d"])             # 3D: ~20 s of float64 convolutions
def test_per_sample_gradients_of_the_swin_lora_fine_tune_are_exact(tmp_path, args):
    model, task = _segmenter(tmp_path, args)
    assert model.dp_unsupported is None
    model = model.double().train()
    _randomise_trainable(model)
    dims = args["spatial_dims"]
    # 3D: 64 x 32 x 32 keeps 2 voxels at 1/32 (InstanceNorm needs more than one when training)
    batch = _batch(2, (64, 32, 32) if dims == 3 else (64, 64))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    kinds = {type(m).__name__ for m in model.modules()
             if any(p.requires_grad for p in m.parameters(recurse=False))}
    assert {"Linear", f"Conv{dims}d", f"ConvTranspose{dims}d"} <= kinds, kinds
    individual, norms = looped_per_sample(model, lambda b: _summed(model, task, b), batch, 2)
    model.zero_grad(set_to_none=True)
    _summed(model, task, batch).backward()
    for name, p in params.items():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(individual[0][name] + individual[1][name], p.grad,
                                   rtol=0, atol=ATOL, msg=name)      # per-sample sum = batch
    model.zero_grad(set_to_none=True)
    c = float(norms.mean())                   # clips one sample, not the other
    assert_clipped_sum(model, lambda b: _summed(model, task, b), batch, individual, norms, c,
                       ATOL)


@pytest.mark.parametrize("args", [SWIN2D, pytest.param(SWIN3D, marks=pytest.mark.slow)],
                         ids=["2d", "3d"])
def test_checkpointed_swin_blocks_keep_fewer_activations_and_exact_per_sample_gradients(
        tmp_path, args):
    """``gradient_checkpointing``: every SwinTransformerBlock keeps only its input; the
    gradients and DP-SGD's clipped per-sample sum are those of the plain model (3D: the
    shifted windows and their mask in three axes)."""
    from monai.networks.nets.swin_unetr import SwinTransformerBlock

    from models.checkpointing import counting_saved_activations, is_checkpointed

    batch = _batch(2, (64, 32, 32) if args["spatial_dims"] == 3 else (64, 64))
    kept, grads = [], []
    for on in (False, True):
        model, task = _segmenter(tmp_path / str(on), args, gradient_checkpointing=on)
        model = model.double().train()
        _randomise_trainable(model)
        blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock)]
        assert len(blocks) == 5 and all(is_checkpointed(b) == on for b in blocks)
        assert model.dp_unsupported is None
        with counting_saved_activations(model) as saved:
            loss = _summed(model, task, batch)
        loss.backward()
        kept.append(saved["bytes"])
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    # the convolutional decoder keeps the rest: measured 0.69x (2D), 0.81x (3D: full-size
    # volumes through its convolutions)
    assert kept[1] < (0.75 if args["spatial_dims"] == 2 else 0.85) * kept[0], kept
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=ATOL, msg=name)
    model.zero_grad(set_to_none=True)
    individual, norms = looped_per_sample(model, lambda b: _summed(model, task, b), batch, 2)
    assert_clipped_sum(model, lambda b: _summed(model, task, b), batch, individual, norms,
                       float(norms.mean()), ATOL)


def test_swin_window_folds_and_augmented_views_group_together(tmp_path):
    """Window attention folds windows into the batch of rows that already hold each sample's
    views (augmentation multiplicity): sample i is rows ``i*views*windows ..``, still exact."""
    model, task = _segmenter(tmp_path, SWIN2D)
    model = model.double().train()
    _randomise_trainable(model)
    rows = views_of(_batch(2, (64, 64)), 2)

    def loss(b):
        return _summed(model, task, b) / 2
    individual, norms = looped_per_sample(model, loss, rows, 2, views=2)
    assert_clipped_sum(model, loss, rows, individual, norms, float(norms.mean()), ATOL, views=2)


def test_swin_fine_tunes_dp_sgd_does_not_cover_are_refused_with_one_line(tmp_path):
    full, _ = _segmenter(tmp_path / "a", SWIN2D, method="full")
    assert "method=lora" in full.dp_unsupported
    with pytest.raises(UnsupportedLayerError, match=r"attn \(WindowAttention\)"):
        PerSampleClipper(full, 1.0)           # the site's clipper refuses it too, by name
    batch_norm, _ = _segmenter(tmp_path / "b", SWIN2D | {"norm_name": "batch"})
    assert "'batch'" in batch_norm.dp_unsupported
    with pytest.raises(UnsupportedLayerError, match=r"BatchNorm2d"):
        PerSampleClipper(batch_norm, 1.0)
    checkpointed, _ = _segmenter(tmp_path / "c", SWIN2D | {"use_checkpoint": True})
    assert "use_checkpoint" in checkpointed.dp_unsupported
    for reason in (full.dp_unsupported, batch_norm.dp_unsupported):
        assert "\n" not in reason


def test_a_short_dp_sgd_run_through_the_engine_trains_the_swin_adapters(tmp_path):
    from client.engine import Engine
    from client.privacy.dpsgd import DPSGDConfig
    from protocol.job import TrainConfig

    model, task = _segmenter(tmp_path, SWIN2D)
    data = [{k: v[0] for k, v in _batch(1, (64, 64), torch.float32, seed=i).items()}
            for i in range(4)]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    privacy = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                          secure_mode=False, seed=3)
    metrics = Engine(task, torch.device("cpu")).fit(
        model, data, TrainConfig(lr=1e-3, local_epochs=1, seed=0), privacy)
    assert metrics["steps"] == 2
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable               # every adapter/decoder weight, nothing frozen
