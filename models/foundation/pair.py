"""Image-report pretraining from a loaded CLIP or SigLIP pair (image and text towers).

The image tower is the multi-channel ``FoundationBackbone`` adapted from the pair's vision
encoder; the text tower, its projection, the temperature (and SigLIP's bias) are the pair's
own pretrained parts; the tokenizer is read from the SAME directory as the weights - the site's
own ``<foundation-dir>/<weights>``, never a path in the job.

Image embedding as the pair computes it: CLIP projects the post-LayerNorm CLS token with its
``visual_projection``; SigLIP pools with its attention-pooling head, here with the tokens of
absent channels masked out as keys. Loss as the pair was trained: CLIP's symmetric InfoNCE,
SigLIP's pairwise sigmoid loss (Zhai et al. 2023). Both compare every sample with the others
of its batch, so DP-SGD is refused for this objective (``CLIPTask.batch_coupling``).

What trains (the backbone's ``method``): LoRA/DoRA/IA3 adapters on both towers' attention
projections plus the image tower's new parts and the temperature/bias, or everything
(``full``). Projections and the frozen base never change at a site and never travel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..task import TaskModel
from .adapt import FoundationBackbone
from .lora import adapt_tower
from .objectives import check_pretraining


def sigmoid_loss(logits_per_image: Tensor) -> Tensor:
    """Per-sample SigLIP loss ``[B]``: minus the log-sigmoid of each image-report pair's
    logit, signed +1 on the diagonal (matching pairs) and -1 elsewhere, summed over the row;
    its mean is Hugging Face's ``SiglipModel`` loss."""
    logits = logits_per_image.float()
    signs = 2 * torch.eye(logits.shape[0], device=logits.device) - 1
    return -F.logsigmoid(signs * logits).sum(-1)


class PretrainedPair(TaskModel):
    """Image tower (``self.backbone``, what fine-tuning keeps) and the pair's text tower;
    the interface of ``models.clip.CLIPModel`` (``encode_image``, ``encode_text``,
    ``similarity_logits``, ``per_sample_loss``)."""

    def __init__(self, backbone: FoundationBackbone, parts: dict):
        super().__init__()
        self.backbone = backbone
        self.sigmoid = backbone.family == "siglip"
        self.text = parts["text_model"]
        self.text_projection = parts.get("text_projection")        # CLIP only
        self.visual_projection = parts.get("visual_projection")    # CLIP only
        self.logit_scale = parts["logit_scale"]
        self.logit_bias = parts.get("logit_bias")                  # SigLIP only
        self.tokenizer_sha256 = ""      # set by the task that reads it (part of the base digest)

    def encode_image(self, images: Tensor, present: Tensor) -> Tensor:
        """``[B, S, H, W]`` -> unit-norm embeddings ``[B, E]``."""
        tokens = self.backbone.forward_features(images, present)             # [B, T, D]
        if not self.sigmoid:
            return F.normalize(self.visual_projection(tokens[:, 0]), dim=-1)
        head = self.backbone.encoder.head         # SigLIP's attention pooling, masked keys
        probe = head.probe.expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        absent = ~self.backbone.attention_mask(present)                      # [B, T]
        pooled = head.attention(probe, tokens, tokens, key_padding_mask=absent)[0]
        pooled = pooled + head.mlp(head.layernorm(pooled))
        return F.normalize(pooled[:, 0], dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, L]`` token ids -> unit-norm embeddings ``[B, E]`` (the pair's own pooling:
        CLIP's end-of-text token, SigLIP's last position)."""
        pooled = self.text(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        if self.text_projection is not None:
            pooled = self.text_projection(pooled)
        return F.normalize(pooled, dim=-1)

    def scale(self) -> Tensor:
        return self.logit_scale.exp()

    def similarity_logits(self, image: Tensor, text: Tensor) -> Tensor:
        """``[B, E]`` x ``[C, E]`` -> ``[B, C]`` logits (SigLIP: plus its bias)."""
        logits = self.scale().float() * image.float() @ text.float().t()
        return logits + self.logit_bias.float() if self.sigmoid else logits

    def per_sample_loss(self, logits_per_image: Tensor) -> Tensor:
        from ..clip import clip_loss

        return sigmoid_loss(logits_per_image) if self.sigmoid else clip_loss(logits_per_image)

    def forward(self, images: Tensor, present: Tensor, input_ids: Tensor,
                attention_mask: Tensor) -> Tensor:
        """``logits_per_image [B, B]``."""
        return self.similarity_logits(self.encode_image(images, present),
                                      self.encode_text(input_ids, attention_mask))


def text_length_refusal(weights: str, max_length: int, positions: int) -> str:
    """The one line refusing a report length beyond the pair's text positions (the
    coordinator's config load and the site's build say it alike)."""
    return (f"max_length={max_length} (pretrain.options.max_length) exceeds the {weights!r} "
            f"text tower's {positions} positions; set pretrain.options.max_length={positions} "
            "or less")


def vocab_refusal(weights: str, tokens: int, rows: int) -> str:
    """The one line refusing a pair directory whose tokenizer has more tokens than its text
    tower embeds (the coordinator's config load and the site's build say it alike)."""
    return (f"the tokenizer in {weights!r} has {tokens} tokens but its text tower embeds "
            f"{rows}; the directory's tokenizer and weights do not belong together: put the "
            "pair's own tokenizer next to its weights")


def wrap_pair(backbone: FoundationBackbone, *, max_length: int) -> PretrainedPair:
    """The pair model around ``backbone``, its text tower set to train as the backbone's
    ``method`` says; refuses (one line) a directory without a text tower or a token length
    beyond the text tower's positions."""
    check_pretraining(backbone, "clip")
    c = backbone.config
    parts = backbone.take_companions()
    positions = parts["text_model"].config.max_position_embeddings
    if max_length > positions:
        raise ValueError(text_length_refusal(c.weights, max_length, positions))
    targets = c.lora_targets or backbone.seams.lora_targets
    adapt_tower(parts["text_model"], c.method, rank=c.lora_rank, alpha=c.lora_alpha,
                targets=targets, dropout=c.lora_dropout)
    full = c.method == "full"
    for name in ("text_projection", "visual_projection"):
        if parts.get(name) is not None:
            parts[name].requires_grad_(full)
    for name in ("logit_scale", "logit_bias"):
        if parts.get(name) is not None:
            parts[name].requires_grad_(True)      # one scalar each: the new domain's scale
    backbone.head = None         # no classifier here; fine-tuning adds its own
    return PretrainedPair(backbone, parts)


__all__ = ["PretrainedPair", "sigmoid_loss", "text_length_refusal", "vocab_refusal",
           "wrap_pair"]
