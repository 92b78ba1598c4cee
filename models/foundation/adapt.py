"""MM-DINOv2's multi-channel adaptation of a pretrained RGB vision encoder.

The RGB patch embedding becomes one patch embedding per input channel (MRI sequence), each
initialised from the pretrained kernel averaged over R, G and B; a learned channel embedding
tells the channels apart; the family's position embeddings are interpolated to the layout's
grid and shared by all channels (tokens of different channels at one location start alike,
as in ``models.vit``); tokens of absent channels are masked out of attention as keys, and
pooling ignores them. While training, a whole present channel is dropped with probability p
(full-modality masking), so a missing sequence at inference is a case the model has seen.

``channel_tokens="fused"`` instead gives ONE token per patch location: a single patch embedding
over all channels (the pretrained kernel inflated like timm's ``in_chans`` rule, which repeats
R, G, B cyclically times C0/S; here each channel's slice is the RGB mean times C0/S: the same
response to a grey image), no channel embedding; an absent or dropped channel is zeroed before
the embedding (a fused token has no per-channel mask). On the brain-MRI task it learns from
~120 labelled studies where the per-channel layout barely does (bench/RESULTS.md, "Foundation
recipe, session 20"): the class signal is a per-location relation between sequences, which
fused tokens see from the first layer. MAE needs per-channel tokens (its target is one
channel's patch). An absent channel, zeroed, looks like a black one; ``presence_embedding``
(off by default) adds a learned embedding of the ``present`` vector to every patch token so the
two can differ (``PresenceEmbedding``). ``centre_features`` (off by default) subtracts a
PUBLIC mean of the pooled features, read from the weights directory, before the head
(``centring.py``): under DP-SGD the common component of the features otherwise dominates every
per-sample gradient of the head; ``scale_features`` (with it) divides them by a PUBLIC
per-dimension spread, so DP-SGD's equal noise on every head weight meets features of one scale.
``project_features=k`` (off by default) then projects them on
k PUBLIC principal directions read from there too (``projection.py``): a k-input head.

``patch_init="channels"`` (off by default) is for an encoder pretrained on the layout's own
channels (``num_channels`` input channels, e.g. a public model of the same four MRI sequences):
each channel's patch embedding starts from that channel's own slice of the kernel (fused: the
kernel as it is, so the adapted model embeds a study exactly as the encoder did), not from the
colours' mean. A kernel of another channel count is refused at build with one line.

Interface identical to ``models.vit.MultiModalViT``: ``forward(images [B, S, H, W],
present [B, S]) -> logits``, ``forward_features``, ``pool`` and a linear ``head``. Volumes
``[B, S, D, H, W]`` (``config.spatial_dims=3``, set by a 3D layout such as ``ct_volume``) take
an encoder that is 3D itself: a MONAI ``ViT`` with ``spatial_dims=3`` (its conv patch kernel
becomes one patch embedding per channel, its positions are resampled trilinearly to the
layout's grid); a 2D encoder on a 3D layout is refused.

DP-SGD (client/privacy/persample.py): every parameter this module adds lives in an
``nn.Linear`` called once per forward pass with the sample as its first dimension - the
per-channel (or the one fused) patch embeddings, the channel embedding (a bias-free Linear
applied to one-hot channel indicators), the presence embedding (a bias-free Linear on the
sample's ``present`` row) and the head - so LoRA fine-tuning is covered by the exact
per-sample rule.
A family whose encoder folds channels or windows into the batch (SAM) declares the folding
layer types (``batch_major_folds``, the clipper's ``FoldsBatch``) so their rows are regrouped
per sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpointing import checkpoint_blocks
from ..tasks import drop_one_sequence
from ..vit import TokenLayout, patchify
from .centring import feature_signature, load_feature_mean, load_feature_scale
from .config import FoundationConfig
from .coverage import family_dp_refusal
from .loading import LoadedEncoder
from .projection import load_feature_projection


def channel_patch_kernel(weight: Tensor, bias: Tensor | None, patch: int,
                         keep_channels: bool = False) -> tuple[Tensor, Tensor]:
    """Pretrained ``[D, C, *p0]`` kernel (2D or 3D) -> ``([D, K, patch**dims], [D])``.

    ``K = 1``: averaged over the input colours (MM-DINOv2's rule, any encoder); with
    ``keep_channels``, ``K = C``: each input channel's own slice. For another patch size the
    kernel is resampled (bi/trilinearly) and scaled by ``prod(p0) / patch**dims`` so a
    constant image gives the same response (a simple stand-in for FlexiViT's pseudo-inverse
    resize).
    """
    kernel = weight.detach().float()                                     # [D, C, *p0]
    if not keep_channels:
        kernel = kernel.mean(dim=1, keepdim=True)                        # [D, 1, *p0]
    p0, dims = tuple(kernel.shape[2:]), kernel.dim() - 2
    if p0 != (patch,) * dims:
        mode = "bilinear" if dims == 2 else "trilinear"
        kernel = F.interpolate(kernel, size=(patch,) * dims, mode=mode,
                               align_corners=False) * (math.prod(p0) / patch**dims)
    b = torch.zeros(weight.shape[0]) if bias is None else bias.detach().float()
    return kernel.reshape(weight.shape[0], kernel.shape[1], patch**dims), b


class ChannelEmbedding(nn.Module):
    """Learned embedding per channel, ``[B, S, D]``.

    A bias-free Linear on one-hot channel indicators rather than a bare Parameter: its
    per-sample gradient is then the exact Linear rule DP-SGD already has.
    """

    def __init__(self, num_channels: int, dim: int):
        super().__init__()
        self.num_channels = num_channels
        self.embed = nn.Linear(num_channels, dim, bias=False)
        # Zero: at the start every channel is seen exactly as the pretrained encoder sees a
        # grey image; the gradient with respect to a zero weight is not zero, so it learns.
        nn.init.zeros_(self.embed.weight)

    def forward(self, batch_size: int) -> Tensor:
        eye = torch.eye(self.num_channels, dtype=self.embed.weight.dtype,
                        device=self.embed.weight.device)
        return self.embed(eye.expand(batch_size, -1, -1))                   # [B, S, D]


class PresenceEmbedding(nn.Module):
    """Which channels a study has, as one vector added to its fused tokens: ``present
    [B, S]`` -> ``[B, 1, D]``.

    A fused token zeroes an absent channel, which is then what a black channel looks like;
    this lets the model tell them apart. A bias-free Linear on the present row (exact
    per-sample gradients under DP-SGD), zero at the start so a model with it begins exactly
    as one without.
    """

    def __init__(self, num_channels: int, dim: int):
        super().__init__()
        # skip_init: no default random draw, so the RNG stream (and every layer built after
        # this one, the head) is the same with the option on or off under one seed
        self.embed = nn.utils.skip_init(nn.Linear, num_channels, dim, bias=False)
        nn.init.zeros_(self.embed.weight)

    def forward(self, present: Tensor) -> Tensor:
        return self.embed(present.to(self.embed.weight.dtype))[:, None]       # [B, 1, D]


class FoundationBackbone(nn.Module):
    """A pretrained encoder over the patches of all present channels, with a class head.

    Parameters
    ----------
    loaded : LoadedEncoder
        From ``loading.load_encoder``.
    config : FoundationConfig
    """

    def __init__(self, loaded: LoadedEncoder, config: FoundationConfig):
        super().__init__()
        self.config = config
        self.family = loaded.family
        self.seams = loaded.seams
        self.encoder = loaded.encoder
        self.constructor = loaded.constructor      # MONAI/timm: what export writes back
        self.directory = loaded.directory
        # A plain dict, not submodules: only the objective that takes them holds them.
        self.companions = dict(loaded.companions)
        family_patch = self.seams.patch_size(self.encoder)
        self.patch_size = config.patch_size or family_patch
        if config.image_size % self.patch_size:
            raise ValueError(f"image_size {config.image_size} is not divisible by the patch size "
                             f"{self.patch_size} (set patch_size to resize the {self.family} "
                             f"kernel of {family_patch})")
        self.grid = config.image_size // self.patch_size
        self.spatial_dims = config.spatial_dims
        # Families written for 2D images only declare nothing: they are 2D.
        encoder_dims = getattr(self.seams, "spatial_dims", 2)
        if encoder_dims != self.spatial_dims:
            raise ValueError(f"the {self.family} encoder is {encoder_dims}D but the layout gives "
                             f"{self.spatial_dims}D inputs; "
                             + ("a 3D layout needs a MONAI ViT built with spatial_dims=3"
                                if self.spatial_dims == 3 else "use a 2D encoder"))
        dim = self.seams.hidden_size(self.encoder)
        weight, bias = self.seams.patch_kernel(self.encoder)
        patch_dim, s = self.patch_size**self.spatial_dims, config.num_channels
        own = config.patch_init == "channels"
        if own and weight.shape[1] != s:
            raise ValueError(f"patch_init=channels takes the encoder's kernel channel by "
                             f"channel, but {config.weights!r} was pretrained on "
                             f"{weight.shape[1]} input channels and the layout has {s}; use "
                             "patch_init=mean (the kernel's mean for every channel)")
        # [D, S or 1, p^dims]: each channel's own slice, or the colour mean for every channel
        slices, kernel_bias = channel_patch_kernel(weight, bias, self.patch_size, own)
        kernel = slices[:, 0]                                               # [D, p^dims]
        self.fused = config.channel_tokens == "fused"
        # Channels carried by one token: 1 per channel, all of them when fused.
        self.token_groups = 1 if self.fused else s
        if self.fused:
            # One patch embedding over all channels, one token per location (like timm's
            # in_chans rule, with the RGB mean for every channel): each channel's slice is the
            # RGB-mean kernel scaled by C0/S, so a study
            # whose channels are all equal gets the pretrained response to that grey image.
            # No channel embedding: a channel is told apart by its slice of the kernel.
            self.patch_embed = nn.Linear(s * patch_dim, dim)                # [S*p^dims -> D]
            with torch.no_grad():
                self.patch_embed.weight.copy_(slices.flatten(1) if own else
                                              kernel.repeat(1, s) * (weight.shape[1] / s))
                self.patch_embed.bias.copy_(kernel_bias)
            self.channel_embed = None
            self.presence_embed = (PresenceEmbedding(s, dim) if config.presence_embedding
                                   else None)
        else:
            self.patch_embed = nn.ModuleList()
            for c in range(s):
                linear = nn.Linear(patch_dim, dim)
                with torch.no_grad():
                    linear.weight.copy_(slices[:, c] if own else kernel)
                    linear.bias.copy_(kernel_bias)
                self.patch_embed.append(linear)
            self.channel_embed = ChannelEmbedding(s, dim)
            self.presence_embed = None
        pooled = 2 * dim if self.seams.has_cls else dim
        self.head = nn.Linear(config.project_features or pooled, config.num_classes)
        # centre_features: a PUBLIC mean of the pooled features, subtracted in pool(); a
        # frozen parameter (never trains, never travels, in the base digest: centring.py).
        # Read from the file, no random draw: every other layer's init is unchanged.
        self.feature_mean = None
        if config.centre_features:
            mean = load_feature_mean(self.directory, self.feature_signature)
            self.feature_mean = nn.Parameter(mean, requires_grad=False)      # [pooled]
        # scale_features: then divided by a PUBLIC per-dimension spread (centring.py), frozen
        # like the mean.
        self.feature_scale = None
        if config.scale_features:
            scale = load_feature_scale(self.directory, self.feature_signature)
            self.feature_scale = nn.Parameter(scale, requires_grad=False)    # [pooled]
        # project_features: PUBLIC principal directions, applied in pool() after centring;
        # frozen like the mean (projection.py). The head above takes k inputs.
        self.feature_projection = None
        if config.project_features:
            directions = load_feature_projection(self.directory, self.feature_signature,
                                                 config.project_features)
            self.feature_projection = nn.Parameter(directions, requires_grad=False)  # [k, pooled]
        # Dead weights (the RGB projection, MAE's mask token, poolers, SAM's neck): frozen, so
        # no optimiser or per-sample rule ever waits for a gradient that cannot come.
        for part in self.seams.unused(self.encoder):
            part.requires_grad_(False)
        if config.gradient_checkpointing:
            checkpoint_blocks(self.seams.blocks(self.encoder))
        if not config.rope_augmentation:
            fix = getattr(self.seams, "fix_rope_positions", None)       # RoPE families only
            if fix is None:
                raise ValueError(f"rope_augmentation=false switches off a rotary position "
                                 f"augmentation, and the {self.family} encoder has no rotary "
                                 "positions; remove the option")
            fix(self.encoder)

    @property
    def feature_signature(self) -> dict[str, str]:
        """What this model's pooled features depend on (``centring.feature_signature``)."""
        dim = self.seams.hidden_size(self.encoder)
        return feature_signature(channel_tokens=self.config.channel_tokens,
                                 num_channels=self.config.num_channels,
                                 image_size=self.config.image_size, patch_size=self.patch_size,
                                 spatial_dims=self.spatial_dims,
                                 pooled_dim=2 * dim if self.seams.has_cls else dim,
                                 patch_init=self.config.patch_init)

    @property
    def public_constants(self) -> tuple[str, ...]:
        """State keys read from this side's own weights directory (the public feature mean
        and directions): ``models.tasks.load_backbone`` never takes them from a pretrained
        state, so a phase pretrained without them fine-tunes with them."""
        return tuple(k for k in ("feature_mean", "feature_scale", "feature_projection")
                     if getattr(self, k) is not None)

    @property
    def dp_unsupported(self) -> str | None:
        """Why DP-SGD's per-sample rule does not hold for this family, or for this family
        with the configured method, or None."""
        return family_dp_refusal(self.seams, self.config.method)

    @property
    def batch_major_folds(self) -> tuple[type[nn.Module], ...]:
        """Module types of the encoder whose rows fold further items into the batch,
        sample-major (the clipper's ``FoldsBatch``: SAM's layers; none for the others)."""
        return self.seams.batch_major_folds(self.encoder)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One study's input ``(S, H, W)`` or ``(S, D, H, W)``: what an exported model takes
        per sample."""
        return (self.config.num_channels,) + (self.config.image_size,) * self.spatial_dims

    @property
    def register_tokens(self) -> int:
        """Tokens the encoder's layers read beyond ``layout``'s (registers after CLS, never
        in the output): what the site's token caps count too (``client.queries``)."""
        return self.seams.registers(self.encoder)

    @property
    def layout(self) -> TokenLayout:
        """Token layout for objectives (``models.vit.TokenLayout``)."""
        return TokenLayout(self.spatial_dims, self.config.image_size, self.patch_size,
                           self.token_groups,
                           self.seams.hidden_size(self.encoder), int(self.seams.has_cls))

    def take_companions(self) -> dict[str, nn.Module | nn.Parameter]:
        """The pretrained parts beside the encoder (``LoadedEncoder.companions``), handed
        over once to the objective that uses them; a second call gets nothing."""
        parts, self.companions = self.companions, {}
        return parts

    def check_input(self, images: Tensor) -> None:
        """``[B, S, H, H]`` (``[B, S, H, H, H]`` in 3D) with H a multiple of the patch size
        (the configured image size when fine-tuning; DINO's local crops are smaller,
        positions are interpolated)."""
        s, size, p = self.config.num_channels, self.config.image_size, self.patch_size
        dims = self.spatial_dims
        spatial = tuple(images.shape[2:])
        if images.ndim != 2 + dims or images.shape[1] != s or len(set(spatial)) != 1 \
                or spatial[0] % p:
            raise ValueError(f"expected [B, {s}, {', '.join([str(size)] * dims)}] input (or "
                             f"another equal side that is a multiple of the patch size {p}), "
                             f"got shape {tuple(images.shape)}")

    def attention_mask(self, present: Tensor, n: int | None = None,
                       hidden: Tensor | None = None) -> Tensor:
        """``present [B, S]`` -> ``attend [B, (1)+S*N]`` (the CLS token always attendable);
        ``n`` patches per channel (default: the configured grid), ``hidden [B, S*N]``
        (MAE's masked patches) removes tokens no other token may see. Fused tokens:
        ``[B, (1)+N]``, a location attendable when the study has any channel,
        ``hidden [B, N]``."""
        n = self.grid**self.spatial_dims if n is None else n
        if self.fused:
            per_token = present.bool().any(1, keepdim=True).expand(-1, n)      # [B, N]
        else:
            per_token = present.bool().repeat_interleave(n, dim=1)           # [B, S*N]
        if hidden is not None:
            per_token = per_token & ~hidden.bool()
        if self.seams.has_cls:
            per_token = torch.cat([torch.ones_like(per_token[:, :1]), per_token], dim=1)
        return per_token

    def embed(self, images: Tensor, present: Tensor | None = None) -> Tensor:
        """``[B, S, H, W]`` -> tokens ``[B, (1)+S*N, D]`` with positions and channel identity
        (fused: ``[B, (1)+N, D]``, one token per location over all channels; with
        ``presence_embedding``, ``present [B, S]`` is required and embedded into each)."""
        b, s = images.shape[:2]
        grid = images.shape[-1] // self.patch_size
        patches = patchify(images, self.patch_size, self.spatial_dims)       # [B, S, N, p^dims]
        cls_pos, pos = self.seams.position_embedding(self.encoder, grid)     # [1, N, D]
        if self.fused:
            # [B, N, S*p^dims]: channel-major within a location, the kernel's slice order
            tokens = self.patch_embed(patches.transpose(1, 2).flatten(2)) + pos   # [B, N, D]
            if self.presence_embed is not None:
                if present is None:
                    raise ValueError("presence_embedding: embed() needs present [B, S]")
                tokens = tokens + self.presence_embed(present)                 # [B, N, D]
        else:
            per_channel = torch.stack([self.patch_embed[c](patches[:, c]) for c in range(s)], 1)
            tokens = per_channel + self.channel_embed(b)[:, :, None] + pos[:, None]  # [B,S,N,D]
            tokens = tokens.reshape(b, -1, tokens.shape[-1])                  # [B, S*N, D]
        cls = self.seams.cls_token(self.encoder)
        if cls is None:
            return tokens
        cls = (cls + cls_pos).to(tokens.dtype).expand(b, -1, -1)              # [B, 1, D]
        return torch.cat([cls, tokens], dim=1)

    def forward_features(self, images: Tensor, present: Tensor,
                         hidden: Tensor | None = None) -> Tensor:
        """``images [B, S, H, W]``, ``present [B, S]`` -> normalised tokens ``[B, (1)+S*N, D]``.

        Absent channels must be zeroed in ``images`` (StudyDataset does); their tokens are
        computed but no other token attends to them, nor to the ``hidden [B, S*N]`` ones.
        Fused tokens: ``[B, (1)+N, D]``, absent channels zeroed here, ``hidden [B, N]``.
        """
        self.check_input(images)
        if hidden is not None and not self.seams.masks_tokens:
            raise ValueError(f"the {self.family} encoder has no attention mask, so it cannot "
                             "hide tokens (masked-image objectives need that)")
        grid = images.shape[-1] // self.patch_size
        if self.fused:
            # Fused tokens have no per-channel mask: an absent (or dropped) channel must add
            # nothing, so it is zeroed here whatever the caller passed (NaN included).
            shape = tuple(present.shape) + (1,) * self.spatial_dims
            images = torch.where(present.reshape(shape).bool(), images, 0.0)
        tokens = self.embed(images, present)
        return self.seams.encode(self.encoder, tokens,
                                 self.attention_mask(present, grid**self.spatial_dims, hidden),
                                 self.token_groups, grid)

    def pool(self, tokens: Tensor, present: Tensor) -> Tensor:
        """``[B, T, D]`` -> ``[B, 2D]`` (CLS and mean over present tokens) or ``[B, D]``
        (mean only, families without a CLS token); minus the public ``feature_mean`` with
        ``centre_features``, over the public ``feature_scale`` with ``scale_features``;
        ``[B, k]`` on the public directions with ``project_features``."""
        cls = int(self.seams.has_cls)
        n = (tokens.shape[1] - cls) // self.token_groups
        weights = self.attention_mask(present, n).to(tokens.dtype)[..., None]    # [B, T, 1]
        patch_tokens, patch_weights = tokens[:, cls:], weights[:, cls:]
        mean = (patch_tokens * patch_weights).sum(1) / patch_weights.sum(1).clamp(min=1)
        pooled = torch.cat([tokens[:, 0], mean], dim=-1) if cls else mean
        if self.feature_mean is not None:
            pooled = pooled - self.feature_mean
        if self.feature_scale is not None:
            pooled = pooled / self.feature_scale
        if self.feature_projection is not None:
            pooled = pooled @ self.feature_projection.T                      # [B, k]
        return pooled

    def forward(self, images: Tensor, present: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]``; full-modality masking while training."""
        if self.training and self.config.modality_dropout > 0:
            # The same operation as the head tasks' sequence_dropout (one of the two suffices).
            images, present = drop_one_sequence(images, present, self.config.modality_dropout)
        return self.head(self.pool(self.forward_features(images, present), present))


__all__ = ["ChannelEmbedding", "FoundationBackbone", "PresenceEmbedding", "channel_patch_kernel"]
