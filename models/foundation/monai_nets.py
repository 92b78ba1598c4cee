"""MONAI networks as pretrained encoders: an allow-listed class built from LITERAL constructor
arguments, its weights read from safetensors and checked exactly against that architecture.

Two ways to describe one (both read by ``loading.load_encoder``):

* our directory layout (``save_monai``): ``config.json`` = ``{"model_type": "monai_vit",
  "constructor": {...}}`` (``monai_swin_unetr`` for SwinUNETR) + ``model.safetensors``;
* a MONAI bundle (``bundle.py``): ``configs/inference.json``'s ``network_def`` +
  ``models/model.safetensors``.

Nothing is evaluated: the class comes from ``MONAI_CLASSES`` (a closed registry), each argument
must be a plain JSON value (number, string, bool, null, or a list/object of those) and one of
the names that class is allowed to take here. ``ViT`` works in 2D and 3D (``spatial_dims``);
``MonaiViTSeams`` is its seams object for ``adapt.FoundationBackbone``. ``SwinUNETR`` loads and
is checked like any MONAI network (``load_network``), but is not yet a foundation backbone: a
segmentation network has no token sequence for the classification head, and ``read_config``
refuses it with one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from .coverage import FULL_NOT_COVERED

log = logging.getLogger(__name__)

VIT_TYPE = "monai_vit"
SWIN_UNETR_TYPE = "monai_swin_unetr"
# model_type -> (class in monai.networks.nets, constructor arguments a checkpoint may set).
# Not here on purpose: arguments that take a class or module (SwinUNETR's norm_layer, a
# downsample module), flash attention and save_attn (runtime switches, not architecture).
MONAI_CLASSES: dict[str, tuple[str, tuple[str, ...]]] = {
    VIT_TYPE: ("ViT", (
        "in_channels", "img_size", "patch_size", "hidden_size", "mlp_dim", "num_layers",
        "num_heads", "proj_type", "pos_embed_type", "classification", "num_classes",
        "dropout_rate", "spatial_dims", "post_activation", "qkv_bias")),
    SWIN_UNETR_TYPE: ("SwinUNETR", (
        "in_channels", "out_channels", "patch_size", "depths", "num_heads", "window_size",
        "qkv_bias", "mlp_ratio", "feature_size", "norm_name", "drop_rate", "attn_drop_rate",
        "dropout_path_rate", "normalize", "patch_norm", "use_checkpoint", "spatial_dims",
        "downsample", "use_v2")),
}
# Arguments older MONAI took and ignored (SwinUNETR's img_size): dropped, with a log line.
IGNORED_ARGS: dict[str, tuple[str, ...]] = {SWIN_UNETR_TYPE: ("img_size",)}
CLASS_TYPES = {cls: model_type for model_type, (cls, _) in MONAI_CLASSES.items()}
NOT_A_BACKBONE = {SWIN_UNETR_TYPE: (
    "SwinUNETR is a segmentation network, not a token encoder: fine-tune it with "
    "model=foundation_swin task=lesion_seg (models/foundation/swin.py)")}


def model_type_of_target(target: str) -> str | None:
    """``"ViT"``, ``"monai.networks.nets.ViT"`` or ``"monai.networks.nets.vit.ViT"`` ->
    ``"monai_vit"``; None for anything else."""
    if not isinstance(target, str):
        return None
    parts = target.split(".")
    cls = parts[-1]
    if cls not in CLASS_TYPES:
        return None
    if len(parts) == 1 or parts[:-1] == ["monai", "networks", "nets"] or \
            parts[:-1] == ["monai", "networks", "nets", cls.lower().replace("unetr", "_unetr")]:
        return CLASS_TYPES[cls]
    return None


def is_literal(value) -> bool:
    """A plain JSON value: what a constructor argument may be (nothing to evaluate)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and is_literal(v) for k, v in value.items())
    return False


def check_constructor(model_type: str, args, where: str) -> dict:
    """``args`` if every name is allowed for the class and every value a literal; one-line
    ``FoundationLoadError`` otherwise. Ignored legacy arguments are dropped."""
    from .loading import FoundationLoadError

    cls, allowed = MONAI_CLASSES[model_type]
    if not isinstance(args, dict):
        raise FoundationLoadError(f"{where}: the {cls} constructor arguments must be an object")
    args = dict(args)
    for name in IGNORED_ARGS.get(model_type, ()):
        if name in args:
            log.info("%s: %s ignores %s (removed from MONAI); dropped", where, cls, name)
            args.pop(name)
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise FoundationLoadError(f"{where}: unknown MONAI {cls} argument(s) {unknown}; "
                                  f"valid: {', '.join(allowed)}")
    bad = sorted(k for k, v in args.items() if not is_literal(v))
    if bad:
        raise FoundationLoadError(f"{where}: {cls} argument(s) {bad} are not plain values")
    return args


def build_network(model_type: str, args: dict, where: str) -> nn.Module:
    """``monai.networks.nets.<class>(**args)``; MONAI's own argument checks as one line."""
    from monai.networks import nets

    from .loading import FoundationLoadError

    cls = MONAI_CLASSES[model_type][0]
    args = check_constructor(model_type, args, where)
    # a site sizing a job's model builds it on the meta device, where SwinUNETR's
    # constructor (Tensor.item()) fails: the site's own network, sized by its own config
    # file, is built on the CPU then, and moved to the meta device
    sizing = torch.get_default_device().type == "meta"
    try:
        with torch.device("cpu") if sizing else contextlib.nullcontext():
            model = getattr(nets, cls)(**args)
        return model.to("meta") if sizing else model
    except Exception as err:         # MONAI validates its arguments: pass its reason on
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FoundationLoadError(f"{where}: MONAI refuses {cls}({', '.join(args)}): "
                                  f"{first}") from None


def load_network(directory: Path, model_type: str, args: dict,
                 weight_files: list[Path]) -> nn.Module:
    """Build the network and load ``weight_files`` into it exactly (every key, every shape,
    checked on the files' headers first), in evaluation mode; on the meta device only the
    check runs (no tensor data is read)."""
    from safetensors.torch import load_file

    from .loading import check_state_shapes

    model = build_network(model_type, args, str(directory))
    check_state_shapes(directory, model, weight_files)     # headers only: before any data
    if torch.get_default_device().type == "meta":   # config load, a site sizing a job's model
        return model.eval()
    state: dict[str, Tensor] = {}
    for path in weight_files:
        state |= load_file(str(path))
    model.load_state_dict(state, strict=True)
    return model.eval()


def save_monai(model: nn.Module, constructor: dict, directory: str | Path, *,
               model_type: str = VIT_TYPE) -> Path:
    """Write a MONAI network built with ``<class>(**constructor)`` as ``config.json`` +
    ``model.safetensors`` (the layout ``loading.load_encoder`` reads, and that
    ``<class>(**constructor).load_state_dict(safetensors.torch.load_file(...))`` reads)."""
    from safetensors.torch import save_file

    from .loading import CONFIG_FILE, WEIGHTS_FILE

    constructor = check_constructor(model_type, constructor, "save_monai")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(
        {"model_type": model_type, "constructor": constructor}, indent=2, sort_keys=True))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    return directory


def encoder_spatial_dims(config: dict) -> int:
    """2 or 3: what inputs the encoder of a directory's config (``loading.read_config``)
    takes; only MONAI networks can be 3D (MONAI's default ``spatial_dims`` is 3)."""
    if config.get("model_type") not in MONAI_CLASSES:
        return 2
    return int(config.get("constructor", {}).get("spatial_dims", 3))


def _as_tuple(value, dims: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),) * dims


def resample_positions(pos: Tensor, source: tuple[int, ...], target: tuple[int, ...]) -> Tensor:
    """``[1, prod(source), D]`` positions on a ``source`` grid -> ``[1, prod(target), D]``
    (bicubic in 2D as HF does, trilinear in 3D where PyTorch has no bicubic)."""
    d = pos.shape[-1]
    if source == target:
        return pos
    grid = pos.reshape(1, *source, d).movedim(-1, 1).float()              # [1, D, *source]
    mode = "bicubic" if len(source) == 2 else "trilinear"
    out = F.interpolate(grid, size=target, mode=mode, align_corners=False)
    return out.movedim(1, -1).reshape(1, -1, d).to(pos)


class MonaiViTSeams:
    """MONAI's ``ViT`` in 2D or 3D: ``PatchEmbeddingBlock`` (conv or perceptron) +
    ``TransformerBlock``s taking ``attn_mask [B, T]`` (0 = masked) + ``norm``; a CLS token
    only when built with ``classification=True``. MONAI keeps its architecture in no config
    object, so the seams are built from the checkpoint's constructor arguments."""

    name = VIT_TYPE
    lora_targets = ("qkv",)        # SABlock's fused q/k/v Linear (out_proj: pass it as a target)
    dp_unsupported = None
    dp_refused_methods = FULL_NOT_COVERED
    masks_tokens = True

    def __init__(self, constructor: dict | None = None):
        args = dict(constructor or {})
        self.spatial_dims = int(args.get("spatial_dims", 3))
        self._has_cls = bool(args.get("classification", False))
        self._patch = _as_tuple(args.get("patch_size", 16), self.spatial_dims)
        size = _as_tuple(args.get("img_size", 224), self.spatial_dims)
        self._grid = tuple(s // p for s, p in zip(size, self._patch))     # pretrained grid

    @property
    def has_cls(self) -> bool:
        return self._has_cls

    def patch_size(self, encoder):
        # A non-cubic pretrained patch is resampled to this cube (adapt.channel_patch_kernel).
        return self._patch[0]

    def hidden_size(self, encoder):
        return int(encoder.norm.normalized_shape[0])

    def patch_kernel(self, encoder):
        proj = encoder.patch_embedding.patch_embeddings
        if isinstance(proj, (nn.Conv2d, nn.Conv3d)):
            return proj.weight, proj.bias                                 # [D, C, *p]
        # perceptron: Rearrange "b c (h p1) (w p2) [(d p3)] -> b (h w [d]) (p1 p2 [p3] c)",
        # then a Linear: its input is (patch position, channel), channel fastest
        linear = proj[1]
        c = linear.in_features // int(torch.tensor(self._patch).prod())
        weight = linear.weight.reshape(-1, *self._patch, c).movedim(-1, 1)
        return weight, linear.bias

    def cls_token(self, encoder):
        return encoder.cls_token if self._has_cls else None

    def position_embedding(self, encoder, grid):
        pos = resample_positions(encoder.patch_embedding.position_embeddings, self._grid,
                                 (grid,) * self.spatial_dims)
        # MONAI adds positions to patches only; its CLS token carries none.
        return (torch.zeros_like(pos[:, :1]) if self._has_cls else None), pos

    def blocks(self, encoder):
        return list(encoder.blocks)

    def registers(self, encoder):
        return 0

    def encode(self, encoder, tokens, attend, num_channels, grid):
        x = tokens
        for block in encoder.blocks:
            x = block(x, None, attend)       # (x, context, attn_mask): positional on purpose
        return encoder.norm(x)

    def unused(self, encoder):
        head = getattr(encoder, "classification_head", None)
        return [encoder.patch_embedding.patch_embeddings] + ([head] if head is not None else [])

    def batch_major_folds(self, encoder):
        return ()        # one row per sample in every layer


__all__ = ["CLASS_TYPES", "MONAI_CLASSES", "MonaiViTSeams", "NOT_A_BACKBONE", "SWIN_UNETR_TYPE",
           "VIT_TYPE", "build_network", "check_constructor", "encoder_spatial_dims",
           "is_literal", "load_network",
           "model_type_of_target", "resample_positions", "save_monai"]
