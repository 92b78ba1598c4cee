"""Weights out: a fine-tuned foundation backbone in its own family's format, usable without
MedFed's training code or MLflow.

``export_foundation(model, DIR)`` writes::

    DIR/encoder/                  the adapted encoder, adapters MERGED into the base weights:
                                  ``save_pretrained`` (transformers) or config.json +
                                  model.safetensors (MONAI ViT, ``loading.save_monai_vit``;
                                  timm ViT in timm's hub layout, ``timm_family.save_timm_vit``);
                                  ``loading.load_encoder`` reads it like any pretrained encoder
    DIR/adapter/                  lora/dora/ia3 only: the adapters alone as a ``peft`` adapter
                                  directory (adapter_config.json + adapter_model.safetensors),
                                  relative to the ORIGINAL encoder (``load_encoder(original)
                                  .encoder``: the vision tower of a CLIP/SigLIP/SAM model), so
                                  ``PeftModel.from_pretrained(base, DIR/adapter)`` works
    DIR/adaptation.safetensors    what the multi-channel adaptation added: one patch embedding
                                  per channel and the channel embedding (``channel_tokens=
                                  fused``: one patch embedding over all channels, no channel
                                  embedding, the presence embedding if configured), the class
                                  head
    DIR/adaptation.json           what those tensors are, the FoundationConfig, and ``extra``;
                                  ``"format": "medfed-foundation-export/8"`` (format version 8)
    DIR/encoder/feature_mean.safetensors
                                  ``centre_features`` only: the public mean of the pooled
                                  features the model subtracts before its head (centring.py),
                                  where ``load_encoder``'s directory is read from
    DIR/encoder/feature_scale.safetensors
                                  ``scale_features`` only: the public per-dimension spread the
                                  centred features are divided by (centring.py)
    DIR/encoder/feature_projection.safetensors
                                  ``project_features`` only: the public principal directions
                                  the (centred) pooled features are projected on before the
                                  head (projection.py)

After CLIP/SigLIP pretraining from a loaded pair, ``DIR/pair/`` (``save_pair``) also holds
the whole pair - both towers with their adapters merged, projections, temperature, tokenizer -
as the family's own ``CLIPModel`` / ``SiglipModel`` directory.

``load_export(DIR)`` rebuilds the whole adapted model (merged encoder + adaptation parts).
The encoder's own RGB patch projection is exported unchanged; the adapted model never uses it
(``adaptation.json`` says so), so ``DIR/encoder`` alone is the fine-tuned transformer for RGB
inputs, and with the adaptation parts it is the multi-channel model MedFed trained.

Format versions (``FORMAT_VERSION``): 1 wrote ``"format": "medfed-foundation-export"``
(per-channel tokens; session 20's version-1 files may carry ``channel_tokens``, read as
written); 2 added ``config.channel_tokens`` (``fused``) and
``config.presence_embedding`` (with the part ``presence_embed``); 3 added
``config.centre_features`` (with ``encoder/feature_mean.safetensors``); 4 added
``config.freeze_patch_embed`` (a training choice: the exported tensors are the same); 5 added
``config.project_features`` (with ``encoder/feature_projection.safetensors``); 6 added
``config.patch_init`` (an initialisation choice: the exported tensors are the same); 7 added
``config.scale_features`` (with ``encoder/feature_scale.safetensors``); 8 added
``config.freeze_lora_a`` (a training choice: the exported tensors are the same). The version is
part of the ``format`` string, not a key beside it, because a version-1 reader compares that string
and nothing else: it refuses a version-2 file with its own format error instead of failing on
a config key it does not know. ``load_export`` reads every version up to ``FORMAT_VERSION``
(version 1 without ``channel_tokens`` = ``per_channel``; before 3, no centring; before 4, the
patch embedding trained; before 5, no projection; before 6, ``patch_init=mean``; before 7, no scaling; before 8, every ``lora_A`` trained) and refuses a
newer one by name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import nn

from .adapt import FoundationBackbone
from .centring import save_feature_mean, save_feature_scale
from .config import FoundationConfig
from .loading import MONAI_MODEL_TYPE, load_encoder, save_monai_vit
from .projection import save_feature_projection
from .lora import NEW_PARTS, target_pattern
from .timm_family import save_timm_vit
from .timm_vit import TIMM_FAMILY

ENCODER_DIR = "encoder"
ADAPTER_DIR = "adapter"
PAIR_DIR = "pair"                    # save_pair's directory beside them (CLIP/SigLIP phases)
ADAPTATION_WEIGHTS = "adaptation.safetensors"
ADAPTATION_CONFIG = "adaptation.json"
FORMAT = "medfed-foundation-export"
FORMAT_VERSION = 8      # 8: config.freeze_lora_a; see the module docstring
ADAPTER_METHODS = ("lora", "dora", "ia3")
PEFT_ADAPTER = "default"             # the adapter name inject_adapter_in_model gives
PEFT_PREFIX = "base_model.model."    # how a PeftModel names its base model's modules


class ExportFormatError(ValueError):
    """A directory is not a foundation export this version can read; says why."""


def merge_adapters(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (a FoundationBackbone, or a pair's text tower) with every peft
    adapter (LoRA, DoRA, IA3) merged into its base layer and the peft wrapper replaced by
    that plain layer: the module tree, and so every state-dict key of the encoder, is the
    original family's again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(model)
    wrapped = [name for name, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in wrapped:
        layer = merged.get_submodule(name)
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(merged.get_submodule(parent), child, layer.get_base_layer())
    vars(merged).pop("peft_config", None)   # peft's injection set it; stale once merged
    return merged



def save_pair(pair, directory: str | Path) -> Path:
    """Write an image-report pair (``pair.PretrainedPair`` after CLIP/SigLIP pretraining) as
    the family's own ``CLIPModel`` / ``SiglipModel`` directory, adapters merged into BOTH
    towers, with the trained temperature (and SigLIP's bias) and the projections, plus the
    tokenizer files of the directory it was loaded from - ``from_pretrained`` reads it
    back with its tokenizer. The image tower is the encoder as the pair saw it (its own RGB
    patch projection; the multi-channel parts are in ``export_foundation``'s layout). The
    files copied are those ``convert-weights`` copies (``convert.COPIED_SUFFIXES``)."""
    import shutil

    import transformers

    from .convert import COPIED_SUFFIXES
    from .loading import HF_MODEL_TYPES

    vision = merge_adapters(pair.backbone).encoder
    text = merge_adapters(pair.text)
    class_name, tower, _ = HF_MODEL_TYPES[vision.config.model_type]
    if vision.config.model_type.endswith("_vision_model"):    # a tower alone has no text
        class_name = class_name.replace("VisionModel", "Model")
    holder_config = getattr(transformers, class_name).config_class
    extra = ({"projection_dim": pair.visual_projection.out_features}
             if pair.visual_projection is not None else {})
    config = holder_config(text_config=text.config.to_dict(),
                           vision_config=vision.config.to_dict(), **extra)
    with torch.device("meta"):                  # every part is replaced at once
        holder = getattr(transformers, class_name)(config)
    holder.vision_model, holder.text_model = vision, text
    for name in ("visual_projection", "text_projection"):
        if getattr(pair, name) is not None:
            setattr(holder, name, copy.deepcopy(getattr(pair, name)))
    for name in ("logit_scale", "logit_bias"):
        if getattr(pair, name) is not None:
            setattr(holder, name, nn.Parameter(getattr(pair, name).detach().clone()))
    left = [k for k, v in holder.state_dict().items() if v.is_meta]
    if left:
        raise RuntimeError(f"{class_name} holds more than the pair's parts: {left[:3]}")
    directory = Path(directory)
    holder.save_pretrained(str(directory), safe_serialization=True)
    for source in sorted(Path(pair.backbone.directory).iterdir()):   # tokenizer, model card
        if source.is_file() and source.suffix in COPIED_SUFFIXES and \
                not (directory / source.name).exists():    # save_pretrained's config stays
            shutil.copy2(source, directory / source.name)
    return directory


def _family_model(encoder: nn.Module) -> nn.Module:
    """The transformers class ``load_encoder`` reads back: the encoder itself, or (SAM's
    vision encoder) the small model class that holds it as a tower."""
    import transformers

    from .loading import HF_MODEL_TYPES

    class_name, tower, _ = HF_MODEL_TYPES[encoder.config.model_type]
    if not tower:
        return encoder
    with torch.device("meta"):      # the holder's own tower is replaced at once: allocate nothing
        holder = getattr(transformers, class_name)(encoder.config)
    setattr(holder, tower, encoder)
    left = [k for k, v in holder.state_dict().items() if v.is_meta]
    if left:
        raise RuntimeError(f"{class_name} holds more than its {tower}: {left[:3]}")
    return holder


def save_encoder(model: FoundationBackbone, directory: str | Path) -> Path:
    """Write ``model.encoder`` (merge adapters first) in its family's own layout."""
    directory = Path(directory)
    if model.family == MONAI_MODEL_TYPE:
        return save_monai_vit(model.encoder, dict(model.constructor or {}), directory)
    if model.family == TIMM_FAMILY:
        return save_timm_vit(model.encoder, dict(model.constructor or {}), directory)
    _family_model(model.encoder).save_pretrained(str(directory), safe_serialization=True)
    return directory


def save_adapter(model: FoundationBackbone, directory: str | Path) -> Path | None:
    """Write the adapters of ``model`` (unmerged) as a peft adapter directory for the
    original encoder; None when ``config.method`` trains no adapters."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    if model.config.method not in ADAPTER_METHODS:
        return None
    directory = Path(directory)
    targets = tuple(model.config.lora_targets) or model.seams.lora_targets
    config = copy.deepcopy(model.peft_config[PEFT_ADAPTER])
    config.target_modules = target_pattern(targets, within="")     # rooted at the encoder
    config.inference_mode = True
    config.base_model_name_or_path = None
    # peft picks the adapter tensors by walking model's own adapter layers, so it is given
    # the whole backbone; every adapter lives in the encoder, which becomes the root.
    state = get_peft_model_state_dict(model, adapter_name=PEFT_ADAPTER)
    outside = sorted(k for k in state if not k.startswith("encoder."))
    if not state or outside:
        raise RuntimeError(f"method={model.config.method}: expected adapter weights inside the "
                           f"encoder only, found {len(state)} ({outside[:3]} outside)")
    state = {k[len("encoder."):]: v for k, v in state.items()}
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in state.items()},
              str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def adaptation_state(model: FoundationBackbone) -> dict[str, torch.Tensor]:
    """The tensors the multi-channel adaptation added (``lora.NEW_PARTS``)."""
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
            if k.split(".")[0] in NEW_PARTS}


def describe(model: FoundationBackbone, *, adapter: bool, extra: dict | None = None) -> dict:
    """``adaptation.json``: how to use ``adaptation.safetensors`` with ``encoder/``."""
    dim, p = model.seams.hidden_size(model.encoder), model.patch_size
    # A pretraining objective's backbone (MAE, CLIP) has no class head: an encoder of
    # pooled features
    head = None if model.head is None else (
        f"Linear({model.head.in_features} -> {model.config.num_classes}) on the pooled features "
        + ("(CLS token, mean of present patch tokens)" if model.seams.has_cls
           else "(mean of present patch tokens)"))
    return {
        "format": f"{FORMAT}/{FORMAT_VERSION}", "family": model.family,
        "config": dataclasses.asdict(model.config),
        "input": f"images [B, {', '.join(map(str, model.input_shape))}], "
                 "absent channels all zero; present [B, S]",
        "patch_size": p, "grid": model.grid, "hidden_size": dim, "has_cls": model.seams.has_cls,
        "parts": _patch_parts(model, dim) | {"head": head} | (
            {} if model.feature_mean is None else {
                "feature_mean": f"encoder/feature_mean.safetensors: [{model.feature_mean.numel()}]"
                                " public mean subtracted from the pooled features before the "
                                "head"}) | (
            {} if model.feature_scale is None else {
                "feature_scale": f"encoder/feature_scale.safetensors: "
                                 f"[{model.feature_scale.numel()}] public per-dimension spread "
                                 "the centred features are divided by"}) | (
            {} if model.feature_projection is None else {
                "feature_projection": "encoder/feature_projection.safetensors: "
                                      f"[{', '.join(map(str, model.feature_projection.shape))}]"
                                      " public principal directions: the head sees pooled "
                                      "(minus the mean) @ directions.T"}),
        "encoder": ENCODER_DIR + "/", "adapter": ADAPTER_DIR + "/" if adapter else None,
        "adapters_merged_into_encoder": model.config.method in ADAPTER_METHODS,
        "extra": dict(extra or {}),
    }


def _patch_parts(model: FoundationBackbone, dim: int) -> dict[str, str]:
    """``adaptation.json``'s words for the patch (and channel) embeddings of either layout."""
    s, p, dims = model.config.num_channels, model.patch_size, model.spatial_dims
    patch = "x".join([str(p)] * dims)
    if model.fused:
        parts = {"patch_embed": f"Linear({s}*{'*'.join([str(p)] * dims)} -> {dim}) on the "
                                f"{patch} patches of all {s} channels at one location, "
                                "concatenated channel by channel (each row-major): one token per "
                                "location; an absent channel is all zero. Equal to a Conv with "
                                f"kernel [{dim}, {s}, {', '.join([str(p)] * dims)}] and stride "
                                f"{p} (weight.reshape({dim}, {s}, {', '.join([str(p)] * dims)}))"
                                "; replaces the encoder's RGB patch projection, which is "
                                "exported unchanged and unused. No channel embedding"}
        if model.presence_embed is not None:
            parts["presence_embed.embed"] = (f"Linear({s} -> {dim}, no bias) on the study's "
                                             "present row (1 present, 0 absent): added to "
                                             "every patch token")
        return parts
    return {"patch_embed.<c>": f"Linear({'*'.join([str(p)] * dims)} -> {dim}) "
                               f"on channel c's non-overlapping {patch} patches "
                               "(row-major); replaces the encoder's RGB "
                               "patch projection, which is exported unchanged and unused",
            "channel_embed.embed": f"Linear({s} -> {dim}, no bias) on one-hot channel "
                                   "indicators: added to every token of its channel"}


def export_foundation(model: FoundationBackbone, directory: str | Path, *,
                      extra: dict | None = None) -> Path:
    """Write ``model`` (as trained: adapters not merged) to ``directory`` in the layout of the
    module docstring; ``extra`` (task, class names, version) goes into adaptation.json."""
    from safetensors.torch import save_file

    if not isinstance(model, FoundationBackbone):
        raise TypeError(f"export_foundation needs a FoundationBackbone, got "
                        f"{type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merged = merge_adapters(model)
    save_encoder(merged, directory / ENCODER_DIR)
    if merged.feature_mean is not None:      # read back from there by load_export
        save_feature_mean(directory / ENCODER_DIR, merged.feature_mean, merged.feature_signature)
    if merged.feature_scale is not None:
        save_feature_scale(directory / ENCODER_DIR, merged.feature_scale,
                           merged.feature_signature)
    if merged.feature_projection is not None:
        save_feature_projection(directory / ENCODER_DIR, merged.feature_projection,
                                merged.feature_signature)
    adapter = save_adapter(model, directory / ADAPTER_DIR) is not None
    save_file(adaptation_state(merged), str(directory / ADAPTATION_WEIGHTS),
              metadata={"format": "pt"})
    (directory / ADAPTATION_CONFIG).write_text(
        json.dumps(describe(merged, adapter=adapter, extra=extra), indent=2, sort_keys=True)
        + "\n")
    return directory


def is_export(directory: str | Path) -> bool:
    """Whether ``directory`` looks like ``export_foundation``'s output."""
    return (Path(directory) / ADAPTATION_CONFIG).is_file()


def format_version(meta: dict, source: str = ADAPTATION_CONFIG) -> int:
    """The format version of a parsed ``adaptation.json`` (``source`` names it in errors).

    Raises
    ------
    ExportFormatError
        Not this format, or a version newer than ``FORMAT_VERSION``.
    """
    fmt = meta.get("format")
    if fmt == FORMAT:
        return 1                          # version 1 wrote the bare name
    name, _, version = fmt.rpartition("/") if isinstance(fmt, str) else ("", "", "")
    if name != FORMAT or not re.fullmatch(r"[1-9][0-9]{0,5}", version):
        raise ExportFormatError(f"{source}: format {fmt!r}, expected '{FORMAT}' or "
                                f"'{FORMAT}/<version>': not a MedFed foundation model export")
    if int(version) > FORMAT_VERSION:
        raise ExportFormatError(f"{source}: format version {version}, written by a "
                                f"newer MedFed; this one reads versions 1 to {FORMAT_VERSION}: "
                                "upgrade MedFed to load this export")
    return int(version)


def export_config(meta: dict, version: int,
                  source: str = ADAPTATION_CONFIG) -> FoundationConfig:
    """The ``FoundationConfig`` of a parsed ``adaptation.json`` of format ``version``
    (``source`` names it in errors).

    Raises
    ------
    ExportFormatError
        A config key this version does not know, or a value the config refuses.
    """
    config = meta.get("config")
    if not isinstance(config, dict):
        raise ExportFormatError(f"{source} (format version {version}): expected a 'config' "
                                f"object, got {type(config).__name__}: re-export the model")
    config = dict(config)
    if version == 1:
        # Version 1 had per-channel tokens only. (The session-20 writer put channel_tokens
        # into a version-1 file already; its weights say which, so it is read as written.)
        config.setdefault("channel_tokens", "per_channel")
    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(FoundationConfig)})
    if unknown:
        raise ExportFormatError(f"{source} (format version {version}): config keys "
                                f"{unknown} are unknown to this MedFed; it was written by "
                                "another version: upgrade MedFed, or re-export")
    try:
        return FoundationConfig(**config)
    except (TypeError, ValueError) as err:
        raise ExportFormatError(f"{source} (format version {version}): its config "
                                f"is not valid: {err}") from None


def load_export(directory: str | Path) -> FoundationBackbone:
    """The adapted model ``export_foundation`` wrote (adapters merged), in evaluation mode.

    Raises
    ------
    ExportFormatError
        Not an export, a format version newer than ``FORMAT_VERSION``, or its parts do not
        fit together.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    if not is_export(directory):
        raise ExportFormatError(f"{directory} has no {ADAPTATION_CONFIG}: not a foundation "
                                "model export")
    source = str(directory / ADAPTATION_CONFIG)
    try:
        meta = json.loads((directory / ADAPTATION_CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportFormatError(f"{source} is not JSON ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("family"), str):
        raise ExportFormatError(f"{source} must be a JSON object naming the encoder's "
                                "family: not a foundation model export")
    config = export_config(meta, format_version(meta, source), source)
    loaded = load_encoder(directory / ENCODER_DIR, expected_family=meta["family"])
    model = FoundationBackbone(loaded, config)
    if meta.get("parts", {}).get("head", "") is None:
        model.head = None                # exported from a pretraining objective
    missing, unexpected = model.load_state_dict(
        load_file(str(directory / ADAPTATION_WEIGHTS)), strict=False)
    missing = [k for k in missing if k.split(".")[0] in NEW_PARTS]
    if missing or unexpected:
        raise ExportFormatError(f"{directory / ADAPTATION_WEIGHTS} does not fit its config: "
                                f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


__all__ = ["ADAPTATION_CONFIG", "ADAPTATION_WEIGHTS", "ADAPTER_DIR", "ENCODER_DIR",
           "ExportFormatError", "FORMAT", "FORMAT_VERSION", "adaptation_state", "export_config",
           "export_foundation", "format_version", "is_export", "load_export", "merge_adapters",
           "save_adapter", "save_encoder"]
