"""The job spec: what the server asks every site to train, defined once for both sides.

The server composes an experiment (Hydra, ``server/config``) and encodes a :class:`JobSpec`
with :meth:`JobSpec.to_record`; a site decodes it with :meth:`JobSpec.from_record`, looks the
names up in its own closed registries (``client/job.py``) and trains. The training spec, the
privacy spec and their validation rules exist here only, so the two sides cannot drift (they
once had two ``TrainConfig`` with different defaults and two copies of the DP-SGD refusals).

The operator-facing halves (:class:`TrainSettings`, :class:`PrivacySettings`) are the Hydra
schema of the ``train`` and ``privacy`` groups; :class:`TrainConfig` and :class:`PrivacySpec`
add what a run supplies (proximal term, seeds, run id, planned rounds).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

from typing import TYPE_CHECKING

from . import wire
from .layout import MAX_GRID_AXIS, Layout, LayoutError, check_grid_size

if TYPE_CHECKING:
    from flwr.app import ConfigRecord

# Flower, the task registry (torch) and the accountants (Opacus) are imported where they are
# used: the server's Hydra schema embeds TrainSettings/PrivacySettings, and a config mistake
# must be refused without importing torch (``medfed simulate strategy=typo``, < 1 s).


class SpecError(ValueError):
    """A training or privacy value is out of range; the message names the setting."""


class JobError(SpecError):
    """The server's request is malformed or names something this site does not offer."""


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise SpecError(f"{name} must be a finite number, got {value}")


# Sanity bounds a site enforces on the work one training message may ask of it (a coordinator
# asking 10^9 local epochs would hold the site's machine; the site's operator bounds DP rounds
# further with dp-max-steps-per-round).
MAX_LOCAL_EPOCHS = 1000
MAX_BATCH_SIZE = 65536


@dataclass(frozen=True)
class TrainSettings:
    """How each site trains in a round, as the operator configures it (Hydra group ``train``)."""
    local_epochs: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.05
    head_lr: float | None = None    # the class head's own learning rate (None: lr), e.g. a
                                    # fresh head on a pretrained backbone under DP-SGD
    head_only_rounds: int = 0       # rounds 1..k train the class head alone (the rest frozen
                                    # that round: linear probing, then fine-tuning)
    head_lr_rounds: int = 0         # with head_lr: rounds 1..k use it, later ones train the
                                    # head at lr (0: every round)

    def __post_init__(self):
        for name in ("lr", "weight_decay"):
            _finite(f"train.{name}", getattr(self, name))
        if self.head_lr is not None:
            _finite("train.head_lr", self.head_lr)
            if not self.head_lr > 0:
                raise SpecError(f"train.head_lr must be > 0 (or null: lr), got {self.head_lr}")
        for name, most in (("local_epochs", MAX_LOCAL_EPOCHS), ("batch_size", MAX_BATCH_SIZE)):
            if not 1 <= getattr(self, name) <= most:
                raise SpecError(f"train.{name} must be in 1..{most}, got "
                                f"{getattr(self, name)}")
        for name in ("head_only_rounds", "head_lr_rounds"):
            if getattr(self, name) < 0:
                raise SpecError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SpecError(f"train.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise SpecError(f"train.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class TrainConfig(TrainSettings):
    """One site's training of one round: what ``client.engine.Engine.fit`` runs."""
    proximal_mu: float = 0.0        # FedProx: adds (mu/2) * ||w - w_start||^2 to the loss
    seed: int = 0                   # data order / Poisson sampling stream (per site: site_seed)
    head_only: bool = False         # this round trains the class head alone (set by for_site
                                    # from head_only_rounds and the round)

    def __post_init__(self):
        super().__post_init__()
        _finite("proximal_mu", self.proximal_mu)
        if self.proximal_mu < 0:
            raise SpecError(f"proximal_mu must be >= 0, got {self.proximal_mu}")


def site_seed(seed: int, site: int, server_round: int) -> int:
    """The stream seed of one site in one round. Fixed formula: the demo's seeded figures
    depend on it bit for bit."""
    return seed * 100_003 + site * 1009 + server_round


# A sanity bound a site enforces on the views per sample the coordinator may ask for (each
# view is a forward and backward pass more at the site; De et al. 2022 used 16).
MAX_AUGMENTATION_MULTIPLICITY = 16


@dataclass(frozen=True)
class PrivacySettings:
    """The privacy the server asks sites for (Hydra group ``privacy``). Each site still
    enforces its own operator's budget; nothing here can raise it. None: not set."""
    mechanism: str = wire.DP_NONE         # none | dp-sgd (sample level) | site-dp (site level)
    epsilon: float | None = None          # dp-sgd: each site calibrates sigma to this over the run
    delta: float = 1e-5                   # server-side site-dp accounting and reporting delta
    noise_multiplier: float | None = None  # dp-sgd: fixed sigma instead of a target;
                                          # site-dp: the server's noise multiplier (required)
    max_grad_norm: float = 1.0            # dp-sgd: per-sample clipping bound
    head_clip_share: float | None = None  # dp-sgd: per-group clipping, the class head's part
                                          # of each gradient clipped to C sqrt(share), the rest
                                          # to C sqrt(1 - share) (same sensitivity C, same
                                          # noise); None: one bound C on the whole gradient
    augmentation_multiplicity: int = 1    # dp-sgd: each drawn sample enters a step as this
                                          # many augmented views, their gradients averaged
                                          # before clipping (De et al. 2022): the same
                                          # sensitivity C, noise and accounting, k x compute
    sample_rate: float | None = None      # dp-sgd: Poisson rate q; None: batch_size / n per site
    clipping_norm: float = 1.0            # site-dp: bound on each site's update norm
    accountant: str = "rdp"               # protocol.accounting.ACCOUNTANTS
    noise: str = wire.DP_NOISE_DISTRIBUTED  # site-dp: "distributed" (each site adds a Skellam
                                          # share before SecAgg masking; the server adds
                                          # nothing) or "server" (the server adds Gaussian
                                          # noise to the sum: sites must trust it)
    min_contributors: int | None = None   # site-dp distributed: each share assumes only this
                                          # many contributors (sites refuse smaller sums).
                                          # None in an experiment: the server's config fills
                                          # in federation.num_sites before the spec is sent;
                                          # None/0 arriving at a site: m = 1 (its own share
                                          # carries the whole noise)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse settings the accountant does not cover, saying which and why."""
        if self.mechanism not in wire.DP_MECHANISMS:
            *head, last = wire.DP_MECHANISMS
            raise SpecError(f"privacy.mechanism={self.mechanism!r}; choose "
                            f"{', '.join(head)} or {last}")
        k = self.augmentation_multiplicity
        if isinstance(k, bool) or not isinstance(k, int) or \
                not 1 <= k <= MAX_AUGMENTATION_MULTIPLICITY:
            raise SpecError(f"privacy.augmentation_multiplicity must be an integer in 1.."
                            f"{MAX_AUGMENTATION_MULTIPLICITY}, got {k!r}")
        if k != 1 and self.mechanism != wire.DP_SGD:
            raise SpecError(f"privacy.augmentation_multiplicity={k} averages each sample's "
                            "views before DP-SGD's per-sample clipping; it needs "
                            "privacy.mechanism=dp-sgd (without it, raise train.batch_size)")
        if self.mechanism == wire.DP_NONE:
            return
        from .accounting import PrivacyConfigError, check_accountant
        try:
            check_accountant(self.accountant)
        except PrivacyConfigError as err:
            raise SpecError(f"privacy.accountant: {err}") from None
        for name in ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate",
                     "clipping_norm", "head_clip_share"):
            if getattr(self, name) is not None:
                _finite(f"privacy.{name}", getattr(self, name))
        if not 0 < self.delta < 1:
            raise SpecError(f"privacy.delta must be in (0, 1), got {self.delta}")
        if self.mechanism == wire.DP_SGD:
            self._check_dpsgd()
        elif not (self.noise_multiplier or 0) > 0 or not self.clipping_norm > 0:
            raise SpecError("privacy.mechanism=site-dp needs privacy.noise_multiplier > 0 (the "
                            "noise on the sum) and privacy.clipping_norm > 0")
        else:
            self._check_site_noise()

    def _check_site_noise(self) -> None:
        if self.noise not in wire.DP_NOISE_SOURCES:
            raise SpecError(f"privacy.noise={self.noise!r}; choose "
                            f"{' or '.join(wire.DP_NOISE_SOURCES)}")
        m = self.min_contributors
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise SpecError(f"privacy.min_contributors must be an integer >= 1 (or null: all "
                            f"sites), got {m!r}")

    def _check_dpsgd(self) -> None:
        if self.epsilon is None and self.noise_multiplier is None:
            raise SpecError("privacy.mechanism=dp-sgd needs privacy.epsilon (target per site) "
                            "or privacy.noise_multiplier; neither is set")
        if self.epsilon is not None and not self.epsilon > 0:
            raise SpecError(f"privacy.epsilon must be > 0, got {self.epsilon:g}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise SpecError(f"privacy.noise_multiplier must be > 0, got {self.noise_multiplier:g}")
        if not self.max_grad_norm > 0:
            raise SpecError(f"privacy.max_grad_norm must be > 0, got {self.max_grad_norm:g}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise SpecError(f"privacy.sample_rate must be in (0, 1], got {self.sample_rate:g}")
        if self.head_clip_share is not None and not 0 < self.head_clip_share < 1:
            raise SpecError(f"privacy.head_clip_share must be in (0, 1) (or null: one bound), "
                            f"got {self.head_clip_share:g}")

    def check_task(self, task_name: str, task_options: dict) -> None:
        """DP-SGD's accounting only covers a loss that is a mean of per-sample terms, with no
        site statistic outside the accountant shaping it: refuse it for any other task.
        Raises ``KeyError`` for a task name the registry does not know."""
        if self.mechanism != wire.DP_SGD:
            return
        from models.tasks import batch_coupling, private_state
        coupling = batch_coupling(task_name, task_options)
        if coupling:
            raise SpecError(f"privacy.mechanism=dp-sgd refused for task {task_name!r}: "
                            f"{coupling}. Per-sample clipping cannot bound one sample's "
                            "influence on a loss that couples the batch; use privacy=sitedp "
                            "for it - site-level DP bounds the whole site update instead")
        state = private_state(task_name, task_options)
        if state:
            raise SpecError(f"privacy.mechanism=dp-sgd refused: {state}")


@dataclass(frozen=True)
class PrivacySpec(PrivacySettings):
    """The privacy request of one run, as a site receives it."""
    planned_rounds: int = 0               # rounds the run plans (calibration, budget check)
    run_id: str = ""                      # the server's run (the site's ledger rows name it)

    def check(self) -> None:
        super().check()
        if self.mechanism != wire.DP_NONE and (self.planned_rounds < 1 or not self.run_id):
            raise SpecError("a private run must name its run id and planned rounds >= 1, got "
                            f"{self.run_id!r} and {self.planned_rounds}")

    def as_sent(self) -> PrivacySpec:
        """This spec as a site decodes it: only what its mechanism uses travels (the server's
        delta never does: a site accounts at its own budget's delta)."""
        keep = {f for f, _ in _PRIVACY_KEYS[self.mechanism]} | {"mechanism"}
        return replace(PrivacySpec(), **{f: getattr(self, f) for f in keep})


# Which spec field travels under which key, per mechanism. None travels as 0.0 ("not set";
# the site calibrates sigma / uses batch_size / n), as it always has on the wire.
_PRIVATE = (("accountant", wire.DP_ACCOUNTANT), ("planned_rounds", wire.DP_PLANNED_ROUNDS),
            ("run_id", wire.RUN_ID), ("noise_multiplier", wire.DP_NOISE_MULTIPLIER))
_PRIVACY_KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    wire.DP_NONE: (),
    wire.DP_SGD: _PRIVATE + (("epsilon", wire.DP_TARGET_EPSILON),
                             ("max_grad_norm", wire.DP_MAX_GRAD_NORM),
                             ("sample_rate", wire.DP_SAMPLE_RATE),
                             ("head_clip_share", wire.DP_HEAD_CLIP_SHARE),
                             ("augmentation_multiplicity", wire.DP_AUGMENTATION_MULTIPLICITY)),
    # Flower's client-side fixed-clipping wrapper injects the clipping norm into train
    # messages only; evaluate messages need it too, or the site refuses the spec.
    wire.DP_SITE: _PRIVATE + (("clipping_norm", wire.DP_CLIPPING_NORM), ("noise", wire.DP_NOISE),
                              ("min_contributors", wire.DP_MIN_CONTRIBUTORS)),
}
_UNSET_IS_ZERO = {"epsilon", "noise_multiplier", "sample_rate", "min_contributors",
                  "head_clip_share"}
_KINDS = {"accountant": str, "run_id": str, "planned_rounds": int, "noise": str,
          "min_contributors": int, "augmentation_multiplicity": int}


def check_site_dp_scope(personalize: bool, local_params, mechanism: str) -> None:
    """Refuse what site-level DP does not cover (the server at config load, the site when it
    decodes the job): its clipping and noise are on the update a site sends, so weights
    trained at the site and kept there (``personalize``'s adapted model, ``local_params``)
    are not private, and scores of models built from them would leave the site outside the
    privacy ledger."""
    if mechanism != wire.DP_SITE:
        return
    if personalize:
        raise SpecError("strategy.personalize is refused with privacy.mechanism=site-dp: a "
                        "site's locally adapted model is its update before the clipping and "
                        "noise that site-level DP puts on it, so scores of that model would "
                        "leave the site outside the privacy ledger (use dp-sgd, whose local "
                        "training itself is private)")
    if local_params:
        raise SpecError("strategy.local_params is refused with privacy.mechanism=site-dp: the "
                        "clipped update must be the whole model (weights kept at a site carry "
                        "no clipping or noise, and evaluation scores models built from them)")


@dataclass(frozen=True)
class JobSpec:
    """Everything a site needs to build the model and task and to train (no site specifics).

    ``seed`` is the experiment's seed; ``train.seed`` equals it until a site derives its own
    stream with :meth:`for_site`.
    """
    model_name: str                       # a name in models.MODELS
    model_options: dict[str, Any]
    task_name: str                        # a name in models.TASKS
    task_options: dict[str, Any]
    class_names: tuple[str, ...]
    image_size: int
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    seed: int = 0
    personalize: bool = False             # also report the site's locally adapted model
    local_params: tuple[str, ...] = ()    # FedBN-style patterns kept at the site
    evaluate_missing: bool = False        # also score test with each sequence removed
    server_round: int = 0                 # set per round by Flower's strategies
    base_digest: str = ""                 # foundation model: the frozen base's digest (the
                                          # coordinator's); each site checks its own against it
    layout: Layout | None = None          # the modality layout the site reads; None: today's
                                          # brain_mri_4seq reader (and a byte-identical record)

    def __post_init__(self):
        check_site_dp_scope(self.personalize, self.local_params, self.privacy.mechanism)

    def for_site(self, site: int) -> JobSpec:
        """This job at one site: its own data-order/noise stream for this round, whether this
        round trains the class head alone, and the head's rate this round (``head_lr`` until
        round ``head_lr_rounds``, then ``lr``)."""
        t = self.train
        head_lr = None if t.head_lr_rounds and self.server_round > t.head_lr_rounds \
            else t.head_lr
        return replace(self, train=replace(
            t, seed=site_seed(self.seed, site, self.server_round), head_lr=head_lr,
            head_only=1 <= self.server_round <= t.head_only_rounds))

    def build(self, *, foundation_dir=None):
        """``(model, task)``: the backbone wrapped by the task (heads, adapters, freezing).
        ``foundation_dir``: the building side's own directory of pretrained encoders."""
        from models.tasks import build
        return build(self.model_name, self.model_options, self.task_name, self.task_options,
                     foundation_dir=foundation_dir)

    def to_record(self) -> ConfigRecord:
        """The ``config`` record of train and evaluate messages."""
        p = self.privacy
        out: dict[str, Any] = {wire.DP_MECHANISM: p.mechanism}
        for name, key in _PRIVACY_KEYS[p.mechanism]:
            value = getattr(p, name)
            out[key] = (_KINDS.get(name, float))(value or 0) if name in _UNSET_IS_ZERO else \
                (_KINDS.get(name, float))(value)
        from flwr.app import ConfigRecord
        t = self.train
        return ConfigRecord(out | {
            wire.MODEL_NAME: self.model_name,
            wire.MODEL_OPTIONS: json.dumps(self.model_options, sort_keys=True),
            wire.TASK_NAME: self.task_name,
            wire.TASK_OPTIONS: json.dumps(self.task_options, sort_keys=True),
            wire.CLASS_NAMES: list(self.class_names),
            wire.IMAGE_SIZE: self.image_size,
            wire.LOCAL_EPOCHS: t.local_epochs,
            wire.BATCH_SIZE: t.batch_size,
            wire.LR: float(t.lr),
            wire.WEIGHT_DECAY: float(t.weight_decay),
            wire.PROXIMAL_MU: float(t.proximal_mu),
            wire.SEED: self.seed,
            wire.PERSONALIZE: self.personalize,
            wire.LOCAL_PARAMS: list(self.local_params),
            wire.EVAL_MISSING: self.evaluate_missing,
            wire.SERVER_ROUND: self.server_round,
        } | ({wire.HEAD_LR: float(t.head_lr)} if t.head_lr is not None else {})
          | ({wire.HEAD_ONLY_ROUNDS: t.head_only_rounds} if t.head_only_rounds else {})
          | ({wire.HEAD_LR_ROUNDS: t.head_lr_rounds} if t.head_lr_rounds else {})
          | ({wire.BASE_DIGEST: self.base_digest} if self.base_digest else {})
          | ({wire.DATA_LAYOUT: json.dumps(self.layout.to_dict(), sort_keys=True)}
             if self.layout is not None else {}))

    @classmethod
    def from_record(cls, config: ConfigRecord) -> JobSpec:
        """``ConfigRecord`` -> ``JobSpec``; a missing or ill-typed key is named in the error,
        an out-of-range value (NaN, negative epochs, ...) by its setting.

        Raises
        ------
        JobError
        """
        get = _Reader(config)
        model_options, task_options = (get.json_object(k) for k in (wire.MODEL_OPTIONS,
                                                                    wire.TASK_OPTIONS))
        seed = get(wire.SEED, int)
        try:
            privacy = _decode_privacy(get)
            train = TrainConfig(local_epochs=get(wire.LOCAL_EPOCHS, int),
                                batch_size=get(wire.BATCH_SIZE, int), lr=get(wire.LR, float),
                                weight_decay=get(wire.WEIGHT_DECAY, float),
                                head_lr=get(wire.HEAD_LR, float, None),
                                head_only_rounds=get(wire.HEAD_ONLY_ROUNDS, int, 0),
                                head_lr_rounds=get(wire.HEAD_LR_ROUNDS, int, 0),
                                proximal_mu=get(wire.PROXIMAL_MU, float, TrainConfig.proximal_mu),
                                seed=seed)
        except JobError:
            raise
        except SpecError as err:
            raise JobError(f"server config: {err}") from None
        layout = None
        if wire.DATA_LAYOUT in config:
            # The site is the trust boundary: the layout is re-validated here as data (rules,
            # windows, policies), whatever the server checked; it names no code and no path.
            try:
                layout = Layout.from_dict(get.json_object(wire.DATA_LAYOUT))
            except LayoutError as err:
                raise JobError(f"server config {wire.DATA_LAYOUT!r}: {err}") from None
        image_size = get(wire.IMAGE_SIZE, int)
        if not 1 <= image_size <= MAX_GRID_AXIS:      # a site allocates image_size^2 per study
            raise JobError(f"server config {wire.IMAGE_SIZE!r} must be in 1..{MAX_GRID_AXIS}, "
                           f"got {image_size}")
        if layout is not None and layout.dims == "3d":     # ... and image_size^3 for a volume
            try:
                check_grid_size((image_size,) * 3, f"server config {wire.IMAGE_SIZE!r}")
            except LayoutError as err:
                raise JobError(f"{err} (a 3D layout's studies are image_size^3)") from None
        fields = dict(
            model_name=get(wire.MODEL_NAME, str), model_options=model_options,
            task_name=get(wire.TASK_NAME, str), task_options=task_options,
            class_names=get.strings(wire.CLASS_NAMES), image_size=image_size,
            train=train, privacy=privacy, seed=seed,
            personalize=get(wire.PERSONALIZE, bool, False),
            local_params=get.strings(wire.LOCAL_PARAMS, ()),
            evaluate_missing=get(wire.EVAL_MISSING, bool, False),
            server_round=get(wire.SERVER_ROUND, int, 0),
            base_digest=get(wire.BASE_DIGEST, str, ""), layout=layout)
        try:
            return cls(**fields)
        except SpecError as err:
            raise JobError(f"server config: {err}") from None


def privacy_from_record(config: ConfigRecord) -> PrivacySpec:
    """Only the privacy request of a job's ``config`` record (what the site's mods need).

    Raises
    ------
    JobError
    """
    try:
        return _decode_privacy(_Reader(config))
    except SpecError as err:
        raise JobError(f"server config: {err}") from None


def _decode_privacy(get: _Reader) -> PrivacySpec:
    mechanism = get(wire.DP_MECHANISM, str, PrivacySpec.mechanism)
    values: dict[str, Any] = {"mechanism": mechanism}
    for name, key in _PRIVACY_KEYS.get(mechanism, ()):
        value = get(key, _KINDS.get(name, float), getattr(PrivacySpec, name))
        values[name] = None if name in _UNSET_IS_ZERO and value == 0 else value
    return PrivacySpec(**values)


_MISSING = object()


class _Reader:
    """Typed reads from a ConfigRecord; errors name the key (ints pass as floats, not back)."""

    def __init__(self, config: ConfigRecord):
        self.config = config

    def __call__(self, key: str, kind: type, default: Any = _MISSING) -> Any:
        if key not in self.config:
            if default is not _MISSING:
                return default
            raise JobError(f"server config lacks {key!r} (is the server running MedFed?)")
        value = self.config[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise JobError(f"server config {key!r} should be {kind.__name__}, "
                           f"got {type(value).__name__}")
        return value

    def strings(self, key: str, default: Any = _MISSING) -> tuple[str, ...]:
        values = self(key, list, default)
        if not all(isinstance(v, str) for v in values):
            raise JobError(f"server config {key!r} should be a list of str")
        return tuple(values)

    def json_object(self, key: str) -> dict:
        try:
            value = json.loads(self(key, str))
        except json.JSONDecodeError as err:
            raise JobError(f"server config {key!r} is not valid JSON: {err}") from None
        if not isinstance(value, dict):
            raise JobError(f"server config {key!r} should be a JSON object, "
                           f"got {type(value).__name__}")
        return value

