"""Experiment configuration: Hydra composes ``conf/`` once, on the server, into typed dataclasses.

One schema per group; unknown keys fail at compose time (Hydra struct mode), model and task
options are validated against their registries before any site trains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from models import MODELS, TASKS
from models.tasks import batch_coupling, private_state
from models.weights import PretrainedError, check_compatible, load_pretrained
from protocol.accounting import PrivacyConfigError, check_accountant
from strategies.registry import NEEDS_INDIVIDUAL_UPDATES
from protocol.secagg_encoding import Encoding
from protocol.secagg_protocol import SecAggConfig, SecAggError
from protocol.partial import local_keys, unmatched_patterns
from strategies.registry import StrategyConfigError, validate_strategy

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """The experiment configuration is invalid; the message names the key and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mmvit"
    options: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None         # local save_pretrained directory to start from


@dataclass(frozen=True)
class TaskConfig:
    name: str = "classification"
    class_names: list[str] = field(default_factory=lambda: ["high_grade_glioma",
                                                            "low_grade_glioma", "cyst"])
    image_size: int = 64
    options: dict[str, Any] = field(default_factory=dict)
    evaluate_missing: bool = False        # sites also score test with each sequence removed


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05


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


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None                # None: sqlite store inside the run directory
    experiment_name: str = "medfed"
    registered_model: str = "medfed-classifier"
    log_models: bool = True


@dataclass(frozen=True)
class PrivacyConfig:
    """What the server asks sites for. Each site still enforces its own operator's budget."""
    mechanism: str = "none"               # none | dp-sgd (sample level) | site-dp (site level)
    epsilon: float | None = None          # dp-sgd: each site calibrates sigma to this over the run
    delta: float = 1e-5                   # site-dp accounting and reporting delta
    noise_multiplier: float | None = None  # dp-sgd: fixed sigma instead of a target;
                                          # site-dp: the server's noise multiplier (required)
    max_grad_norm: float = 1.0            # dp-sgd: per-sample clipping bound
    sample_rate: float | None = None      # dp-sgd: Poisson rate q; null: batch_size / n per site
    clipping_norm: float = 1.0            # site-dp: bound on each site's update norm
    accountant: str = "rdp"               # protocol.accounting.ACCOUNTANTS


@dataclass(frozen=True)
class SecAggSettings:
    """SecAgg+ (strategies/secagg.py): the server only ever sees the sum of site updates."""
    enabled: bool = False
    degree: int | None = None             # neighbours per site; null: ~2 log2(num_sites)
    threshold: float = 0.5                # Shamir threshold: fraction of the degree, or an int
    clip_range: float = 0.5               # |update delta| per value; larger is clipped (counted)
    max_weight: int = 1000                # example counts above this are capped in the sum


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
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggSettings = field(default_factory=SecAggSettings)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of the resolved config (tags every model version it produced); how a run is
        started (fresh or resumed) is not part of what it computes."""
        d = {k: v for k, v in self.to_dict().items() if k != "resume"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]

    def model_options(self) -> dict[str, Any]:
        """Model options with the task's shape facts filled in (classes, image size)."""
        opts = dict(self.model.options)
        opts.setdefault("num_classes", len(self.task.class_names))
        opts.setdefault("img_size", self.task.image_size)
        return opts

    def task_options(self) -> dict[str, Any]:
        """Task options with the shape facts filled in (class count, and class names for a
        task that uses them, e.g. CLIP's zero-shot prompts)."""
        opts = {"num_classes": len(self.task.class_names)}
        if "class_names" in _fields_of(self.task.name):
            opts["class_names"] = list(self.task.class_names)
        return opts | dict(self.task.options)

    def pretrain_phase(self) -> ExperimentConfig:
        """Phase 1 as an experiment of its own: the objective as task, its rounds, its
        registered model; everything else (sites, strategy, privacy) as configured."""
        p = self.pretrain
        options = dict(p.options)
        # A semi-supervised objective sees the same labels as the fine-tuning phase.
        if "label_fraction" in self.task.options and p.objective and \
                "label_fraction" in _fields_of(p.objective):
            options.setdefault("label_fraction", self.task.options["label_fraction"])
        train = replace(self.train, local_epochs=p.local_epochs or self.train.local_epochs,
                        lr=p.lr or self.train.lr)
        return replace(self, name=f"{self.name}-pretrain",
                       task=replace(self.task, name=p.objective, options=options),
                       train=train, pretrain=PretrainConfig(),
                       federation=replace(self.federation, num_rounds=p.num_rounds),
                       tracking=replace(self.tracking, registered_model=p.registered_model))


def _fields_of(task_name: str) -> set[str]:
    try:
        return {f.name for f in fields(TASKS.config(task_name).__class__)}
    except (KeyError, TypeError, ValueError):
        return set()       # unknown task: validate() reports it


def _schema():
    """Typed, struct-mode schema; frozen dataclasses are read-only to OmegaConf, so unfreeze
    the node (the typed result is rebuilt as frozen dataclasses by ``_freeze``)."""
    def unfreeze(node):
        OmegaConf.set_readonly(node, False)
        for key in node:
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                unfreeze(child)
        return node

    return unfreeze(OmegaConf.structured(ExperimentConfig))


ConfigStore.instance().store(name="schema", node=_schema())


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """Cross-field checks that a schema cannot express."""
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
        names = [n for n, _ in MODELS.build(cfg.model.name, cfg.model_options()).named_parameters()]
        unmatched = unmatched_patterns(names, strat.local_params)
        if unmatched:
            raise ConfigError(f"strategy.local_params {unmatched} match no model parameter; "
                              f"names look like {names[:3]} ... {names[-2:]}")
        if len(local_keys(names, strat.local_params)) == len(names):
            raise ConfigError("strategy.local_params match every parameter: nothing is shared")
    if cfg.resume and str(cfg.resume).lower() not in ("true", "latest"):
        from .resume import check_resume_dir    # the resume rules live in one place
        check_resume_dir(Path(cfg.resume))      # a run dir, or a two-phase run's (pretrain/)
    if len(set(cfg.task.class_names)) != len(cfg.task.class_names) or len(cfg.task.class_names) < 2:
        raise ConfigError("task.class_names must list at least two distinct classes")
    validate_privacy(cfg)
    validate_secagg(cfg)
    validate_pretrain(cfg)
    return cfg


def validate_pretrain(cfg: ExperimentConfig) -> None:
    """Phase 1 must be a registered self-supervised objective the phase-2 model can start from."""
    p = cfg.pretrain
    if p.objective is None:
        if p.num_rounds:
            raise ConfigError("pretrain.num_rounds is set but pretrain.objective is null")
        return
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
        validate(cfg.pretrain_phase())
    except ConfigError as err:
        raise ConfigError(f"pretraining phase: {err}") from None


def validate_secagg(cfg: ExperimentConfig) -> None:
    """Secure aggregation hides individual updates: refuse what needs to see them."""
    s = cfg.secagg
    if not s.enabled:
        return
    if cfg.strategy.name in NEEDS_INDIVIDUAL_UPDATES or cfg.strategy.name not in SECAGG_READY:
        raise ConfigError(f"secagg.enabled with strategy={cfg.strategy.name}: secure aggregation "
                          "only reveals the weighted sum of updates; use one of "
                          f"{', '.join(SECAGG_READY)}")
    if cfg.strategy.local_params:
        raise ConfigError("secagg.enabled with strategy.local_params is not supported: the "
                          "masked vector covers the whole model")
    if cfg.strategy.max_update_norm is not None:
        raise ConfigError("secagg.enabled with strategy.max_update_norm: the server cannot see "
                          "individual update norms; bound updates at the sites "
                          "(privacy=sitedp clips them) instead")
    if cfg.privacy.mechanism == "site-dp" and s.clip_range < cfg.privacy.clipping_norm:
        raise ConfigError(f"secagg.clip_range={s.clip_range} < privacy.clipping_norm="
                          f"{cfg.privacy.clipping_norm}: a clipped site update can still have "
                          "values the encoding would clip again; raise secagg.clip_range")
    try:
        SecAggConfig(degree=s.degree, threshold=s.threshold,
                     encoding=Encoding(clip_range=s.clip_range, max_sites=cfg.federation.num_sites,
                                       max_weight=s.max_weight)).resolve(cfg.federation.num_sites)
    except (SecAggError, ValueError) as err:
        raise ConfigError(f"secagg: {err}") from None


# Strategies whose aggregate is FedAvg's weighted sum: Gaussian noise on the sum is the
# site-level mechanism the accountant describes. Median/Krum/trimmed mean are not sums.
SUM_AGGREGATING = ("fedavg", "fedprox")
# Strategies that only need the weighted average of the updates (server optimisers included).
SECAGG_READY = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


def validate_privacy(cfg: ExperimentConfig) -> None:
    """Refuse privacy settings the accountant does not cover, saying which and why."""
    p = cfg.privacy
    if p.mechanism not in ("none", "dp-sgd", "site-dp"):
        raise ConfigError(f"privacy.mechanism={p.mechanism!r}; choose none, dp-sgd or site-dp")
    if p.mechanism == "none":
        return
    try:
        check_accountant(p.accountant)
    except PrivacyConfigError as err:
        raise ConfigError(f"privacy.accountant: {err}") from None
    if not 0 < p.delta < 1:
        raise ConfigError(f"privacy.delta must be in (0, 1), got {p.delta}")
    if p.mechanism == "dp-sgd":
        if p.epsilon is None and p.noise_multiplier is None:
            raise ConfigError("privacy.mechanism=dp-sgd needs privacy.epsilon (target per "
                              "site) or privacy.noise_multiplier; neither is set")
        if p.epsilon is not None and not p.epsilon > 0:
            raise ConfigError(f"privacy.epsilon must be > 0, got {p.epsilon}")
        if p.noise_multiplier is not None and not p.noise_multiplier > 0:
            raise ConfigError(f"privacy.noise_multiplier must be > 0, got {p.noise_multiplier}")
        if p.max_grad_norm <= 0:
            raise ConfigError("privacy.max_grad_norm must be > 0")
        if p.sample_rate is not None and not 0 < p.sample_rate <= 1:
            raise ConfigError(f"privacy.sample_rate must be in (0, 1], got {p.sample_rate}")
        coupling = batch_coupling(cfg.task.name, cfg.task_options())
        if coupling:
            raise ConfigError(f"privacy.mechanism=dp-sgd refused for task {cfg.task.name!r}: "
                              f"{coupling}. Per-sample clipping cannot bound one sample's "
                              "influence on a loss that couples the batch; use "
                              "privacy=sitedp for it")
        state = private_state(cfg.task.name, cfg.task_options())
        if state:
            raise ConfigError(f"privacy.mechanism=dp-sgd refused: {state}")
        return
    if not (p.noise_multiplier or 0) > 0 or p.clipping_norm <= 0:
        raise ConfigError("privacy.mechanism=site-dp needs privacy.noise_multiplier > 0 (the "
                          "server's noise on the sum) and privacy.clipping_norm > 0")
    if cfg.strategy.name not in SUM_AGGREGATING:
        raise ConfigError(f"privacy.mechanism=site-dp with strategy={cfg.strategy.name}: "
                          "server noise on a sum only protects strategies that aggregate by "
                          f"a plain weighted sum ({', '.join(SUM_AGGREGATING)}); "
                          f"{cfg.strategy.name} needs individual updates or rescales them")
    if cfg.strategy.local_params:
        raise ConfigError("privacy.mechanism=site-dp with strategy.local_params: the clipped "
                          "update must be the whole model")
    if cfg.strategy.fraction_train != 1.0:
        raise ConfigError("privacy.mechanism=site-dp is accounted without sampling "
                          "amplification; set strategy.fraction_train=1.0")
    if cfg.strategy.min_train_sites != cfg.federation.num_sites:
        raise ConfigError("privacy.mechanism=site-dp needs every site's update in every round "
                          "(the noise is calibrated to the number of sites): set "
                          f"strategy.min_train_sites={cfg.federation.num_sites}")
    if p.delta >= 1.0 / cfg.federation.num_sites:
        raise ConfigError(f"privacy.delta={p.delta:g} >= 1/num_sites: a site-level guarantee "
                          "that weak allows publishing one site's update")


def load_experiment(overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides into a validated ExperimentConfig.

    Raises
    ------
    ConfigError
        On an unknown key, option or group value, with Hydra's explanation.
    """
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            raw = compose(config_name="config", overrides=list(overrides))
        cfg = OmegaConf.to_object(raw)
    except Exception as err:  # noqa: BLE001 - Hydra/OmegaConf raise many types; all mean "bad config"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if first.startswith("Could not override"):
            first += " No such key in the config schema (see conf/ and server/config.py)."
        raise ConfigError(first) from None
    finally:
        GlobalHydra.instance().clear()
    return validate(_freeze(cfg))


def _freeze(cfg: ExperimentConfig) -> ExperimentConfig:
    """OmegaConf builds dataclasses field by field; rebuild so lists/dicts are plain types."""
    plain = json.loads(json.dumps(asdict(cfg)))
    return ExperimentConfig(
        name=plain["name"], seed=plain["seed"], runs_dir=plain["runs_dir"],
        resume=None if plain["resume"] is None else str(plain["resume"]),
        model=ModelConfig(**plain["model"]), task=TaskConfig(**plain["task"]),
        train=TrainConfig(**plain["train"]), strategy=StrategyConfig(**plain["strategy"]),
        federation=FederationConfig(**plain["federation"]), data=DataConfig(**plain["data"]),
        tracking=TrackingConfig(**plain["tracking"]), privacy=PrivacyConfig(**plain["privacy"]),
        secagg=SecAggSettings(**plain["secagg"]), pretrain=PretrainConfig(**plain["pretrain"]),
    )


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
