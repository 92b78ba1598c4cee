"""MM-DINOv2's anti-collapse pieces: cosine prototypes, Sinkhorn-Knopp centring, KoLeo."""

from __future__ import annotations

import math

import pytest
import torch

import torch.nn.functional as F

from models.dino import (DINOConfig, MMDINOTask, ProjectionHead, blank_patches, ibot_token_mask,
                         koleo_loss, sinkhorn_knopp)
from models.vit import MultiModalViT, ViTConfig, _init_weights, patchify


def test_prototype_scores_are_cosines_whatever_the_prototypes_norm():
    # with a plain linear layer, weight decay shrinking the prototypes shrinks every score
    # and flattens the teacher's targets towards uniform
    torch.manual_seed(0)
    config = DINOConfig()
    head = ProjectionHead(32, config)
    head.apply(_init_weights)
    x = torch.randn(16, 32)
    scores = head(x)
    assert scores.abs().max() <= 1 + 1e-5
    with torch.no_grad():
        head.prototypes.weight.mul_(1e-3)
    assert torch.allclose(head(x), scores, atol=1e-5)
    probs = torch.softmax(scores / config.teacher_temp, dim=-1)
    entropy = -(probs * probs.log()).sum(-1).mean()
    assert entropy < 0.95 * math.log(config.out_dim)


def test_sinkhorn_targets_are_distributions_that_use_every_prototype_equally():
    torch.manual_seed(1)
    scores = torch.randn(64, 16) * 0.3 + torch.linspace(0, 1, 16)   # prototypes 15 favoured
    converged = sinkhorn_knopp(scores, temp=0.04, iterations=50)
    assert torch.allclose(converged.sum(1), torch.ones(64), atol=1e-5)
    assert torch.allclose(converged.sum(0), torch.full((16,), 64 / 16), rtol=0.01)
    targets = sinkhorn_knopp(scores, temp=0.04, iterations=3)   # DINOv2's default: near it
    assert torch.allclose(targets.sum(1), torch.ones(64), atol=1e-5)
    assert targets.sum(0).min() > 0.4 * 64 / 16
    plain = torch.softmax(scores / 0.04, dim=-1)
    assert plain.sum(0).min() < 1e-3 * 64 / 16              # without it: prototypes unused
    identical = sinkhorn_knopp(scores[:1].expand(8, -1), temp=0.04, iterations=3)
    assert torch.allclose(identical, torch.full_like(identical, 1 / 16), atol=1e-4)


def test_koleo_penalises_clustered_features_and_pushes_them_apart():
    torch.manual_seed(2)
    spread = torch.randn(32, 8)
    clustered = torch.randn(1, 8) + 0.01 * torch.randn(32, 8)
    assert koleo_loss(clustered).mean() > koleo_loss(spread).mean() + 2
    x = clustered.clone().requires_grad_(True)
    koleo_loss(x).mean().backward()
    moved = torch.nn.functional.normalize(x - 0.1 * x.grad, dim=-1)
    before = torch.nn.functional.normalize(clustered, dim=-1)
    assert torch.cdist(moved, moved).mean() > torch.cdist(before, before).mean()


def test_head_centring_gives_studies_that_share_most_content_distinct_targets():
    # CLS features of one anatomy had cosine ~0.98: without centring every teacher target was
    # nearly uniform and the DINO loss stayed at ln(out_dim)
    torch.manual_seed(4)
    x = 5 * torch.randn(1, 32) + 0.2 * torch.randn(16, 32)
    plain = ProjectionHead(32, DINOConfig(head_centring=False))
    plain.apply(_init_weights)
    centred = ProjectionHead(32, DINOConfig(head_centring=True))
    centred.load_state_dict(plain.state_dict())

    def entropy(head):
        q = sinkhorn_knopp(head(x), DINOConfig().teacher_temp, 3)
        return float(-(q * q.log()).sum(-1).mean())

    uniform = math.log(DINOConfig().out_dim)
    assert entropy(plain) > 0.97 * uniform
    assert entropy(centred) < 0.8 * uniform
    patches = centred(x.reshape(4, 4, 32))             # iBOT: centred over every token
    assert torch.allclose(patches.reshape(16, -1), centred(x), atol=1e-5)
    one = centred(x[:1])                               # nothing to centre on: left as is
    assert torch.allclose(one, plain(x[:1]), atol=1e-6)


def _tiny_backbone() -> MultiModalViT:
    return MultiModalViT(ViTConfig(dim=32, depth=1, heads=2, img_size=32, patch_size=8,
                                   num_classes=3, sequence_fusion=True))


@pytest.mark.parametrize("options", [{"centering": "median"}, {"sinkhorn_iterations": 0},
                                     {"koleo_weight": -1.0}, {"pseudo_label_threshold": 0.2},
                                     {"pseudo_label_weight": -1},
                                     {"pseudo_label_threshold": 1.5}])
def test_bad_centring_and_pseudo_label_options_are_refused(options):
    with pytest.raises(ValueError):
        DINOConfig(**options)


def test_the_class_head_takes_the_shared_options_and_no_other():
    """The class head's classification config is built from the options the two configs share
    (``ClassHeadConfig``) and nothing else: DINO's ``pseudo_label_threshold`` (the teacher's,
    0.8) has a namesake there that would switch on the head task's own pseudo-labelling."""
    from models.tasks import ClassificationConfig

    task = MMDINOTask(DINOConfig(num_classes=4, label_smoothing=0.1, label_fraction=0.5))
    assert task.config == ClassificationConfig(num_classes=4, label_smoothing=0.1,
                                               label_fraction=0.5)
    assert task.data_needs.label_fraction == 0.5


def test_semi_supervised_loss_is_the_mean_cross_entropy_on_the_uncorrupted_labelled_studies():
    # crops, blanked patches and a removed sequence can take the lesion out of the view, so the
    # class head learns from the studies as given; the mean runs over the labelled ones only
    torch.manual_seed(3)
    backbone = _tiny_backbone()
    task = MMDINOTask(DINOConfig(local_crops=1, supervised_weight=2.0, pseudo_label_weight=0))
    model = task.wrap(backbone)
    present = torch.ones(8, 4, dtype=torch.bool)
    present[0, 3] = False
    images = torch.randn(8, 4, 32, 32) * present[:, :, None, None]
    labels = torch.tensor([0, 1, 2, -1, -1, -1, -1, -1])

    def loss(label):
        torch.manual_seed(4)                        # the same crops and masks both times
        return task.step(model, {"image": images, "present": present, "label": label}).loss

    unlabelled = loss(torch.full_like(labels, -1))
    labelled = loss(labels)
    expected = F.cross_entropy(model.backbone(images[:3], present[:3]), labels[:3])
    assert torch.allclose(labelled - unlabelled, 2.0 * expected, atol=1e-5)


def test_pseudo_labels_are_the_confident_teacher_predictions_on_unlabelled_studies():
    torch.manual_seed(5)
    backbone = _tiny_backbone()
    images, present = torch.randn(6, 4, 32, 32), torch.ones(6, 4, dtype=torch.bool)
    labels = torch.tensor([1, -1, -1, -1, -1, -1])

    def loss(**options):
        task = MMDINOTask(DINOConfig(local_crops=1, **options))
        torch.manual_seed(6)                     # the same projection heads, crops and masks
        model = task.wrap(backbone)              # first step: the teacher is this model
        out = task.step(model, {"image": images, "present": present, "label": labels})
        return out.loss, out.metrics

    off, _ = loss(pseudo_label_weight=0.0)
    every, metrics = loss(pseudo_label_weight=1.0, pseudo_label_threshold=1 / 3)
    none, _ = loss(pseudo_label_weight=1.0, pseudo_label_threshold=1.0)
    logits = backbone(images[1:], present[1:])
    expected = F.cross_entropy(logits, logits.argmax(-1))     # mean over the 5 unlabelled
    assert metrics["pseudo_labelled"] == 1.0
    assert torch.allclose(every - off, expected, atol=1e-5)
    assert torch.allclose(none, off, atol=1e-6)


def test_distribution_alignment_stops_a_teacher_that_calls_everything_one_class():
    # the collapse it prevents: a teacher confident about the majority class pseudo-labels
    # every unlabelled study with it and the student follows
    torch.manual_seed(7)
    backbone = _tiny_backbone()
    with torch.no_grad():
        backbone.head.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    task = MMDINOTask(DINOConfig(local_crops=0))
    model = task.wrap(backbone)
    batch = {"image": torch.randn(8, 4, 32, 32), "present": torch.ones(8, 4, dtype=torch.bool),
             "label": torch.full((8,), -1)}
    fractions = [task.step(model, batch).metrics["pseudo_labelled"] for _ in range(60)]
    assert fractions[0] == 1.0                 # before it has seen the teacher's predictions
    assert fractions[-1] == 0.0
    state = task.site_state()                  # the running means stay at the site
    assert state["pseudo_mean"][0] > 0.85 and state["class_counts"].tolist() == [1, 1, 1]


def test_every_step_reports_the_same_metric_keys():
    # Flower refuses to aggregate metrics that some sites lack: a site whose studies are all
    # labelled (no pseudo-labels) or all unlabelled must report the same keys as the others
    torch.manual_seed(8)
    backbone = _tiny_backbone()
    task = MMDINOTask(DINOConfig(local_crops=0))
    model = task.wrap(backbone)
    images, present = torch.randn(4, 4, 32, 32), torch.ones(4, 4, dtype=torch.bool)
    keys = [set(task.step(model, {"image": images, "present": present,
                                  "label": label}).metrics)
            for label in (torch.tensor([0, 1, 2, 0]), torch.full((4,), -1),
                          torch.tensor([0, -1, 2, -1]))]
    assert keys[0] == keys[1] == keys[2]


# ---------------------------------------------------------------- iBOT's scored tokens

def test_ibot_scores_per_channel_tokens_or_per_location_over_the_kept_channels():
    """A mask that differs per channel and per sample (blank_patches' is the same for every
    channel; this one tells every axis apart): S=3 channels, N=4 locations, channel-major."""
    masked = torch.tensor([[0, 1, 0, 0,   0, 0, 0, 1,   1, 0, 0, 0],
                           [0, 0, 1, 0,   1, 0, 0, 0,   0, 0, 0, 0]], dtype=torch.bool)
    keep = torch.tensor([[True, True, False],        # sample 0: channel 2 removed
                         [False, True, True]])       # sample 1: channel 0 removed
    per_channel = ibot_token_mask(masked, keep, token_groups=3)
    assert per_channel.tolist() == [[0, 1, 0, 0,   0, 0, 0, 1,   0, 0, 0, 0],
                                    [0, 0, 0, 0,   1, 0, 0, 0,   0, 0, 0, 0]]
    fused = ibot_token_mask(masked, keep, token_groups=1)
    # a location is scored where a KEPT channel was blanked: sample 0 at 1 (channel 0) and 3
    # (channel 1), not 0 (only the removed channel 2); sample 1 at 0 (channel 1), not 2
    assert fused.tolist() == [[False, True, False, True], [True, False, False, False]]


@pytest.mark.parametrize("seed", range(3))
def test_a_fused_token_is_scored_where_blank_patches_blanked_a_kept_channel(seed):
    """The reduction against the pixels themselves: what blank_patches zeroed, read back per
    location from the crop, over the channels the student keeps."""
    g = torch.Generator().manual_seed(seed)
    b, s, size, p = 3, 4, 16, 4
    images = torch.rand(b, s, size, size, generator=g) + 0.5        # no pixel is zero
    keep = torch.rand(b, s, generator=g) < 0.6
    keep[:, 0] = True
    crop, masked = blank_patches(images, p, 0.4, generator=g)
    blanked = (patchify(crop, p, 2) == 0).all(-1)                    # [B, S, N]
    expected = (blanked & keep[:, :, None]).any(1)                    # [B, N]
    assert 0 < expected.sum() < expected.numel()
    assert torch.equal(ibot_token_mask(masked, keep, token_groups=1), expected)
    assert torch.equal(ibot_token_mask(masked, keep, token_groups=s),
                       (blanked & keep[:, :, None]).flatten(1))


def test_local_crops_are_bounded():
    """Each crop is a forward pass of every study: a job's crop count is a site's memory
    and time, so a config beyond ``MAX_LOCAL_CROPS`` is refused (at config load and at the
    site, which decodes the same config)."""
    from models.dino import MAX_LOCAL_CROPS

    DINOConfig(local_crops=MAX_LOCAL_CROPS)
    with pytest.raises(ValueError, match="local_crops must be in 0..16"):
        DINOConfig(local_crops=MAX_LOCAL_CROPS + 1)


@pytest.mark.parametrize("fused", [False, True])
def test_step_views_are_every_backbone_pass_a_step_makes(monkeypatch, fused):
    """The site's token caps count a step's passes from ``step_views``; counted here from
    the tokens each real pass returns (teacher and student): equal for unlabelled studies
    (each also gets the teacher's pseudo-label pass), fewer for labelled ones."""
    torch.manual_seed(9)
    backbone = MultiModalViT(ViTConfig(dim=32, depth=1, heads=2, img_size=32, patch_size=8,
                                       num_classes=3, sequence_fusion=fused))
    task = MMDINOTask(DINOConfig(local_crops=3, local_size=0.3))
    model = task.wrap(backbone)
    read = []
    forward_features = MultiModalViT.forward_features

    def counted(self, images, *args, **kwargs):
        tokens = forward_features(self, images, *args, **kwargs)
        read.append(tokens.shape[0] * tokens.shape[1])
        return tokens
    monkeypatch.setattr(MultiModalViT, "forward_features", counted)
    layout = backbone.layout
    views = task.step_views(layout)
    assert views == (32,) * 6 + (8,) * 3            # 0.3 x 32 is 9.6: one 8-pixel patch
    expected = sum(layout.tokens(side) for side in views)
    present = torch.ones(4, 4, dtype=torch.bool)
    for labels, equal in ((torch.full((4,), -1), True), (torch.tensor([0, 1, 2, 0]), False)):
        read.clear()
        task.step(model, {"image": torch.randn(4, 4, 32, 32), "present": present,
                          "label": labels})
        assert (sum(read) == 4 * expected) if equal else (0 < sum(read) < 4 * expected)
