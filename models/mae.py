"""Multi-modal masked autoencoder (BM-MAE style) on the multi-modal ViT.

Two kinds of masking per sample: random patch masking over the present sequences, plus (with
probability ``sequence_mask_prob``) one present sequence hidden entirely, so the encoder learns
to infer a missing MRI sequence from the others. The decoder reconstructs the masked patches
of every present sequence; absent sequences have no target and cost nothing.

Masked tokens are removed from attention (``hidden``) rather than gathered out as in the MAE
reference: the number of visible tokens differs per sample once whole sequences are masked,
and a fixed-shape batch keeps every layer a plain ``nn.Linear`` for DP-SGD. Nothing attends to
a masked token, so its content cannot reach any output the loss reads.

From a pretrained foundation model (``model=foundation``): the encoder is the loaded one
(a ``ViTMAEModel`` or any family that takes an attention mask and has a CLS token), adapted
to the layout's channels, training what its ``method`` says; the decoder is the directory's
own when it was saved from ``ViTMAEForPreTraining`` (``PretrainedMAEDecoder``), else a new
one. What travels: adapters, the adaptation's new parts and the decoder.

DP-ready: the loss is a mean of per-sample terms and every parameter lives in ``nn.Linear``,
``nn.LayerNorm`` or the backbone's ``TokenEmbedding``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import SplitMetrics
from .registry import TASKS
from .task import StepOutput, TaskBase, TaskModel
from .vit import Block, MultiModalViT, TokenLayout, ViTConfig, _init_weights, patchify, \
    sincos_position_embedding


@dataclass(frozen=True)
class MAEConfig:
    mask_ratio: float = 0.6           # fraction of each present sequence's patches hidden
    sequence_mask_prob: float = 0.5   # chance that one whole present sequence is hidden too
    decoder_dim: int = 64
    decoder_depth: int = 1
    decoder_heads: int = 2
    norm_pix_loss: bool = True        # per-patch normalised targets (MAE's better variant)
    num_classes: int = 3              # for the classification metrics of later phases only

    def __post_init__(self):
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0.0 <= self.sequence_mask_prob <= 1.0:
            raise ValueError(f"sequence_mask_prob must be in [0, 1], got {self.sequence_mask_prob}")
        if self.decoder_dim % self.decoder_heads or self.decoder_depth < 1:
            raise ValueError("decoder_dim must be divisible by decoder_heads; decoder_depth >= 1")


def random_masking(present: Tensor, n: int, mask_ratio: float, sequence_mask_prob: float,
                   generator: torch.Generator | None = None) -> Tensor:
    """``present [B, S]`` -> ``masked [B, S*N]`` (True = hidden from the encoder).

    Every present sequence loses ``round(mask_ratio * N)`` random patches; with probability
    ``sequence_mask_prob`` one present sequence (of samples with >= 2) is hidden entirely.
    Absent sequences are never "masked": they have nothing to reconstruct.
    """
    b, s = present.shape
    device = present.device
    noise = torch.rand(b, s, n, device=device, generator=generator)
    k = max(1, int(round(mask_ratio * n)))
    ranks = noise.argsort(dim=-1).argsort(dim=-1)                     # [B, S, N]
    masked = (ranks < k) & present[..., None].bool()
    whole = torch.rand(b, device=device, generator=generator) < sequence_mask_prob
    whole &= present.sum(1) >= 2
    choice = torch.rand(b, s, device=device, generator=generator).masked_fill(~present.bool(), -1)
    hidden_seq = F.one_hot(choice.argmax(1), s).bool() & whole[:, None]   # [B, S]
    masked |= hidden_seq[..., None]
    return masked.reshape(b, s * n)


def mae_loss(pred: Tensor, target: Tensor, masked: Tensor) -> Tensor:
    """Per-sample mean squared error over masked patches ``[B]`` (0 if none is masked)."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)                       # [B, L]
    mask = masked.to(per_patch.dtype)
    return (per_patch * mask).sum(1) / mask.sum(1).clamp(min=1)


class MAEDecoder(nn.Module):
    """Lightweight transformer that fills masked positions and predicts their pixels.

    The mask token and the sequence embedding are ``nn.Linear`` maps of indicator vectors
    (bias-free), so per-sample gradient rules for Linear cover them.
    """

    def __init__(self, backbone: ViTConfig, config: MAEConfig):
        super().__init__()
        self.num_sequences = backbone.num_sequences
        self.embed = nn.Linear(backbone.dim, config.decoder_dim)
        self.mask_token = nn.Linear(1, config.decoder_dim, bias=False)
        self.seq_embed = nn.Linear(backbone.num_sequences, config.decoder_dim, bias=False)
        dec = replace(backbone, dim=config.decoder_dim, depth=config.decoder_depth,
                      heads=config.decoder_heads, num_classes=0)
        grid = backbone.img_size // backbone.patch_size
        self.register_buffer("pos_embed", sincos_position_embedding(
            config.decoder_dim, grid, backbone.spatial_dims)[None, None], persistent=False)
        self.blocks = nn.ModuleList(Block(dec) for _ in range(config.decoder_depth))
        self.norm = nn.LayerNorm(config.decoder_dim)
        self.pred = nn.Linear(config.decoder_dim, backbone.patch_dim)

    def forward(self, tokens: Tensor, masked: Tensor, attend: Tensor) -> Tensor:
        """Encoder tokens ``[B, 1+S*N, D]`` -> pixel predictions ``[B, S*N, P]``."""
        x, patches = decoder_inputs(self, tokens, masked)
        s, n = self.num_sequences, patches.shape[1] // self.num_sequences
        patches = patches + self.pos_embed.expand(1, s, -1, -1).reshape(1, s * n, -1)
        x = torch.cat([x[:, :1], patches], dim=1)
        for block in self.blocks:
            x = block(x, attend)
        return self.pred(self.norm(x))[:, 1:]


def decoder_inputs(decoder: nn.Module, tokens: Tensor, masked: Tensor) -> tuple[Tensor, Tensor]:
    """An MAE decoder's embedded tokens ``x`` ``[B, 1+S*N, D']`` and its patch tokens
    ``[B, S*N, D']``: masked patches replaced by the mask token, each sequence's embedding
    added (positions are the caller's: each decoder has its own). ``decoder`` has
    ``embed``, ``mask_token``, ``seq_embed`` and ``num_sequences``."""
    b, t, _ = tokens.shape
    s = decoder.num_sequences
    n = (t - 1) // s
    m = masked.to(tokens.dtype)[..., None]                              # [B, S*N, 1]
    x = decoder.embed(tokens)
    patches = x[:, 1:] * (1 - m) + decoder.mask_token(m)
    # Per-sample inputs ([B, ...], not broadcast): per-sample gradient rules need them.
    seq = torch.eye(s, dtype=tokens.dtype, device=tokens.device).repeat_interleave(n, 0)
    return x, patches + decoder.seq_embed(seq.expand(b, -1, -1))


def decoder_geometry(layout: TokenLayout) -> ViTConfig:
    """What a new decoder needs to know of a backbone that is not our ViT (a foundation
    model): its token layout; the decoder's blocks take MAE's defaults otherwise."""
    return ViTConfig(spatial_dims=layout.spatial_dims, img_size=layout.img_size,
                     patch_size=layout.patch_size, num_sequences=layout.num_sequences,
                     dim=layout.dim, depth=1, heads=1, num_classes=0)


class MultiModalMAE(TaskModel):
    """Backbone (``self.backbone``, what fine-tuning keeps) plus the MAE decoder (new unless
    ``decoder`` is given: a pretrained one)."""

    def __init__(self, backbone: MultiModalViT, config: MAEConfig,
                 decoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.backbone = backbone
        if decoder is None:
            geometry = (backbone.config if isinstance(backbone, MultiModalViT)
                        else decoder_geometry(backbone.layout))
            decoder = MAEDecoder(geometry, config)
            decoder.apply(_init_weights)
        self.decoder = decoder

    def forward_loss(self, images: Tensor, present: Tensor,
                     generator: torch.Generator | None = None,
                     masked: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Per-sample loss ``[B]`` and the mask used ``[B, S*N]`` (drawn unless given)."""
        c = self.backbone.layout
        n = c.patches_per_sequence
        if masked is None:
            masked = random_masking(present, n, self.config.mask_ratio,
                                    self.config.sequence_mask_prob, generator)
        tokens = self.backbone.forward_features(images, present, hidden=masked)
        # The decoder sees every present position: visible tokens and mask tokens.
        attend = self.backbone.attention_mask(present, n)
        pred = self.decoder(tokens, masked, attend)                         # [B, S*N, P]
        target = patchify(images, c.patch_size, c.spatial_dims).flatten(1, 2)
        if self.config.norm_pix_loss:
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        return mae_loss(pred.float(), target.float(), masked), masked


class MAETask(TaskBase):
    """Pretraining step: reconstruct masked patches. Labels are not used."""

    batch_coupling = None            # mean of per-sample reconstruction losses
    uses_unlabelled = True

    def __init__(self, config: MAEConfig):
        self.config = config

    def wrap(self, backbone: MultiModalViT) -> MultiModalMAE:
        from .foundation.adapt import FoundationBackbone

        decoder = None
        if isinstance(backbone, FoundationBackbone):
            from .foundation.objectives import check_pretraining, mae_decoder

            check_pretraining(backbone, "mae")
            decoder = mae_decoder(backbone)
        backbone.head = None         # the MAE has no classifier; fine-tuning adds its own
        return MultiModalMAE(backbone, self.config, decoder)

    def step_views(self, layout: TokenLayout) -> tuple[int, ...]:
        """The encoder's pass and the decoder's, over every position of the study."""
        return (layout.img_size,) * 2

    def step(self, model: MultiModalMAE, batch: dict[str, Tensor]) -> StepOutput:
        loss, _ = model.forward_loss(batch["image"], batch["present"])
        return StepOutput(loss.mean(), int(loss.numel()))

    def evaluator(self) -> MAEEvaluator:
        return MAEEvaluator()


class MAEEvaluator:
    """Mean reconstruction loss over the split, on masks drawn from a fixed seed per batch:
    every round is scored on the same masks."""

    def __init__(self):
        self.losses: list[Tensor] = []

    @torch.no_grad()
    def update(self, model: MultiModalMAE, batch: dict[str, Tensor]) -> None:
        generator = torch.Generator(device=batch["image"].device).manual_seed(0)
        loss, _ = model.forward_loss(batch["image"], batch["present"], generator)
        self.losses.append(loss.float().cpu())

    def compute(self) -> SplitMetrics:
        losses = torch.cat(self.losses).numpy() if self.losses else np.zeros(0, np.float32)
        return SplitMetrics(n=len(losses), loss=float(losses.mean()) if len(losses) else 0.0)


TASKS.register("mae", MAEConfig)(MAETask)
