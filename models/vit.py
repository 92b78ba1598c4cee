"""Multi-modal ViT: one patch embedding shared across MRI sequences, a learned sequence
embedding, and attention that ignores the tokens of absent sequences.

DP-ready by construction (Opacus): every trainable parameter lives in ``nn.Linear``,
``nn.LayerNorm`` or the small ``TokenEmbedding`` module whose forward takes one positional
tensor; attention is written from ``nn.Linear``; masks travel as positional arguments into
parameter-free modules only. Works for 2D slices and 3D volumes (``spatial_dims``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .registry import MODELS


class PatchGeometry:
    """Patch counts of a config or layout with ``img_size``, ``patch_size``, ``spatial_dims``."""

    img_size: int
    patch_size: int
    spatial_dims: int

    @property
    def patches_per_sequence(self) -> int:
        return (self.img_size // self.patch_size) ** self.spatial_dims

    @property
    def patch_dim(self) -> int:
        return self.patch_size**self.spatial_dims


@dataclass(frozen=True)
class ViTConfig(PatchGeometry):
    spatial_dims: int = 2
    img_size: int = 64
    patch_size: int = 16
    num_sequences: int = 4          # input channels, one per MRI sequence
    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    num_classes: int = 3            # 0 = no classification head
    sequence_fusion: bool = False   # early cross-sequence mixing per patch location (below)
    input_center: float = 0.0       # subtracted from every input value (forward_features)

    def __post_init__(self):
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by "
                             f"patch_size {self.patch_size}")
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.num_sequences < 1 or self.depth < 1:
            raise ValueError("num_sequences and depth must be >= 1")
        if not math.isfinite(self.input_center):
            raise ValueError(f"input_center must be a finite number, got {self.input_center}")



@dataclass(frozen=True)
class TokenLayout(PatchGeometry):
    """How a backbone lays out its tokens - what an objective built on any backbone (our
    ``MultiModalViT`` or a pretrained ``FoundationBackbone``) reads instead of its config."""

    spatial_dims: int
    img_size: int
    patch_size: int
    num_sequences: int
    dim: int                        # token width
    cls_tokens: int = 1             # 1: token 0 is a CLS token; 0: patch tokens only

    def tokens(self, side: int | None = None) -> int:
        """Tokens of one study at image side ``side`` (default ``img_size``): the patches of
        every sequence and the CLS token."""
        side = self.img_size if side is None else side
        return (side // self.patch_size) ** self.spatial_dims * self.num_sequences \
            + self.cls_tokens



def patchify(images: Tensor, patch_size: int, spatial_dims: int) -> Tensor:
    """``[B, S, *spatial]`` -> ``[B, S, N, P]`` non-overlapping patches, per sequence."""
    p = patch_size
    if spatial_dims == 2:
        return rearrange(images, "b s (h p1) (w p2) -> b s (h w) (p1 p2)", p1=p, p2=p)
    return rearrange(images, "b s (d p0) (h p1) (w p2) -> b s (d h w) (p0 p1 p2)",
                     p0=p, p1=p, p2=p)


def sincos_position_embedding(dim: int, grid: int, spatial_dims: int) -> Tensor:
    """``[grid**spatial_dims, dim]`` sin-cos embedding (MAE), split evenly across axes."""
    per_axis = (dim // spatial_dims) // 2 * 2
    coords = torch.meshgrid(*[torch.arange(grid, dtype=torch.float32)] * spatial_dims,
                            indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(per_axis // 2, dtype=torch.float32) / (per_axis / 2))
    parts = []
    for c in coords:
        angles = c.reshape(-1, 1) * omega[None]                     # [N, per_axis/2]
        parts += [angles.sin(), angles.cos()]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1]))                      # [N, dim]


class TokenEmbedding(nn.Module):
    """CLS token and learned sequence embedding.

    Kept as its own module with a single positional input and no buffers, so Opacus can
    compute its per-sample gradients without seeing any other argument.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.num_sequences = config.num_sequences
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim))
        self.seq_embed = nn.Parameter(torch.randn(1, config.num_sequences, 1, config.dim) * 0.02)

    def forward(self, patch_tokens: Tensor) -> Tensor:
        b, s, n, d = patch_tokens.shape                                  # [B, S, N, D]
        tokens = patch_tokens + self.seq_embed
        tokens = tokens.reshape(b, s * n, d)                             # [B, S*N, D]
        return torch.cat([self.cls_token.expand(b, -1, -1), tokens], 1)  # [B, 1+S*N, D]


class Attention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.dim)
        self.proj = nn.Linear(config.dim, config.dim)
        self.dropout = config.dropout

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        """``attend [B, T]`` is True for tokens other tokens may attend to."""
        q, k, v = rearrange(self.qkv(x), "b t (three h e) -> three b h t e",
                            three=3, h=self.heads)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attend[:, None, None, :],
            dropout_p=self.dropout if self.training else 0.0)
        return self.proj(rearrange(out, "b h t e -> b t (h e)"))


class Block(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        hidden = int(config.dim * config.mlp_ratio)
        self.norm1 = nn.LayerNorm(config.dim)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(nn.Linear(config.dim, hidden), nn.GELU(),
                                 nn.Dropout(config.dropout), nn.Linear(hidden, config.dim))

    def forward(self, x: Tensor, attend: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), attend)
        return x + self.mlp(self.norm2(x))


class MultiModalViT(nn.Module):
    """ViT over the patches of all present sequences, with a CLS classification head.

    Parameters
    ----------
    config : ViTConfig
        Architecture; ``num_classes=0`` builds a backbone without head.
    """

    # ``models.backbone.TokenBackbone``'s optional parts: no registers, nothing this side
    # reads from a directory of its own.
    register_tokens = 0
    public_constants: tuple[str, ...] = ()

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        # A two-layer patch embedding gives each token a nonlinear "what is in this patch"
        # feature before attention; with a single Linear the ViT stalled at the label prior on
        # small sites while a CNN learned the same task.
        self.patch_embed = nn.Sequential(nn.Linear(config.patch_dim, config.dim), nn.GELU(),
                                         nn.Linear(config.dim, config.dim))
        # Early fusion: at each patch location, an MLP over the embeddings of all sequences
        # there (absent and hidden ones zeroed) is added to every sequence's token. The class
        # signal is a per-location relation between sequences (a cyst is T2-bright but
        # FLAIR-dark); without this, attention must first learn to pair tokens across
        # sequences, which left the ViT at the label prior for ~30 epochs on the demo task and
        # made federated training lag pooled training far behind (bench/RESULTS.md).
        s, d = config.num_sequences, config.dim
        self.fusion = (nn.Sequential(nn.Linear(s * d, d), nn.GELU(), nn.Linear(d, d))
                       if config.sequence_fusion else None)
        # Fixed sin-cos positions, identical for every sequence: tokens of different sequences
        # at the same location start out similar, so cross-sequence attention is easy to learn
        # from small hospital datasets. A buffer here, not in TokenEmbedding: Opacus refuses
        # trainable modules that also hold buffers.
        grid = config.img_size // config.patch_size
        self.register_buffer("pos_embed", sincos_position_embedding(
            config.dim, grid, config.spatial_dims)[None, None], persistent=False)   # [1, 1, N, D]
        self.tokens = TokenEmbedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.dim)
        # DINOv2's linear-eval recipe: CLS token concatenated with the mean of patch tokens.
        self.head = nn.Linear(2 * config.dim, config.num_classes) if config.num_classes else None
        self.apply(_init_weights)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One study's input ``(S, *spatial)``: what an exported model takes per sample."""
        c = self.config
        return (c.num_sequences, *([c.img_size] * c.spatial_dims))

    @property
    def layout(self) -> TokenLayout:
        c = self.config
        return TokenLayout(c.spatial_dims, c.img_size, c.patch_size, c.num_sequences, c.dim)

    def attention_mask(self, present: Tensor, n: int | None = None,
                       hidden: Tensor | None = None) -> Tensor:
        """``present [B, S]`` -> ``attend [B, 1+S*N]``; the CLS token is always attendable.
        ``hidden [B, S*N]`` (masked-image objectives) removes tokens no other token may see."""
        n = self.config.patches_per_sequence if n is None else n
        per_token = present.bool().repeat_interleave(n, dim=1)           # [B, S*N]
        if hidden is not None:
            per_token = per_token & ~hidden.bool()
        cls = torch.ones_like(per_token[:, :1])
        return torch.cat([cls, per_token], dim=1)

    def position_embedding(self, spatial: tuple[int, ...]) -> Tensor:
        """``[1, 1, N, D]`` for an input of this spatial size (other sizes: DINO local crops)."""
        grid = spatial[0] // self.config.patch_size
        if grid == self.config.img_size // self.config.patch_size:
            return self.pos_embed
        return sincos_position_embedding(self.config.dim, grid, self.config.spatial_dims
                                         ).to(self.pos_embed)[None, None]

    def check_input(self, images: Tensor) -> None:
        c = self.config
        if images.ndim != 2 + c.spatial_dims or images.shape[1] != c.num_sequences:
            raise ValueError(f"expected [B, {c.num_sequences}, {', '.join(['size'] * c.spatial_dims)}]"
                             f" input, got shape {tuple(images.shape)}")
        spatial = images.shape[2:]
        if len(set(spatial)) != 1 or spatial[0] % c.patch_size:
            raise ValueError(f"spatial size {tuple(spatial)} must be a cube of a multiple of "
                             f"patch_size {c.patch_size}")

    def forward_features(self, images: Tensor, present: Tensor,
                         hidden: Tensor | None = None, collect: list | None = None) -> Tensor:
        """``images [B, S, *spatial]``, ``present [B, S]`` -> normalised tokens ``[B, 1+S*N, D]``.

        ``hidden [B, S*N]`` marks patch tokens that no token may attend to (MAE's masked
        patches): their outputs are meaningless and nothing else depends on their content.
        ``collect``, a list, receives every block's output (UNETR's skip connections).
        """
        self.check_input(images)
        if self.config.input_center:
            # Inputs already in [0, 1] (CT windows) whose mid-grey is the tissue of interest
            # (a liver window centred on the liver's HU): centred, that tissue is ~0 and a
            # patch of it embeds to ~the bias, so a focus in it stands out from the token
            # instead of being a few percent of a large constant. Uncentred, the tiny 3D ViT
            # stayed at the label prior on the CT task (experiment=ct3, README).
            images = images - self.config.input_center
        patches = patchify(images, self.config.patch_size, self.config.spatial_dims)
        embedded = self.patch_embed(patches)                                # [B, S, N, D]
        attend = self.attention_mask(present, patches.shape[2], hidden)
        if self.fusion is not None:
            embedded = embedded + self.fuse(embedded, attend[:, 1:])
        x = self.tokens(embedded + self.position_embedding(tuple(images.shape[2:])))
        for block in self.blocks:
            x = block(x, attend)
            if collect is not None:
                collect.append(x)
        return self.norm(x)

    def fuse(self, embedded: Tensor, visible: Tensor) -> Tensor:
        """``[B, S, N, D]`` patch embeddings, ``visible [B, S*N]`` -> ``[B, 1, N, D]``.

        Tokens that are not visible (absent sequences, MAE's hidden patches) are zeroed
        before mixing, so their content reaches no other token this way either.
        """
        b, s, n, d = embedded.shape
        kept = embedded * visible.reshape(b, s, n, 1).to(embedded.dtype)
        return self.fusion(kept.transpose(1, 2).reshape(b, n, s * d))[:, None]

    def forward(self, images: Tensor, present: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]`` from the pooled tokens."""
        if self.head is None:
            raise RuntimeError("this backbone was built with num_classes=0; use forward_features")
        return self.head(self.pool(self.forward_features(images, present), present))

    def pool(self, tokens: Tensor, present: Tensor) -> Tensor:
        """``[B, 1+S*N, D]`` -> ``[B, 2D]``: CLS and the mean over tokens of present sequences."""
        n = (tokens.shape[1] - 1) // self.config.num_sequences
        weights = self.attention_mask(present, n)[:, 1:].to(tokens.dtype)[..., None]  # [B, S*N, 1]
        mean = (tokens[:, 1:] * weights).sum(1) / weights.sum(1).clamp(min=1)
        return torch.cat([tokens[:, 0], mean], dim=-1)


def _init_weights(module: nn.Module) -> None:
    # Xavier-uniform as in MAE: with std-0.02 init the patch content was ~1% of each token
    # next to the unit-amplitude sin-cos positions, and training stalled at the label prior.
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# Registered where it is defined, as the foundation backbones are (models/foundation/__init__.py)
MODELS.register("mmvit", ViTConfig)(MultiModalViT)


__all__ = ["ViTConfig", "MultiModalViT", "TokenEmbedding", "TokenLayout", "patchify",
           "count_parameters"]
