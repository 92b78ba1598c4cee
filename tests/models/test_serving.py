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
