"""``servable`` merges LoRA adapters into the plain classifier it exports; a model without
adapters needs no ``peft`` import to find that out (``merge_adapters``)."""

from __future__ import annotations

import torch

from models.serving import servable
from models.tasks import build
from models.vit import MultiModalViT

TINY = {"dim": 32, "depth": 1, "heads": 2, "img_size": 32, "patch_size": 8, "num_classes": 3}


def test_lora_adapters_are_merged_into_the_exported_classifier():
    torch.manual_seed(0)
    model, _ = build("mmvit", TINY, "classification", {"mode": "lora"})
    # trained adapters (peft initialises B to zero, which would hide a missing merge)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    exported = servable(model).eval()
    assert type(exported.model) is MultiModalViT       # a plain ViT, no peft wrapper left
    assert not any("lora" in k for k in exported.state_dict())
    x = torch.randn(2, model.config.num_sequences, 32, 32,
                    generator=torch.Generator().manual_seed(1))
    present = torch.ones(2, model.config.num_sequences, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model.eval()(x, present).softmax(-1),
                                   rtol=1e-5, atol=1e-6)


def test_a_unetr_on_our_vit_is_served_as_a_segmenter_of_its_voxels():
    """The lesion_seg task's own network (UNETR decoder on the multi-modal ViT) is a
    segmenter: per-voxel probabilities of the trained model, not the ViT's pooled features."""
    from models.serving import ExportedSegmenter

    torch.manual_seed(0)
    model, _ = build("mmvit", TINY, "segmentation", {})
    exported = servable(model).eval()
    assert isinstance(exported, ExportedSegmenter)
    s = model.backbone.config.num_sequences
    assert exported.input_shape == (s, 32, 32)
    x = torch.randn(2, s, 32, 32, generator=torch.Generator().manual_seed(1))
    x[0, 1] = 0                                 # an absent sequence: an all-zero channel
    present = x.flatten(2).abs().amax(-1) > 0
    with torch.no_grad():
        expected = model.eval()(x, present).softmax(1)
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)
    assert expected.shape == (2, 2, 32, 32)
    # a copy: the served model does not change when training goes on
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
        torch.testing.assert_close(exported(x), expected, rtol=1e-5, atol=1e-6)
