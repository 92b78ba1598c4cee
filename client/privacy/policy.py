"""The site's privacy policy: its operator's budget, checked against its own ledger.

The budget (epsilon, delta) comes from the site's node config, which only the site's operator
sets; nothing the server sends can raise it. Before every private round the site computes the
epsilon this round would bring it to - over *all* rounds in its ledger, every run and both
mechanisms, composed by one accountant - and refuses if that exceeds the budget. The round is
charged to the ledger *before* training starts, so a crash mid-round can never leave an
unrecorded release. The check and the charge are one ledger write transaction
(``PrivacyLedger.charge``), so two runs authorising at once cannot both spend the last of
the budget.

Site-level DP comes in two trust models. With ``noise=distributed`` the site adds its own
Skellam share before masking (``client.privacy.ddp``) and books the sum's guarantee itself;
its row trusts ``sites>=m`` (the shares of ``m`` honest contributors) - ``sites>=m,server-counted``
when the secure aggregation is the semi-honest protocol (unsigned survivor set: the server's word
decides which updates are unmasked, so the row says it trusts that word; accepted only with
``dp-trust-server``, like server noise). ``noise=server`` trusts
the server to add the noise: refused unless the operator set ``dp-trust-server``, and booked
with ``trust = server``. Distributed noise outside secure aggregation would expose an update
carrying a fraction of the noise: refused.

Per-run caps, also from node config only: ``dp-max-run-epsilon`` (what one run may spend of the
budget), ``dp-min-noise-multiplier`` and ``dp-max-steps-per-round`` (a coordinator cannot ask for
almost no noise, or for a round of many steps, even within the budget).

Every decision here that depends on the site's training-set size n is taken on the range the
site reports that count as (``client.queries.count_range``, at ``min-eval-split-size``: 23
studies at 10 are "20-29"), never on n: the coordinator sees each refusal and chooses the sample
rate q, so a rule on the exact n (below 1/n is refused) would let it binary-search n with a few
free, refused jobs. The rules take the safe end of the range: q below 1/low is refused (at
q >= 1/low >= 1/n an epoch still draws at least one study a step) and q defaults to B/low
(the noise, steps and epsilon a masked reply carries are then the range's, not n's); delta must
be below 1/high <= 1/n.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from protocol import wire
from protocol.accounting import PrivacyConfigError, calibrate_noise, check_budget, epsilon
from protocol.job import JobSpec, PrivacySpec

from ..queries import count_range
from .dpsgd import DPSGDConfig, steps_per_epoch
from .ledger import TRUST_SERVER, TRUST_SITE, LedgerEntry, PrivacyLedger, trust_sites

log = logging.getLogger(__name__)

LEDGER_FILE = "privacy-ledger.sqlite"      # in the site's privacy-dir


class PrivacyRefused(ValueError):
    """The site will not train this round; the message says why (sent back as the error)."""


@dataclass(frozen=True)
class SiteBudget:
    epsilon: float
    delta: float
    ledger_path: Path
    require_dp: bool = True
    max_run_epsilon: float | None = None       # cap on one run's own epsilon
    min_noise_multiplier: float | None = None  # refuse rounds with less noise
    max_steps_per_round: int | None = None     # refuse rounds of more (DP-SGD) steps
    trust_server: bool = False                 # accept site-dp rounds the server adds noise to
    max_assumed_sites: int | None = None       # distributed site-dp: the most honest sites
                                               # a noise share may rely on (refuse larger m)


def node_settings(node_config: dict, data_dir: Path, *, simulated: bool) -> dict:
    """Node config; in simulation with the per-site ``node-config.toml`` underneath (Flower's
    simulation cannot give each node its own config). A deployed site never reads that file:
    whoever can write into the PACS export folder must not be able to raise the budget, drop
    ``require-secagg`` or change the site's role - only the operator's --node-config counts."""
    settings: dict = {}
    path = data_dir / wire.NODE_CONFIG_FILE
    if simulated and path.is_file():
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    return settings | dict(node_config)


def state_dir(settings: dict, data_dir: Path) -> Path:
    """The site's own state folder: node config ``privacy-dir`` (relative: under the data
    directory), default ``<data-dir>/.medfed``: the privacy ledger, pseudonym key, query log
    and kept replies live there."""
    folder = Path(str(settings.get(wire.NODE_PRIVACY_DIR, ".medfed")))
    return folder if folder.is_absolute() else data_dir / folder


def site_budget(settings: dict, data_dir: Path) -> SiteBudget | None:
    """The operator's budget, or None when the site has none (then it refuses DP requests)."""
    eps, delta = settings.get(wire.NODE_DP_EPSILON), settings.get(wire.NODE_DP_DELTA)
    if eps is None and delta is None:
        return None
    try:
        eps, delta = float(eps), float(delta)
        check_budget(eps, delta)
    except (TypeError, ValueError) as err:
        raise PrivacyRefused(f"the site's privacy budget in node config is invalid: {err} "
                             f"(set both {wire.NODE_DP_EPSILON!r} and {wire.NODE_DP_DELTA!r})"
                             ) from None
    require = flag(settings.get(wire.NODE_REQUIRE_DP, "true"))
    return SiteBudget(eps, delta, state_dir(settings, data_dir) / LEDGER_FILE, require,
                      max_run_epsilon=_cap(settings, wire.NODE_DP_MAX_RUN_EPSILON, float),
                      min_noise_multiplier=_cap(settings, wire.NODE_DP_MIN_NOISE, float),
                      max_steps_per_round=_cap(settings, wire.NODE_DP_MAX_STEPS, int),
                      trust_server=flag(settings.get(wire.NODE_DP_TRUST_SERVER, False)),
                      max_assumed_sites=_cap(settings, wire.NODE_DP_MAX_ASSUMED_SITES, int))


def _cap(settings: dict, key: str, kind: type) -> float | int | None:
    """An optional positive, finite cap from node config (None when unset); an integer cap
    must be a whole number (2.5 is refused, not read as 2)."""
    value = settings.get(key)
    if value is None:
        return None
    try:
        cap = float(value)
        if not (math.isfinite(cap) and cap > 0) or (kind is int and not cap.is_integer()):
            raise ValueError
        cap = kind(cap)
    except (TypeError, ValueError):
        raise PrivacyRefused(f"node config {key!r} must be a positive "
                             f"{'whole ' if kind is int else ''}number, got {value!r}") from None
    return cap


def flag(value) -> bool:
    return str(value).lower() not in ("false", "0", "no")


def check_protection(job: JobSpec, settings: dict, *, secure_aggregation: bool) -> None:
    """The checks that charge nothing, on every train request (a repeated one too): the
    site's secure-aggregation requirement, and no distributed noise share in plaintext."""
    if flag(settings.get(wire.NODE_REQUIRE_SECAGG, False)) and not secure_aggregation:
        raise PrivacyRefused(f"this site requires secure aggregation (node config "
                             f"{wire.NODE_REQUIRE_SECAGG}); refusing a plaintext update")
    p = job.privacy
    if p.mechanism == wire.DP_SITE and p.noise == wire.DP_NOISE_DISTRIBUTED \
            and not secure_aggregation:
        raise PrivacyRefused("distributed site-level DP without secure aggregation: the "
                             "server would see this site's update with only its share of the "
                             "noise; refusing")


def admission_digest(job: JobSpec, *, secure_aggregation: bool, survivors_signed: bool,
                     session: str = "", weights: str = "") -> str:
    """What a training round was admitted as: its privacy request, the ``weights`` it was
    sent (their digest) and how its update leaves (masked, in which secure-aggregation
    ``session``; under a signed survivor set). The site's cached reply of a round is the
    update *before* its mods clip, noise and mask it, so a repeated request is answered only
    if it asks for the round exactly as it was admitted (``client.queries.SiteQueryLog``): a
    coordinator replaying a DP round without DP, a masked one in plaintext, a masked one in a
    second session (whose sum over the other sites, subtracted from the first, would give this
    site's update away), or a site-DP round against other reference weights (the clipping mod
    clips the cached weights' difference to the weights sent: two directions of one update
    give its unclipped length away) gets a refusal, not the update under weaker protection."""
    admitted = {"privacy": asdict(job.privacy), "masked": bool(secure_aggregation),
                "signed": bool(secure_aggregation and survivors_signed),
                "session": session if secure_aggregation else "", "weights": weights}
    return hashlib.sha256(json.dumps(admitted, sort_keys=True, default=str).encode()).hexdigest()


def admit_round(job: JobSpec, settings: dict, data_dir: Path, *, n_train: int,
                count_floor: int, secure_aggregation: bool, survivors_signed: bool,
                same_run: frozenset[str] = frozenset()) -> Authorization | None:
    """The site's checks before it trains: ``check_protection``, then its privacy budget
    (``authorize``). Raises with the reason the server will see.

    ``n_train``: the job's training studies; ``count_floor``: the site's smallest reported
    count (``QueryLimits.min_split_size``), whose range of ``n_train`` the decision is taken on.

    ``secure_aggregation``: this update is masked; ``survivors_signed``: by the
    malicious-secure protocol (sites sign the survivor set; from the site's own SecAgg state,
    never from the message). ``same_run``: the job run ids this site has seen for the job's
    task in the same Flower run (``SiteQueryLog.privacy_runs``), which the per-run cap counts
    together."""
    check_protection(job, settings, secure_aggregation=secure_aggregation)
    return authorize(job.privacy, site_budget(settings, data_dir), n_train=n_train,
                     count_floor=count_floor, local_epochs=job.train.local_epochs,
                     batch_size=job.train.batch_size, server_round=job.server_round,
                     secure_mode=flag(settings.get(wire.NODE_DP_SECURE_MODE, True)),
                     survivors_signed=secure_aggregation and survivors_signed,
                     same_run=same_run)


def releasable_metrics(metrics: dict[str, float], auth: Authorization | None) -> dict:
    """What a round may report. Training loss/accuracy of a private round are computed on the
    private samples and not covered by the accountant: it reports what its ledger says."""
    if auth is None:
        return metrics
    entry = auth.entry
    return {k: v for k, v in metrics.items() if not k.startswith("train_")} | {
        wire.DP_EPSILON: entry.epsilon, wire.DP_DELTA: entry.delta,
        wire.DP_STEPS: float(entry.steps), wire.DP_UNIT_WEIGHT: 1.0,
        wire.DP_NOISE_MULTIPLIER: entry.noise_multiplier, wire.DP_SAMPLE_RATE: entry.sample_rate}


@dataclass(frozen=True)
class Authorization:
    """A round the site accepted: how to train, and what the ledger was charged."""
    dpsgd: DPSGDConfig | None
    entry: LedgerEntry


def authorize(request: PrivacySpec, budget: SiteBudget | None, *, n_train: int,
              local_epochs: int, batch_size: int, server_round: int,
              survivors_signed: bool, secure_mode: bool = True, count_floor: int = 1,
              same_run: frozenset[str] = frozenset()) -> Authorization | None:
    """Accept (and charge) or refuse this round. None: a non-private round the site allows.
    Decided on the range the site reports ``n_train`` as at ``count_floor`` (module
    docstring; the default 1 decides on ``n_train`` itself, as a simulated site reports it).
    ``survivors_signed=False``: a distributed round's sum is counted by the server alone
    (semi-honest SecAgg), and its row says so. The per-run cap counts the rows of the job's
    run id and of ``same_run`` (the other job run ids seen for the task in the same Flower
    run: the job's id is the coordinator's, so a new one each round would otherwise start the
    cap afresh)."""
    if request.mechanism == wire.DP_NONE:
        if budget is not None and budget.require_dp:
            raise PrivacyRefused("this site has a privacy budget and requires differential "
                                 "privacy; the server asked for non-private training")
        return None
    if budget is None:
        raise PrivacyRefused(f"the server asked for {request.mechanism} but this site has no "
                             f"privacy budget: its operator must set node config "
                             f"{wire.NODE_DP_EPSILON!r} and {wire.NODE_DP_DELTA!r}")
    low, high = count_range(n_train, count_floor)       # never n_train itself below
    try:
        check_budget(budget.epsilon, budget.delta, n=high)
    except PrivacyConfigError as err:
        raise PrivacyRefused(f"site budget: {err}" + (" (n: the top of the range this site "
                             "reports its training studies in)" if low < high else "")
                             ) from None
    ledger = PrivacyLedger(budget.ledger_path)
    if request.mechanism == wire.DP_SGD:
        q = request.sample_rate or min(1.0, batch_size / low)
        if not 0 < q <= 1:
            raise PrivacyRefused(f"sample rate {q} is not in (0, 1]")
        if q * low < 1 - 1e-9:       # int(1/q) steps an epoch: the coordinator's q sets it
            raise PrivacyRefused(f"sample rate {q:g} draws less than one of this site's "
                                 "training studies per step on average (below 1/n, n the "
                                 "low end of the range this site reports it in): its epochs "
                                 "would take more steps than studies; refusing")
        steps = local_epochs * steps_per_epoch(q)
        sigma = _plan(ledger, request, budget, q, steps)
        clip = request.max_grad_norm
        trust = TRUST_SITE
    else:
        q, steps, sigma, clip = 1.0, 1, request.noise_multiplier, request.clipping_norm
        trust = _site_dp_trust(request, budget, survivors_signed)
        # one row for the whole plan (the accountant composes its steps): a coordinator's
        # planned_rounds of 10^9 costs one accountant call, not a list of 10^9 rows
        _check_plan(ledger, request, budget, [(sigma, q, steps * request.planned_rounds)])
    _check_caps(budget, sigma, steps)
    this_round = (sigma, q, steps)

    def admit(entries: list[LedgerEntry]) -> float:
        """Inside the ledger's write lock: the budget and the run cap over every row."""
        after = epsilon([*_history(entries), this_round], budget.delta, request.accountant)
        if after > budget.epsilon:
            raise PrivacyRefused(f"round {server_round} would bring this site's epsilon to "
                                 f"{after:.3f} > its budget {budget.epsilon:g} (delta "
                                 f"{budget.delta:g}); refusing")
        if budget.max_run_epsilon is not None:
            run = [e for e in entries if e.run_id in same_run | {request.run_id}]
            spent = epsilon([*_history(run), this_round], budget.delta, request.accountant)
            if spent > budget.max_run_epsilon:
                raise PrivacyRefused(f"round {server_round} would bring run "
                                     f"{request.run_id!r} to epsilon {spent:.3f} > this "
                                     f"site's per-run cap {budget.max_run_epsilon:g} (node "
                                     f"config {wire.NODE_DP_MAX_RUN_EPSILON}); refusing")
        return after

    entry = ledger.charge(admit, run_id=request.run_id, server_round=server_round,
                          mechanism=request.mechanism, sample_rate=q, noise_multiplier=sigma,
                          steps=steps, delta=budget.delta, accountant=request.accountant,
                          max_grad_norm=clip, trust=trust)
    after = entry.epsilon
    log.info("privacy: %s round %d charged, epsilon %.3f of %g", request.mechanism,
             server_round, after, budget.epsilon)
    # head_clip_share only splits C between two groups, and augmentation multiplicity averages
    # a sample's views before its clipping (the sensitivity stays C either way): whatever the
    # coordinator asks of them, the noise and the ledger's row are the same.
    dpsgd = DPSGDConfig(noise_multiplier=sigma, max_grad_norm=clip, sample_rate=q,
                        secure_mode=secure_mode, head_clip_share=request.head_clip_share,
                        augmentation_multiplicity=request.augmentation_multiplicity
                        ) if request.mechanism == wire.DP_SGD else None
    return Authorization(dpsgd, entry)


def _site_dp_trust(request: PrivacySpec, budget: SiteBudget, survivors_signed: bool) -> str:
    """Whom a site-level round's guarantee trusts; server noise only if the operator agreed.

    Distributed: the round's row ``(sigma, 1, 1)`` is this site's own bound - its share is
    calibrated so that any sum of ``m`` honest shares is at least as private as the Gaussian
    row says (``protocol.skellam``), and it refuses to help unmask a smaller sum."""
    if request.noise == wire.DP_NOISE_SERVER:
        if not budget.trust_server:
            raise PrivacyRefused(f"the server asks to add the site-level DP noise itself "
                                 f"(privacy.noise=server); this site does not trust it to "
                                 f"(node config {wire.NODE_DP_TRUST_SERVER}); refusing")
        return TRUST_SERVER
    m = request.min_contributors or 1
    # the server picks m: a larger m means a smaller share per site, private only if m honest
    # sites add theirs. How many honest peers to rely on is the operator's call.
    if budget.max_assumed_sites is not None and m > budget.max_assumed_sites:
        raise PrivacyRefused(f"the distributed noise share would assume {m} honest "
                             f"contributors (privacy.min_contributors); this site relies on "
                             f"at most {budget.max_assumed_sites} (node config "
                             f"{wire.NODE_DP_MAX_ASSUMED_SITES}); refusing")
    if not survivors_signed and not budget.trust_server:
        raise PrivacyRefused("distributed site-level DP under the semi-honest SecAgg+: the "
                             "survivor set is the server's word, so the server could unmask "
                             "this site's update with 1/m of the noise; this site does not "
                             f"trust the server with its DP (node config "
                             f"{wire.NODE_DP_TRUST_SERVER}); refusing")
    return trust_sites(m, server_counted=not survivors_signed)


def _history(entries: list[LedgerEntry]) -> list[tuple[float, float, int]]:
    return [(e.noise_multiplier, e.sample_rate, e.steps) for e in entries]


def _check_caps(budget: SiteBudget, sigma: float, steps: int) -> None:
    """The site's per-round floors and ceilings on what the server asks for."""
    if budget.min_noise_multiplier is not None and sigma < budget.min_noise_multiplier:
        raise PrivacyRefused(f"noise multiplier {sigma:.4g} is below this site's minimum "
                             f"{budget.min_noise_multiplier:g} (node config "
                             f"{wire.NODE_DP_MIN_NOISE}); refusing")
    if budget.max_steps_per_round is not None and steps > budget.max_steps_per_round:
        raise PrivacyRefused(f"the round asks for {steps} private steps > this site's maximum "
                             f"{budget.max_steps_per_round} per round (node config "
                             f"{wire.NODE_DP_MAX_STEPS}); refusing")


def _plan(ledger: PrivacyLedger, request: PrivacySpec, budget: SiteBudget, q: float,
          steps: int) -> float:
    """The run's noise multiplier, calibrated once (first round) and kept in the ledger."""
    plan = ledger.get_plan(request.run_id, request.mechanism)
    if plan is not None:
        if not math.isclose(plan.sample_rate, q):
            raise PrivacyRefused(f"the run changed its sample rate ({plan.sample_rate:g} -> "
                                 f"{q:g}); the noise was calibrated for the first")
        return plan.noise_multiplier
    total = steps * request.planned_rounds
    if request.noise_multiplier is not None:     # the spec's rules: set means > 0
        sigma = request.noise_multiplier
    else:
        if request.epsilon > budget.epsilon:
            raise PrivacyRefused(f"the server's target epsilon {request.epsilon:g} "
                                 f"exceeds this site's budget {budget.epsilon:g}")
        sigma = calibrate_noise(target_epsilon=request.epsilon, delta=budget.delta,
                                sample_rate=q, steps=total, accountant=request.accountant)
    _check_plan(ledger, request, budget, [(sigma, q, total)])
    ledger.set_plan(request.run_id, request.mechanism, noise_multiplier=sigma, sample_rate=q,
                    planned_steps=total, target_epsilon=request.epsilon or budget.epsilon,
                    delta=budget.delta)
    return sigma


def _check_plan(ledger: PrivacyLedger, request: PrivacySpec, budget: SiteBudget,
                planned: list[tuple[float, float, int]]) -> None:
    """Refuse up front a run whose whole plan would exceed the budget (first round only)."""
    if any(e.run_id == request.run_id and e.mechanism == request.mechanism
           for e in ledger.entries()):
        return
    projected = epsilon([*ledger.history(), *planned], budget.delta, request.accountant)
    if projected > budget.epsilon:
        raise PrivacyRefused(f"the run's plan ({request.planned_rounds} rounds, noise "
                             f"multiplier {planned[0][0]:.3g}) would bring this site's epsilon "
                             f"to {projected:.3f} > its budget {budget.epsilon:g}; refusing")
    run = epsilon(planned, budget.delta, request.accountant)   # the run's first round: its own
    if budget.max_run_epsilon is not None and run > budget.max_run_epsilon:
        raise PrivacyRefused(f"the run's plan ({request.planned_rounds} rounds) would spend "
                             f"epsilon {run:.3f} > this site's per-run cap "
                             f"{budget.max_run_epsilon:g} (node config "
                             f"{wire.NODE_DP_MAX_RUN_EPSILON}); refusing")
