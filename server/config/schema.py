"""The experiment schema: one frozen dataclass per Hydra config group, and the experiment.

The ``train`` and ``privacy`` groups are the protocol's own :class:`~protocol.job.TrainSettings`
and :class:`~protocol.job.PrivacySettings` (one definition, one set of defaults, one set of
rules for server and site); :meth:`ExperimentConfig.job_spec` is the one conversion into what
travels to the sites.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from protocol import wire
from protocol.job import JobSpec, PrivacySettings, PrivacySpec, TrainConfig, TrainSettings
from protocol.layout import DEFAULT_LAYOUT, Layout


class ConfigError(ValueError):
    """The experiment configuration is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mmvit"
    options: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None         # local save_pretrained directory to start from
    # model=foundation: the coordinator's OWN directory of pretrained encoders, where it
    # resolves options.weights (a bare name) to build the initial global model. Never sent:
    # each site resolves the same name in its node config's foundation-dir.
    foundation_dir: str | None = None


@dataclass(frozen=True)
class TaskConfig:
    name: str = "classification"
    class_names: list[str] = field(default_factory=lambda: ["high_grade_glioma",
                                                            "low_grade_glioma", "cyst"])
    image_size: int = 64
    options: dict[str, Any] = field(default_factory=dict)
    evaluate_missing: bool = False        # sites also score test with each sequence removed


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "fedavg"                  # a name in strategies.registry.STRATEGIES
    options: dict[str, Any] = field(default_factory=dict)   # that Flower class's own options
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_sites: int = 2              # usable updates a round needs, else it fails
    min_evaluate_sites: int = 2
    min_available_sites: int = 2          # connected sites needed before a phase starts
    max_update_norm: float | None = None  # L2 bound on local - global; None: no absolute bound
    max_norm_ratio: float | None = 10.0   # reject norms > ratio x the round's median (>= 3 sites)
    local_params: list[str] = field(default_factory=list)   # FedBN-style: fnmatch patterns
    personalize: bool = False             # sites also report their locally adapted model


@dataclass(frozen=True)
class FederationConfig:
    num_sites: int = 3
    num_rounds: int = 10
    round_timeout: float = 600.0          # seconds to wait for replies in one phase
    quorum_timeout: float = 120.0         # seconds to wait for min_available_sites
    cpus_per_site: float = 1.0            # Ray resources per simulated site
    gpus_per_site: float = 0.0
    # Simulation only: what each simulated site's operator would pass as SuperNode
    # --node-config (e.g. its privacy budget); written to <site>/node-config.toml.
    site_node_config: dict[str, Any] = field(default_factory=dict)
    # Sites whose operator set role=external evaluate every round on all their labelled
    # studies and never train (the server asks each node its role). Simulation: adds the
    # data root's external/ folder as one such site, beside the num_sites training sites.
    external_sites: bool = False


@dataclass(frozen=True)
class DataConfig:
    root: str = "runs/data"               # simulation: holds site-0 ... site-(n-1)
    # The modality layout (conf/data/layout/<name>.yaml, group data/layout): validated with
    # protocol.layout.Layout.from_dict at compose time, carried by the job (unless it is the
    # default) and validated again by each site.
    layout: dict[str, Any] = field(default_factory=dict)

    def layout_spec(self) -> Layout | None:
        """The layout the job carries; None for the default (or none composed).

        Raises
        ------
        protocol.layout.LayoutError
        """
        if not self.layout or self.layout.get("name") == DEFAULT_LAYOUT:
            return None
        return Layout.from_dict(self.layout)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None                # None: sqlite store inside the run directory
    experiment_name: str = "medfed"
    registered_model: str = "medfed-classifier"
    log_models: bool = True


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ (strategies/secagg.py): the server only ever sees the sum of site updates."""
    enabled: bool = False
    degree: int | None = None             # neighbours per site; null: ~2 log2(num_sites)
    threshold: float = 0.5                # Shamir threshold: fraction of the degree, or an int
    clip_range: float = 0.5               # |update delta| per value; larger is clipped (counted)
    max_weight: int = 1000                # example counts above this are capped in the sum
    authenticated: bool = True            # malicious-secure (signed keys, consistency stage);
                                          # false: semi-honest, only sites that allow it answer


@dataclass(frozen=True)
class PretrainConfig:
    """Phase 1 (optional): federated self-supervised pretraining with an objective from the
    task registry; phase 2 (the ``task``) then starts from its global backbone."""
    objective: str | None = None          # mae | mm_dino; null: no pretraining phase
    options: dict[str, Any] = field(default_factory=dict)
    num_rounds: int = 0
    local_epochs: int | None = None       # null: train.local_epochs
    lr: float | None = None               # null: train.lr
    registered_model: str = "medfed-pretrained"


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "demo"
    seed: int = 0
    runs_dir: str = "runs"
    resume: str | None = None             # "true"/"latest", or a run directory to continue
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of the resolved config (tags every model version it produced; a resume must
        match its checkpoint's). How a run is started (fresh or resumed) is not part of what
        it computes, nor is any setting at its default - a model's, task's or pretraining
        objective's option at its config class's default included - so a release adding a
        setting with a default, or a YAML spelling a default out, leaves every earlier run's
        hash (and its resume) as it was."""
        d = _set_fields(self)
        d.pop("resume", None)
        for group, registry, name in (("model", "MODELS", self.model.name),
                                      ("task", "TASKS", self.task.name),
                                      ("pretrain", "TASKS", self.pretrain.objective)):
            if "options" in d.get(group, {}):
                d[group]["options"] = _set_options(registry, name,
                                                   getattr(self, group).options)
                if not d[group]["options"]:
                    del d[group]["options"]
                if not d[group]:
                    del d[group]
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def model_options(self) -> dict[str, Any]:
        """Model options with the task's shape facts filled in (classes, image size)."""
        opts = dict(self.model.options)
        opts.setdefault("num_classes", len(self.task.class_names))
        # the image size under the model's own name for it (mmvit: img_size; foundation:
        # image_size); an unknown model is left for validate() to report
        size_key = "image_size" if "image_size" in _model_fields(self.model.name) else "img_size"
        opts.setdefault(size_key, self.task.image_size)
        layout = self.data.layout_spec()
        if layout is not None and "num_sequences" in _model_fields(self.model.name):
            # one model input per layout channel (a ct_window channel: one per window)
            opts.setdefault("num_sequences", len(layout.input_channels))
        if layout is not None and "num_channels" in _model_fields(self.model.name):
            # a foundation backbone: one patch embedding per layout channel
            opts.setdefault("num_channels", len(layout.input_channels))
        if layout is not None and layout.dims == "3d" and \
                "spatial_dims" in _model_fields(self.model.name):
            # the layout decides dimensionality: a 3D layout trains a 3D model on the
            # task.image_size cube (model yamls say spatial_dims: 2 for the 2D default)
            opts["spatial_dims"] = 3
        return opts

    def task_options(self) -> dict[str, Any]:
        """Task options with the shape facts filled in (class count, and class names for a
        task that uses them, e.g. CLIP's zero-shot prompts)."""
        opts = {"num_classes": len(self.task.class_names)}
        if "class_names" in _fields_of(self.task.name):
            opts["class_names"] = list(self.task.class_names)
        return opts | dict(self.task.options)

    def job_spec(self, run_id: str = "", base_digest: str = "") -> JobSpec:
        """What every site is asked to do in this phase (``run_id`` names it in their privacy
        ledgers; ``base_digest``: a foundation model's frozen base, as the coordinator built
        it). The proximal term is the strategy's own option (FedProx); Flower's FedProx
        also injects it into each train message."""
        train = TrainConfig(**asdict(self.train), seed=self.seed,
                            proximal_mu=float(self.strategy.options.get(
                                "proximal_mu", TrainConfig.proximal_mu)))
        private = self.privacy.mechanism != wire.DP_NONE
        settings = asdict(self.privacy)
        if self.privacy.mechanism == wire.DP_SITE and settings["min_contributors"] is None:
            settings["min_contributors"] = self.federation.num_sites
        privacy = PrivacySpec(**settings,
                              planned_rounds=self.federation.num_rounds if private else 0,
                              run_id=run_id if private else "")
        return JobSpec(
            model_name=self.model.name, model_options=self.model_options(),
            task_name=self.task.name, task_options=self.task_options(),
            class_names=tuple(self.task.class_names), image_size=self.task.image_size,
            train=train, privacy=privacy, seed=self.seed,
            personalize=self.strategy.personalize, local_params=tuple(self.strategy.local_params),
            evaluate_missing=self.task.evaluate_missing, base_digest=base_digest,
            layout=self.data.layout_spec())

    def pretrain_phase(self) -> ExperimentConfig:
        """Phase 1 as an experiment of its own: the objective as task, its rounds, its
        registered model; everything else (sites, strategy, privacy) as configured - but for
        the class head's own rate, head-only rounds and per-group clipping, fine-tuning
        settings: an objective's model has no class head to treat apart
        (``models.tasks.trained_head``), so sites would refuse phase 1 with them."""
        p = self.pretrain
        options = dict(p.options)
        # A semi-supervised objective sees the same labels as the fine-tuning phase.
        if "label_fraction" in self.task.options and p.objective and \
                "label_fraction" in _fields_of(p.objective):
            options.setdefault("label_fraction", self.task.options["label_fraction"])
        train = replace(self.train, local_epochs=p.local_epochs or self.train.local_epochs,
                        lr=p.lr or self.train.lr, head_lr=None, head_only_rounds=0,
                        head_lr_rounds=0)
        return replace(self, name=f"{self.name}-pretrain",
                       task=replace(self.task, name=p.objective, options=options),
                       train=train, pretrain=PretrainConfig(),
                       privacy=replace(self.privacy, head_clip_share=None),
                       federation=replace(self.federation, num_rounds=p.num_rounds),
                       tracking=replace(self.tracking, registered_model=p.registered_model))


def _plain(value: Any) -> Any:
    """``value`` as JSON has it (tuples are lists), so a YAML list equals a tuple default."""
    return json.loads(json.dumps(asdict(value) if hasattr(value, "__dataclass_fields__")
                                 else value, sort_keys=True, default=str))


def _default(f) -> Any:
    from dataclasses import MISSING
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def _set_fields(obj: Any) -> dict[str, Any]:
    """A config dataclass as a dict of its fields that differ from their defaults (nested
    config dataclasses likewise, left out when nothing in them is set)."""
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if hasattr(value, "__dataclass_fields__"):
            nested = _set_fields(value)
            if nested or _plain(value) != _plain(_default(f)):
                out[f.name] = nested
        elif _plain(value) != _plain(_default(f)):
            out[f.name] = _plain(value)
    return out


def _set_options(registry: str, name: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """A model's, task's or objective's options that differ from its config class's
    defaults (all of them, as given, for a name the registry does not know: validate()
    reports it)."""
    import models            # the registries import torch; the schema alone must not
    try:
        defaults = {f.name: _default(f) for f in fields(
            getattr(models, registry).config_class(name))}
    except (KeyError, TypeError, ValueError):
        return _plain(dict(options))
    return {k: _plain(v) for k, v in options.items()
            if k not in defaults or _plain(v) != _plain(defaults[k])}


def _model_fields(model_name: str) -> set[str]:
    from models import MODELS    # the registry imports torch; the schema alone must not
    try:
        return {f.name for f in fields(MODELS.config_class(model_name))}
    except KeyError:
        return set()       # unknown model: validate() reports it


def _fields_of(task_name: str) -> set[str]:
    from models import TASKS     # the registry imports torch; the schema alone must not
    try:
        return {f.name for f in fields(TASKS.config(task_name).__class__)}
    except (KeyError, TypeError, ValueError):
        return set()       # unknown task: validate() reports it
