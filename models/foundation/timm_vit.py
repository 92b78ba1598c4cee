"""timm Vision Transformers read from timm's hub layout, without importing timm.

timm needs torchvision, which cannot be installed beside this torch build, so a timm
checkpoint (the format of many pathology and radiology foundation models) is read directly: a
directory with timm's ``config.json`` (``{"architecture": "vit_base_patch16_224", "num_classes",
"model_args": {...}, "pretrained_cfg": {...}}``) and ``model.safetensors`` with timm's key names.
``TimmViT`` is a small pure-PyTorch copy of timm's ``VisionTransformer`` for the options listed
in ``ARGS`` - same module names, so the state dict loads strictly and exports back unchanged,
and the same arithmetic, so its ``forward_features`` equals timm's (``tests/fixtures/
make_timm_vit.py`` records timm's own output). Anything else (another block, activation, norm,
attention-pool head, non-ViT architecture) is refused with one line, never approximated.

The architecture is resolved as timm resolves it: the name's defaults (``SIZES``; the
``*_dinov2`` and ``*_reg<N>_dinov2`` names add LayerScale and registers), then ``model_args``
from config.json; ``img_size``/``in_chans``/``num_classes`` fall back to ``pretrained_cfg``.
The weights are then checked key by key and shape by shape against that architecture
(``timm_family``: the seams, loading and export).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TIMM_FAMILY = "timm"
# size -> (embed_dim, depth, num_heads, mlp_ratio), as timm registers vit_<size>_patch*_*
SIZES = {"tiny": (192, 12, 3, 4.0), "small": (384, 12, 6, 4.0), "base": (768, 12, 12, 4.0),
         "large": (1024, 24, 16, 4.0), "huge": (1280, 32, 16, 4.0),
         "giant": (1408, 40, 16, 48 / 11), "gigantic": (1664, 48, 16, 64 / 13)}
PLAIN = re.compile(r"vit_(tiny|small|base|large|huge|giant|gigantic)_patch(\d+)_(\d+)")
DINOV2 = re.compile(r"vit_(small|base|large)_patch14(?:_reg(\d+))?_dinov2")   # giant: SwiGLU
# model_args we represent exactly; IGNORED ones change neither the weights nor the evaluation
# forward (dropout, init schemes, how timm itself resizes positions or pools).
ARGS = ("img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim",
        "depth", "num_heads", "mlp_ratio", "qkv_bias", "init_values", "class_token",
        "no_embed_class", "reg_tokens", "pre_norm", "final_norm", "fc_norm")
IGNORED = ("drop_rate", "pos_drop_rate", "patch_drop_rate", "proj_drop_rate", "attn_drop_rate",
           "drop_path_rate", "weight_init", "fix_init", "dynamic_img_size", "pool_include_prefix")
DEFAULT_ONLY = {"pos_embed": "learn", "qk_norm": False, "proj_bias": True,
                "dynamic_img_pad": False, "scale_attn_norm": False, "scale_mlp_norm": False}
POOLS = ("", "token", "avg", "avgmax", "max")       # 'map'/'prr' carry an attention-pool head


@dataclass(frozen=True)
class TimmViTConfig:
    """The arguments of timm's ``VisionTransformer`` that ``TimmViT`` represents."""

    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    in_chans: int = 3
    num_classes: int = 1000
    global_pool: str = "token"
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None        # LayerScale when set
    class_token: bool = True
    no_embed_class: bool = False            # positions for patches only (DeiT-3, DINOv2-reg)
    reg_tokens: int = 0
    pre_norm: bool = False
    final_norm: bool = True
    fc_norm: bool | None = None             # None: after pooling when global_pool is avg/max

    def __post_init__(self):
        # config.json is JSON: a string where a number belongs must fail here, in one line
        for f in fields(self):
            if not _valid(getattr(self, f.name), f.type):
                raise ValueError(f"timm argument {f.name}={getattr(self, f.name)!r} is not a "
                                 f"valid {f.type}")
        if min(self.img_size, self.patch_size, self.embed_dim, self.depth, self.num_heads,
               self.in_chans) < 1:
            raise ValueError("timm sizes (img_size, patch_size, embed_dim, depth, num_heads, "
                             "in_chans) must be >= 1")

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool in ("avg", "avgmax", "max") if self.fc_norm is None \
            else bool(self.fc_norm)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


def _valid(value, kind: str) -> bool:
    """Whether a JSON value fits a field annotated ``kind`` (``int`` means a count >= 0)."""
    if value is None:
        return "None" in kind
    if kind.startswith("bool"):
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "int":
        return isinstance(value, int) and value >= 0
    if kind.startswith("float"):
        return isinstance(value, (int, float))
    return isinstance(value, str)


def is_timm_config(config: dict) -> bool:
    """Whether a parsed ``config.json`` is timm's (an ``architecture``, no ``model_type``)."""
    return "architecture" in config and "model_type" not in config


def _side(size) -> int:
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"non-square img_size {list(size)} is not supported")
        size = size[0]
    return int(size)


def parse_config(config: dict) -> TimmViTConfig:
    """timm's ``config.json`` -> ``TimmViTConfig``; ``ValueError`` (one line) for what
    ``TimmViT`` cannot represent exactly."""
    arch = str(config.get("architecture", "")).split(".")[0]     # "name.tag": the tag is data
    # timm's legacy single-dict form holds the pretrained_cfg fields at the top level
    pretrained = config["pretrained_cfg"] if "pretrained_cfg" in config else config
    args = config.get("model_args") or {}
    if not isinstance(args, dict) or not isinstance(pretrained, dict):
        raise ValueError("timm model_args and pretrained_cfg must be JSON objects")
    args = dict(args)
    if plain := PLAIN.fullmatch(arch):
        dim, depth, heads, ratio = SIZES[plain[1]]
        base = dict(patch_size=int(plain[2]), img_size=int(plain[3]))
    elif dino := DINOV2.fullmatch(arch):
        dim, depth, heads, ratio = SIZES[dino[1]]
        base = dict(patch_size=14, img_size=518, init_values=1e-5)
        if dino[2]:
            base |= dict(reg_tokens=int(dino[2]), no_embed_class=True)
    else:
        raise ValueError(f"timm architecture {arch!r} is not supported; supported: "
                         "vit_{tiny,small,base,large,huge,giant,gigantic}_patch<P>_<size> and "
                         "vit_{small,base,large}_patch14[_reg<N>]_dinov2 (with model_args)")
    unknown = sorted(set(args) - set(ARGS) - set(IGNORED) - set(DEFAULT_ONLY))
    if unknown:
        raise ValueError(f"timm model_args {unknown} are not supported for {arch}; supported: "
                         f"{', '.join(ARGS)}")
    for key, default in DEFAULT_ONLY.items():
        if key in args and args[key] != default:
            raise ValueError(f"timm model_args {key}={args[key]!r} is not supported "
                             f"(only {default!r})")
    base |= dict(embed_dim=dim, depth=depth, num_heads=heads, mlp_ratio=ratio)
    input_size = pretrained.get("input_size") or [3]
    if not isinstance(input_size, (list, tuple)) or len(input_size) not in (1, 3):
        raise ValueError(f"timm pretrained_cfg input_size {input_size!r} is not [in_chans, "
                         "height, width] (int)")
    # as timm: the pretrained input size sets img_size only for a fixed-size model
    fixed = pretrained.get("fixed_input_size", False) and not args.get("dynamic_img_size")
    if fixed and len(input_size) == 3:
        base["img_size"] = _side(input_size[1:])
    base["in_chans"] = int(input_size[0])
    if pretrained.get("global_pool"):
        base["global_pool"] = pretrained["global_pool"]
    for source in (pretrained, config):          # the top level wins, as in timm
        if source.get("num_classes") is not None:
            base["num_classes"] = int(source["num_classes"])
    base |= {k: v for k, v in args.items() if k in ARGS}
    if isinstance(base["img_size"], (int, list, tuple)):
        base["img_size"] = _side(base["img_size"])
    cfg = TimmViTConfig(**base)
    if cfg.global_pool not in POOLS:
        raise ValueError(f"timm global_pool {cfg.global_pool!r} is not supported (an "
                         f"attention-pool head); supported: {POOLS}")
    if cfg.img_size % cfg.patch_size or cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"timm {arch}: img_size {cfg.img_size} / patch {cfg.patch_size} or "
                         f"embed_dim {cfg.embed_dim} / heads {cfg.num_heads} does not divide")
    return cfg


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """timm's ``Attention``: one fused ``qkv`` Linear (LoRA adapts it), ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, attend: Tensor | None = None) -> Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                  # [B, heads, T, d_h]
        mask = None if attend is None else attend[:, None, None, :].bool()   # keys [B,1,1,T]
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=1e-6)          # timm.layers.LayerNorm's default eps


class Block(nn.Module):
    """Pre-norm block, optional LayerScale (``ls1``/``ls2``), as timm's ``Block``."""

    def __init__(self, cfg: TimmViTConfig):
        super().__init__()
        d = cfg.embed_dim
        self.norm1 = _norm(d)
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias)
        self.ls1 = LayerScale(d) if cfg.init_values else nn.Identity()
        self.norm2 = _norm(d)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.ls2 = LayerScale(d) if cfg.init_values else nn.Identity()

    def forward(self, x: Tensor, attend: Tensor | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), attend))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: TimmViTConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_chans, cfg.embed_dim, p, stride=p, bias=not cfg.pre_norm)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)             # [B, N, D]


class TimmViT(nn.Module):
    """timm's ``VisionTransformer`` for ``TimmViTConfig``, with timm's module names."""

    def __init__(self, cfg: TimmViTConfig):
        super().__init__()
        self.config = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, d)) \
            if cfg.reg_tokens else None
        prefix = 0 if cfg.no_embed_class else cfg.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid**2 + prefix, d))
        self.norm_pre = _norm(d) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[Block(cfg) for _ in range(cfg.depth)])
        self.norm = _norm(d) if cfg.final_norm and not cfg.use_fc_norm else nn.Identity()
        self.fc_norm = _norm(d) if cfg.final_norm and cfg.use_fc_norm else nn.Identity()
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()

    def prefix_tokens(self, batch: int) -> Tensor:
        """``[B, P, D]``: the class token then the registers (timm's order)."""
        parts = [t for t in (self.cls_token, self.reg_token) if t is not None]
        if not parts:
            return self.pos_embed.new_zeros(batch, 0, self.config.embed_dim)
        return torch.cat(parts, dim=1).expand(batch, -1, -1)

    def forward_features(self, images: Tensor) -> Tensor:
        """timm's ``forward_features`` at the pretrained size: ``[B, P+N, D]``."""
        x = self.patch_embed(images)                                    # [B, N, D]
        prefix = self.prefix_tokens(len(x))
        if self.config.no_embed_class:
            x = torch.cat([prefix, x + self.pos_embed], dim=1)
        else:
            x = torch.cat([prefix, x], dim=1) + self.pos_embed
        x = self.blocks(self.norm_pre(x))
        return self.norm(x)

    def pre_logits(self, features: Tensor) -> Tensor:
        """timm's ``forward_head(pre_logits=True)`` for the pools of ``POOLS``."""
        pool, p = self.config.global_pool, self.config.num_prefix_tokens
        patches = features[:, p:]
        pooled = {"": features, "token": features[:, 0], "avg": patches.mean(1),
                  "max": patches.amax(1),
                  "avgmax": 0.5 * (patches.mean(1) + patches.amax(1))}[pool]
        return self.fc_norm(pooled)


def resample_positions(pos: Tensor, grid: int) -> Tensor:
    """``[1, G*G, D]`` -> ``[1, grid*grid, D]``, as timm's ``resample_abs_pos_embed``
    (bicubic, antialiased)."""
    d = pos.shape[-1]
    side = int(round((pos.shape[1]) ** 0.5))
    if side == grid:
        return pos
    square = pos.reshape(1, side, side, d).permute(0, 3, 1, 2)
    square = square.to(torch.promote_types(square.dtype, torch.float32))
    square = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False,
                           antialias=True)
    return square.permute(0, 2, 3, 1).reshape(1, grid * grid, d).to(pos.dtype)


__all__ = ["TIMM_FAMILY", "TimmViT", "TimmViTConfig", "is_timm_config", "parse_config",
           "resample_positions"]
