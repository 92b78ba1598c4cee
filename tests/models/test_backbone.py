"""The backbone contract's checks (``models.backbone``): what the contract test and the site's
search for a token backbone rely on."""

from __future__ import annotations

from torch import nn

from models.backbone import Backbone, TokenBackbone, implements, missing_members
from models.vit import MultiModalViT, ViTConfig


class _NoPool(MultiModalViT):
    """A token backbone but for ``pool``, which is not a method here."""

    pool = None


class _Whole(nn.Module):
    """A whole network: ``Backbone``'s members, no tokens."""

    head = None
    public_constants = ()

    def __init__(self):
        super().__init__()
        self.config = ViTConfig()

    @property
    def input_shape(self):
        return (4, 64, 64)

    def forward(self, images, present):
        return images


def test_a_missing_or_uncallable_member_is_named():
    tiny = ViTConfig(dim=32, depth=1, heads=2, img_size=32, patch_size=8)
    assert missing_members(MultiModalViT(tiny), TokenBackbone) == []
    assert missing_members(_NoPool(tiny), TokenBackbone) == ["pool"]
    whole = _Whole()
    assert missing_members(whole, Backbone) == []
    assert missing_members(whole, TokenBackbone) == ["attention_mask", "forward_features",
                                                     "layout", "pool", "register_tokens"]
    del whole.config
    assert missing_members(whole, Backbone) == ["config"]


def test_implements_reads_the_class_not_the_members():
    """A property that fails when read still counts as declared: the error surfaces where the
    member is read, never as "not a token backbone"."""

    class Failing(MultiModalViT):
        @property
        def register_tokens(self):
            raise AttributeError("unreadable")

    failing = Failing(ViTConfig(dim=32, depth=1, heads=2, img_size=32, patch_size=8))
    assert implements(failing, TokenBackbone) and implements(_Whole(), Backbone)
    assert not implements(_Whole(), TokenBackbone) and not implements(nn.Linear(2, 2), Backbone)
