"""Cross-field checks of a composed experiment that a schema cannot express; model and task
options are validated against their registries before any site trains."""

from __future__ import annotations

import math

from pathlib import Path
from typing import TYPE_CHECKING

from models import MODELS, TASKS
from models.weights import PretrainedError, check_compatible, load_pretrained
from protocol import wire
from protocol.layout import LayoutError, check_volume_layout
from protocol.partial import local_keys, unmatched_patterns
from protocol.secagg_encoding import Encoding
from protocol.secagg_protocol import SecAggConfig, SecAggError
from strategies.registry import (StrategyConfigError, strategies_with, strategy_entry,
                                 validate_strategy)

from .buildable import built_model, validate_servable
from .privacy import validate_privacy
from .schema import ConfigError, ExperimentConfig

if TYPE_CHECKING:
    from torch import nn


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cross-field checks that a schema cannot express."""
    _validated_model(cfg)
    return cfg


def _validated_model(cfg: ExperimentConfig) -> nn.Module:
    """:func:`validate`'s checks; the phase's model as the sites build it (meta device)."""
    try:
        MODELS.config(cfg.model.name, cfg.model_options())
        TASKS.config(cfg.task.name, cfg.task_options())
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError(str(err).strip('"')) from None
    if cfg.model.pretrained is not None:
        try:
            saved, _ = load_pretrained(cfg.model.pretrained)
            check_compatible(saved, cfg.model_options())
        except PretrainedError as err:
            raise ConfigError(f"model.pretrained: {err}") from None
    validate_foundation(cfg)
    try:
        validate_strategy(cfg.strategy.name, cfg.strategy.options)
    except StrategyConfigError as err:
        raise ConfigError(str(err)) from None
    fed, strat = cfg.federation, cfg.strategy
    if fed.num_sites < 1 or fed.num_rounds < 1:
        raise ConfigError("federation.num_sites and federation.num_rounds must be >= 1")
    if strat.min_available_sites > fed.num_sites:
        raise ConfigError(f"strategy.min_available_sites={strat.min_available_sites} exceeds "
                          f"federation.num_sites={fed.num_sites}; the run could never start")
    if not (0 < strat.fraction_train <= 1 and 0 <= strat.fraction_evaluate <= 1):
        raise ConfigError("strategy fractions must be in (0, 1]")
    if not (math.isfinite(fed.cpus_per_site) and fed.cpus_per_site > 0):
        raise ConfigError(f"federation.cpus_per_site must be > 0, got {fed.cpus_per_site}")
    # Ray's shares: a fraction of one GPU, or whole GPUs
    gpus = fed.gpus_per_site
    if not (math.isfinite(gpus) and gpus >= 0 and (gpus <= 1 or float(gpus).is_integer())):
        raise ConfigError("federation.gpus_per_site must be a share of one GPU in [0, 1] or a "
                          f"whole number of GPUs, got {gpus}")
    if fed.round_timeout <= 0 or fed.quorum_timeout <= 0:
        raise ConfigError("federation.round_timeout and federation.quorum_timeout must be > 0 s")
    if strat.max_update_norm is not None and strat.max_update_norm <= 0:
        raise ConfigError("strategy.max_update_norm must be > 0 (or null to disable)")
    if strat.max_norm_ratio is not None and strat.max_norm_ratio <= 1:
        raise ConfigError("strategy.max_norm_ratio must be > 1 (or null to disable)")
    if strat.min_train_sites < 1 or strat.min_train_sites > fed.num_sites:
        raise ConfigError(f"strategy.min_train_sites must be in [1, federation.num_sites="
                          f"{fed.num_sites}], got {strat.min_train_sites}")
    if strat.local_params:
        import torch
        with torch.device("meta"):      # names only: no memory, no weights read
            names = [n for n, _ in MODELS.build(cfg.model.name, cfg.model_options(),
                                                foundation_dir=cfg.model.foundation_dir
                                                ).named_parameters()]
        unmatched = unmatched_patterns(names, strat.local_params)
        if unmatched:
            raise ConfigError(f"strategy.local_params {unmatched} match no model parameter; "
                              f"names look like {names[:3]} ... {names[-2:]}")
        if len(local_keys(names, strat.local_params)) == len(names):
            raise ConfigError("strategy.local_params match every parameter: nothing is shared")
    if cfg.resume and str(cfg.resume).lower() not in ("true", "latest"):
        from ..resume import check_resume_dir   # the resume rules live in one place
        check_resume_dir(Path(cfg.resume))      # a run dir, or a two-phase run's (pretrain/)
    if len(set(cfg.task.class_names)) != len(cfg.task.class_names) or len(cfg.task.class_names) < 2:
        raise ConfigError("task.class_names must list at least two distinct classes")
    head_settings = [name for name, on in (("train.head_lr", cfg.train.head_lr is not None),
                                           ("train.head_only_rounds", cfg.train.head_only_rounds),
                                           ("privacy.head_clip_share",
                                            cfg.privacy.head_clip_share is not None)) if on]
    treat = f"{' and '.join(head_settings)} treat{'s' if len(head_settings) == 1 else ''}"
    if head_settings and TASKS.factory(cfg.task.name).uses_unlabelled:   # known: config() passed
        raise ConfigError(f"{treat} a class head apart, and the "
                          f"{cfg.task.name} objective's model has none; unset them (in a "
                          "pretrain -> fine-tune run they apply to fine-tuning only)")
    if cfg.train.head_lr_rounds and cfg.train.head_lr is None:
        raise ConfigError(f"train.head_lr_rounds={cfg.train.head_lr_rounds} limits the rounds "
                          "of the head's own rate, and train.head_lr is unset; set both or "
                          "neither")
    if cfg.train.head_only_rounds >= fed.num_rounds:
        raise ConfigError(f"train.head_only_rounds={cfg.train.head_only_rounds} covers every one "
                          f"of the {fed.num_rounds} rounds: nothing but the head would train; "
                          "for a linear probe use model.options.method=linear_probe")
    validate_layout(cfg)
    validate_privacy(cfg)
    validate_secagg(cfg)
    pretrained = validate_pretrain(cfg)
    # last: a refusal above names the setting more precisely than a failed build can
    model, task = built_model(cfg, pretrained)  # as every site builds it (meta device), from
                                                # phase 1's backbone if any, or refused
    validate_servable(cfg, model, task)
    if head_settings:
        _validate_head(cfg, model, treat)
    return model


def _validate_head(cfg: ExperimentConfig, model, treat: str) -> None:
    """The head settings need a class head that trains in the model the sites build (each
    site would refuse them otherwise)."""
    from models.tasks import trained_head

    head = trained_head(model)
    if head is None:
        raise ConfigError(f"{treat} a class head apart, and the "
                          f"{cfg.task.name} task's {type(model).__name__} has no class head "
                          "that trains (model.head); unset them")
    own = {id(p) for p in head.parameters()}
    if cfg.privacy.head_clip_share is not None and \
            all(id(p) in own for p in model.parameters() if p.requires_grad):
        raise ConfigError("privacy.head_clip_share splits the clipping bound between the "
                          "class head and the rest, and only the head trains here "
                          f"(model.options.method={cfg.model_options().get('method')}); "
                          "unset it")


def validate_layout(cfg: ExperimentConfig) -> None:
    """The data layout is valid (the same schema each site checks it with again), its
    channels are the model's inputs, and a 3D layout has a grid, volume intensities and a
    model that takes volumes (``spatial_dims``: the layout sets it to 3)."""
    try:
        layout = cfg.data.layout_spec()
    except LayoutError as err:
        raise ConfigError(f"data/layout: {err}") from None
    if layout is None:
        return
    if not layout.report and _trains_on_reports(cfg):
        raise ConfigError(f"task={cfg.task.name} learns from radiology reports but "
                          f"data/layout={layout.name} declares none (report: false): its "
                          "sites would train on no pairs; use a layout whose studies carry "
                          "reports (e.g. chest_xray) or another objective")
    if layout.dims == "3d":
        try:
            check_volume_layout(layout)          # the rule each site applies again
        except LayoutError as err:
            raise ConfigError(f"data/layout={layout.name}: {err}") from None
        if "spatial_dims" not in cfg.model_options():
            raise ConfigError(f"data/layout={layout.name} is 3D but model={cfg.model.name} "
                              "takes 2D images only; use a ViT model (e.g. model=mmvit_tiny)")
    n = cfg.model_options().get("num_sequences")
    if n is not None and n != len(layout.input_channels):
        raise ConfigError(f"model.options.num_sequences={n} but data/layout={layout.name} has "
                          f"{len(layout.input_channels)} input channels "
                          f"({', '.join(layout.input_channels)}); remove the option")


def _trains_on_reports(cfg: ExperimentConfig) -> bool:
    """Whether the phase's task reads reports (its ``data_needs``; CLIP does)."""
    try:
        task = TASKS.build(cfg.task.name, cfg.task_options())
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"task={cfg.task.name}: {err}") from None
    return task.data_needs.reports is not None


def validate_foundation(cfg: ExperimentConfig) -> None:
    """A foundation model's weights NAME must resolve in the coordinator's own
    ``model.foundation_dir`` (it builds the initial global model and the base digest from it;
    sites resolve the same name in their own foundation-dir), its weight files must fit its
    config (names and shapes from the safetensors headers; no tensor data is read: the
    weights load when the run starts), and DP-SGD must cover its family."""
    if "foundation_dir" not in MODELS.resources(cfg.model.name):
        if cfg.model.foundation_dir is not None:
            raise ConfigError(f"model.foundation_dir is set but model={cfg.model.name} loads "
                              "no pretrained encoder; remove it")
        return
    from models.foundation import resolve_weights
    from models.foundation.coverage import family_dp_refusal
    from models.foundation.families import FAMILIES
    from models.foundation.loading import (FoundationLoadError, check_weights_fit, family_of,
                                           read_config)
    from models.foundation.monai_nets import encoder_spatial_dims

    name = str(cfg.model.options.get("weights", ""))
    try:
        directory = resolve_weights(cfg.model.foundation_dir, name)
        family = family_of(directory)
        check_weights_fit(directory)
    except FoundationLoadError as err:
        raise ConfigError(f"model.options.weights: {err}") from None
    from models.foundation.monai_nets import SWIN_UNETR_TYPE
    from models.foundation.objectives import directory_refusal

    options = MODELS.config(cfg.model.name, cfg.model_options())
    if (family == SWIN_UNETR_TYPE) != (cfg.model.name == "foundation_swin"):
        raise ConfigError(f"model.options.weights={name} holds a {family} network: "
                          + ("use model=foundation_swin task=lesion_seg"
                             if family == SWIN_UNETR_TYPE else
                             "model=foundation_swin needs a MONAI SwinUNETR"))
    method = options.method
    dims = encoder_spatial_dims(read_config(directory))     # a 3D layout: a 3D MONAI ViT
    if dims != options.spatial_dims:
        raise ConfigError(f"model.options.weights={name} is a {dims}D encoder but the inputs are "
                          f"{options.spatial_dims}D; "
                          + ("a 3D layout needs a MONAI ViT built with spatial_dims=3"
                             if options.spatial_dims == 3 else "use a 2D encoder"))
    if family == SWIN_UNETR_TYPE:
        _validate_swin(cfg, method, read_config(directory).get("constructor") or {})
        return
    length = cfg.task.options.get("max_length")      # an image-report objective's reports
    refusal = directory_refusal(directory, cfg.task.name, method, options.channel_tokens,
                                max_length=int(length) if length is not None else None)
    if refusal:
        raise ConfigError(f"model.options.weights={name}: {refusal}")
    # properties of the family (class level): the whole family, or this method on it
    reason = family_dp_refusal(FAMILIES[family], method)
    if cfg.privacy.mechanism == wire.DP_SGD and reason:
        raise ConfigError(f"privacy.mechanism=dp-sgd refused for a {family} foundation model: "
                          f"{reason}; or use privacy=sitedp")


def _validate_swin(cfg: ExperimentConfig, method: str, constructor: dict) -> None:
    """A pretrained SwinUNETR is the segmentation task's whole network; DP-SGD covers its
    LoRA fine-tune unless ``swin_dp_refusal`` says why not."""
    from models.foundation.swin import swin_dp_refusal

    if cfg.task.name != "segmentation" or cfg.pretrain.objective is not None:
        raise ConfigError("model=foundation_swin is a segmentation network: use "
                          "task=lesion_seg (task name segmentation) and no pretraining phase")
    reason = swin_dp_refusal(method, constructor)
    if cfg.privacy.mechanism == wire.DP_SGD and reason:
        raise ConfigError(f"privacy.mechanism=dp-sgd refused for model=foundation_swin: "
                          f"{reason}; or use privacy=sitedp")


def validate_pretrain(cfg: ExperimentConfig) -> nn.Module | None:
    """Phase 1 must be a registered self-supervised objective the phase-2 model can start
    from; returns phase 1's model as its sites build it (meta device; None without phase 1),
    which ``built_model`` hands phase 2's backbone as the coordinator will."""
    p = cfg.pretrain
    if p.objective is None:
        if p.num_rounds:
            raise ConfigError("pretrain.num_rounds is set but pretrain.objective is null")
        return None
    if p.num_rounds < 1:
        raise ConfigError(f"pretrain.objective={p.objective} needs pretrain.num_rounds >= 1")
    try:
        task = TASKS.factory(p.objective)
    except KeyError as err:
        raise ConfigError(f"pretrain.objective: {str(err).strip(chr(34))}") from None
    if not task.uses_unlabelled:
        raise ConfigError(f"pretrain.objective={p.objective} is not a pretraining objective "
                          "(it does not learn from unlabelled studies)")
    if p.registered_model == cfg.tracking.registered_model:
        raise ConfigError("pretrain.registered_model must differ from tracking.registered_model: "
                          "each phase registers its own model")
    try:
        return _validated_model(cfg.pretrain_phase())
    except ConfigError as err:
        raise ConfigError(f"pretraining phase: {err}") from None


def validate_secagg(cfg: ExperimentConfig) -> None:
    """Secure aggregation hides individual updates: refuse what needs to see them."""
    s = cfg.secagg
    if not s.enabled:
        return
    if not strategy_entry(cfg.strategy.name).secagg_ready:
        ready = ", ".join(strategies_with("secagg_ready"))
        raise ConfigError(f"secagg.enabled with strategy={cfg.strategy.name}: secure aggregation "
                          f"only reveals the weighted sum of updates; use one of {ready}")
    if cfg.strategy.local_params:
        raise ConfigError("secagg.enabled with strategy.local_params is not supported: the "
                          "masked vector covers the whole model")
    if cfg.strategy.max_update_norm is not None:
        raise ConfigError("secagg.enabled with strategy.max_update_norm: the server cannot see "
                          "individual update norms; bound updates at the sites "
                          "(privacy=sitedp clips them) instead")
    if cfg.privacy.mechanism == wire.DP_SITE and s.clip_range < cfg.privacy.clipping_norm:
        raise ConfigError(f"secagg.clip_range={s.clip_range} < privacy.clipping_norm="
                          f"{cfg.privacy.clipping_norm}: a clipped site update can still have "
                          "values the encoding would clip again; raise secagg.clip_range")
    try:
        SecAggConfig(degree=s.degree, threshold=s.threshold,
                     encoding=Encoding(clip_range=s.clip_range, max_sites=cfg.federation.num_sites,
                                       max_weight=s.max_weight)).resolve(cfg.federation.num_sites)
    except (SecAggError, ValueError) as err:
        raise ConfigError(f"secagg: {err}") from None
