"""A pretrained MONAI ``SwinUNETR`` as the segmentation task's whole network.

SwinUNETR is a segmentation network already (Swin encoder + convolutional decoder), so the
segmentation task trains it as it is instead of putting its UNETR decoder on a ViT
(``models.segmentation.SegmentationTask.wrap``). What the adaptation changes:

* the two convolutions that read the raw input (the Swin patch embedding and the decoder's
  first residual block, ``encoder1``) get one input channel per layout channel, each
  initialised from the pretrained kernel averaged over its input channels and scaled by
  ``C0 / S`` (a study whose channels are all equal gives the pretrained response). Absent
  channels are zero inputs, as everywhere: a convolution has no attention mask;
* the output block is replaced by a fresh 2-class one (lesion / background) when the
  pretrained one has another number of classes;
* what trains: LoRA on the Swin attention's ``qkv`` and ``proj`` Linears, the widened input
  convolutions, and the whole convolutional decoder; the rest of the Swin encoder is frozen and
  stays at the site (its digest is checked like any foundation base).

DP-SGD (method ``lora``): every trainable module has an exact per-sample rule - the LoRA
Linears, the (transposed) convolutions and affine Instance/GroupNorms (``models/conv_grads.py``).
Swin's window attention folds each sample's windows into the batch dimension batch-major
(MONAI's ``window_partition``), which the model declares (``batch_major_folds``) so the clipper
sums a sample's windows. Refused with one line (``swin_dp_refusal``): method ``full`` (the
relative-position bias tables are indexed inside the folded windows: no rule), a decoder
normalised with batch statistics, the checkpoint's own ``use_checkpoint`` (each block runs
twice, unannounced); ``gradient_checkpointing=true`` checkpoints the Swin blocks instead
(``models.checkpointing``: the clipper records the first run only, so it stays exact).
Registered as ``MODELS`` ``"foundation_swin"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpointing import checkpoint_blocks
from ..segmentation import SEGMENT_CLASSES     # background / lesion, the task's loss
from .config import check_weights_name

SWIN_METHODS = ("lora", "full")
INPUT_CONVS = ("swinViT.patch_embed.proj", "encoder1.layer.conv1.conv", "encoder1.layer.conv3.conv")
SWIN_LORA_TARGETS = ("attn.qkv", "attn.proj")    # WindowAttention; not patch_embed.proj


@dataclass(frozen=True)
class SwinSegConfig:
    """A pretrained SwinUNETR (``weights``: a bare NAME in each side's foundation-dir)."""

    weights: str = ""
    num_channels: int = 4
    image_size: int = 64
    spatial_dims: int = 2           # 3: volumes (a 3D layout sets it)
    num_classes: int = 3            # the study classes (unused; passed by the server)
    method: str = "lora"            # lora | full
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()    # () = SWIN_LORA_TARGETS
    lora_dropout: float = 0.0
    # each Swin block keeps only its input and runs again in backward (models.checkpointing):
    # exact under DP-SGD, unlike the checkpoint's own use_checkpoint (refused there)
    gradient_checkpointing: bool = False

    def __post_init__(self):
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if not isinstance(self.gradient_checkpointing, bool):   # "false" would switch it on
            raise ValueError(f"gradient_checkpointing must be true or false, got "
                             f"{self.gradient_checkpointing!r}")
        if not self.weights:
            raise ValueError("model option weights is required: the NAME of the pretrained "
                             "SwinUNETR's directory inside each site's foundation-dir")
        check_weights_name(self.weights)
        if self.method not in SWIN_METHODS:
            raise ValueError(f"unknown method {self.method!r} for a SwinUNETR; choose one of "
                             f"{', '.join(SWIN_METHODS)}")
        if self.spatial_dims not in (2, 3) or self.num_channels < 1:
            raise ValueError("spatial_dims must be 2 or 3 and num_channels >= 1")
        if self.image_size % 32 or self.image_size < 64:
            # at 32 its bottleneck is one voxel, where InstanceNorm cannot normalise (MONAI
            # raises "Expected more than 1 spatial element", in eval mode too)
            raise ValueError(f"SwinUNETR halves the image five times: image_size must be a "
                             f"multiple of 32 and at least 64, got {self.image_size}")
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError("lora_rank must be >= 1, lora_alpha > 0, lora_dropout in [0, 1)")


def swin_dp_refusal(method: str, constructor: dict) -> str | None:
    """Why DP-SGD's exact per-sample clipping does not cover this fine-tune, or None."""
    norm = constructor.get("norm_name", "instance")
    norm = str(norm[0] if isinstance(norm, (list, tuple)) else norm).lower()
    if method != "lora":
        return ("method=full trains the Swin relative-position bias tables, which have no "
                "exact per-sample gradient rule; use method=lora")
    if norm not in ("instance", "group"):
        return (f"the SwinUNETR decoder normalises with {norm!r}; only instance and group "
                "norms have an exact per-sample rule")
    if constructor.get("use_checkpoint"):
        return ("use_checkpoint=true runs each Swin block twice per step, unannounced to the "
                "clipper; save it without and set model.options.gradient_checkpointing=true")
    return None


def widen_conv(conv: nn.Module, channels: int) -> nn.Module:
    """A copy of ``conv`` reading ``channels`` inputs, each with the pretrained kernel averaged
    over the original inputs and scaled by ``C0 / channels``."""
    c0 = conv.in_channels
    kernel = conv.weight.detach().mean(dim=1, keepdim=True) * (c0 / channels)
    new = type(conv)(channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, bias=conv.bias is not None)
    with torch.no_grad():
        new.weight.copy_(kernel.expand_as(new.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


class SwinSegmenter(nn.Module):
    """``forward(images [B, S, *spatial], present [B, S]) -> logits [B, 2, *spatial]``."""

    # ``models.backbone.Backbone``'s optional parts: no class head (the output block trains
    # with the rest) and no public constants.
    head = None
    public_constants: tuple[str, ...] = ()

    def __init__(self, net: nn.Module, constructor: dict, config: SwinSegConfig):
        from monai.networks.blocks import UnetOutBlock

        super().__init__()
        dims = int(constructor.get("spatial_dims", 3))
        if dims != config.spatial_dims:
            raise ValueError(f"the SwinUNETR is {dims}D but the layout gives "
                             f"{config.spatial_dims}D inputs")
        self.config = config
        self.constructor = dict(constructor)
        self.family = "monai_swin_unetr"
        feature = net.encoder1.layer.conv1.conv.out_channels
        if not _has(net, INPUT_CONVS[2]) and config.num_channels != feature:
            raise ValueError("this SwinUNETR's first block has no residual projection (its "
                             "in_channels equal feature_size); num_channels must equal it too")
        for name in INPUT_CONVS:
            if not _has(net, name):
                continue                      # no residual projection when C0 == feature_size
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child,
                    widen_conv(net.get_submodule(name), config.num_channels))
        # Swin's relative_position_index buffers are integer constants of the architecture
        # (window size): out of the state dict, so they neither travel nor get averaged.
        for module in net.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                if not buf.is_floating_point():
                    module.register_buffer(name, buf, persistent=False)
        if int(constructor.get("out_channels", 0)) != SEGMENT_CLASSES:
            net.out = UnetOutBlock(dims, feature, SEGMENT_CLASSES)     # a fresh 2-class head
        self.net = net
        if config.gradient_checkpointing:
            from monai.networks.nets.swin_unetr import SwinTransformerBlock

            checkpoint_blocks(m for m in net.modules() if isinstance(m, SwinTransformerBlock))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One study's input ``(S, *spatial)``: what a registered version takes per sample."""
        c = self.config
        return (c.num_channels, *([c.image_size] * c.spatial_dims))

    @property
    def dp_unsupported(self) -> str | None:
        """Why DP-SGD is refused for this model (``swin_dp_refusal``), or None."""
        return swin_dp_refusal(self.config.method, self.constructor)

    @property
    def batch_major_folds(self) -> tuple[type[nn.Module], ...]:
        """Window attention sees ``[B * windows, tokens, C]``, sample-major (the clipper's
        ``FoldsBatch``; checked exact by tests/models/test_foundation_swin.py)."""
        from monai.networks.nets.swin_unetr import WindowAttention

        return (WindowAttention,)

    def forward(self, images: Tensor, present: Tensor) -> Tensor:
        # Absent channels are zero in ``images`` (StudyDataset does): zero inputs, no mask.
        return self.net(images)


def _has(net: nn.Module, name: str) -> bool:
    try:
        net.get_submodule(name)
        return True
    except AttributeError:
        return False


def load_swin(directory: str | Path) -> tuple[nn.Module, dict]:
    """The SwinUNETR in ``directory`` (our layout or a MONAI bundle), loaded exactly, and its
    constructor arguments; one-line ``FoundationLoadError`` for anything else."""
    from .loading import FoundationLoadError, check_weight_files, read_config
    from .monai_nets import SWIN_UNETR_TYPE, check_constructor, load_network

    config = read_config(directory)
    if config["model_type"] != SWIN_UNETR_TYPE:
        raise FoundationLoadError(f"{directory} holds a {config['model_type']} encoder; "
                                  "model=foundation_swin needs a MONAI SwinUNETR (use "
                                  "model=foundation for encoders)")
    args = check_constructor(SWIN_UNETR_TYPE, config.get("constructor"), str(directory))
    return load_network(directory, SWIN_UNETR_TYPE, args, check_weight_files(directory)), args


def apply_swin_method(model: SwinSegmenter) -> SwinSegmenter:
    """LoRA on the Swin attention + the new/decoder parts (``lora``), or everything."""
    c = model.config
    if c.method == "full":
        return model
    from peft import LoraConfig, inject_adapter_in_model

    from .lora import target_pattern

    targets = c.lora_targets or SWIN_LORA_TARGETS
    pattern = target_pattern(targets, within="net.swinViT")
    config = LoraConfig(r=c.lora_rank, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                        target_modules=pattern)
    model = inject_adapter_in_model(config, model)       # freezes all but the adapters
    for name, module in model.net.named_children():
        if name != "swinViT":
            module.requires_grad_(True)                  # the convolutional decoder + out
    for name in INPUT_CONVS:
        if _has(model.net, name):
            model.net.get_submodule(name).requires_grad_(True)
    return model


def export_swin(model: SwinSegmenter, directory: str | Path) -> Path:
    """Weights out in MONAI's own format: ``directory/config.json`` (``model_type``
    ``monai_swin_unetr``, the constructor with ``in_channels=S``, ``out_channels=2``) +
    ``model.safetensors`` with LoRA merged, so ``SwinUNETR(**constructor).load_state_dict(...)``
    is the fine-tuned network; ``load_swin`` reads it back like any pretrained SwinUNETR."""
    from .export import merge_adapters
    from .monai_nets import SWIN_UNETR_TYPE, save_monai

    merged = merge_adapters(model).net
    for module in merged.modules():        # the constants MONAI's own state dict holds
        for name, buf in list(module.named_buffers(recurse=False)):
            module.register_buffer(name, buf, persistent=True)
    constructor = dict(model.constructor, in_channels=model.config.num_channels,
                       out_channels=SEGMENT_CLASSES)
    return save_monai(merged, constructor, directory, model_type=SWIN_UNETR_TYPE)


def is_swin_export(directory: str | Path) -> bool:
    """Whether ``directory`` holds a SwinUNETR in our MONAI layout (``export_swin``'s)."""
    import json

    from .loading import CONFIG_FILE
    from .monai_nets import SWIN_UNETR_TYPE

    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text()).get("model_type") == SWIN_UNETR_TYPE
    except (OSError, ValueError, AttributeError):
        return False


__all__ = ["SWIN_LORA_TARGETS", "SwinSegConfig", "SwinSegmenter", "apply_swin_method",
           "export_swin", "is_swin_export", "load_swin", "swin_dp_refusal", "widen_conv"]
