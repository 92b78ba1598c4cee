"""Preflight: what would make a run fail later, refused before round 1 in one line.

Run by the ServerApp before anything else (``server/app.py``), and alone by
``medfed run --dry-run`` (run config ``preflight-only``):

1. the tracking store answers (``server/tracking_store.py``), so a run tracked to a server
   that is down fails in seconds, not after minutes of MLflow retries;
2. every connected site declares its policy (a ``query`` for ``policy``, bounded by a
   timeout; ``protocol/policy.py``) and the experiment is checked against it: non-private
   training against sites that require DP, DP against sites without a budget, plaintext
   updates against sites that require SecAgg, fewer training sites than the strategy's
   minimum, and a privacy plan a site would certainly refuse (below);
3. the query carries the experiment's job (the record every train message carries; a
   foundation model's frozen-base digest as built here), and each site answers flags only
   (``client/readiness.py``): whether it reads the job's layout, whether the foundation
   weights NAME is in its foundation-dir and gives this digest - and, where DP-SGD is asked
   and the weights match, the line its DP-SGD check would refuse the model with in round 1.
   Sites that cannot serve the job are named, with the fix;
4. each site id names one node: the answers bind them for the run
   (``strategies/site_names.py``), and two nodes answering as one site are refused (the
   server could not tell whose figures, failures and budget are whose).

Budgets: a site composes its whole ledger with the new run, so only it can decide; the
preflight refuses only what a site would refuse for sure - a DP-SGD target epsilon above a
site's budget (or, less the calibration tolerance, above its per-run cap), a site-level DP
run whose own epsilon (computed here exactly as the site will, at the site's delta) exceeds
its budget or cap, a noise multiplier below a site's floor, a budget already spent. A plan
above the epsilon a site has *left* may still compose under its budget (RDP composition is
sub-additive); it is logged as a warning. A DP-SGD run with a fixed noise multiplier spends
an epsilon that depends on each site's number of studies, which never leaves the site: only
the noise floor is checked. Sites enforce their policy every round whatever the preflight
concluded; this is the early, readable failure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from protocol import wire
from protocol.layout import DEFAULT_LAYOUT
from protocol.policy import PolicyDecodeError, SitePolicy
from strategies.guard import error_summary, wait_for_quorum
from strategies.site_names import SiteNames

from .config import ExperimentConfig
from .prompt_grid import collect
from .tracking_store import check_tracking_store

log = logging.getLogger("medfed.server")

# Seconds of silence after which the sites that have not answered the policy query are
# counted as silent. Until the first answer the wait is the round timeout: a simulation's
# sites start their processes with the first message (on a loaded machine, minutes), and
# its 1,000 sites answer one after another on a few processes.
POLICY_TIMEOUT = 60.0
CALIBRATION_TOLERANCE = 0.005   # protocol.accounting.calibrate_noise: epsilon within this


REFUSED = "preflight refused the run: "   # then the problems, joined by PROBLEM_SEPARATOR
PROBLEM_SEPARATOR = " | "


class PreflightError(ValueError):
    """The run would fail; the message holds one line per problem, each naming the fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(REFUSED + PROBLEM_SEPARATOR.join(self.problems))


@dataclass(frozen=True)
class PreflightReport:
    """What the preflight found: the sites that answered, what it could not refuse, and the
    name each node answered with (``site_names``), so that a site failing in round 1, before
    any reply of the run named it, is not shown by its Flower node id alone."""
    policies: tuple[SitePolicy, ...]
    warnings: tuple[str, ...] = ()
    sites: dict[int, str] = field(default_factory=dict)     # node id -> site id

    def summary(self) -> str:
        train = [p for p in self.policies if p.role == wire.ROLE_TRAIN]
        return (f"{wire.PREFLIGHT_OK}{len(self.policies)} sites ({_names(train) or 'none'} train"
                + (f"; {_names([p for p in self.policies if p not in train])} external"
                   if len(train) < len(self.policies) else "") + ")")


def run_preflight(grid: Grid, cfg: ExperimentConfig, *,
                  policy_timeout: float = POLICY_TIMEOUT) -> PreflightReport:
    """Tracking store, then every connected site's policy against ``cfg``.

    Raises
    ------
    PreflightError
        With every problem found (tracking first: without it nothing else is asked).
    strategies.guard.QuorumError
        Fewer than the strategy's minimum sites connected within the quorum timeout.
    """
    tracking = check_tracking_store(cfg.tracking.uri)
    if tracking:
        raise PreflightError([tracking])
    wait_for_quorum(grid, cfg.strategy.min_available_sites, cfg.federation.quorum_timeout)
    job, builds = preflight_job(cfg)
    # A site asked about a foundation model builds it from its own weights to compare digests:
    # as long as a round's set-up, so it gets a round's time; a plain policy answer is quick.
    timeout = cfg.federation.round_timeout if builds else \
        min(policy_timeout, cfg.federation.round_timeout)
    policies, silent, named = ask_policies(grid, timeout, job=job,
                                           first=cfg.federation.round_timeout)
    for line in silent:
        log.warning("%s%s (not counted as a site)", wire.PREFLIGHT_WARNING, line)
    problems, warnings = policy_problems(cfg, policies, silent)
    sites, refused = site_names(named)
    problems += refused
    for line in warnings:
        log.warning("%s%s", wire.PREFLIGHT_WARNING, line)
    if problems:
        raise PreflightError(problems)
    return PreflightReport(tuple(policies), tuple(warnings), sites)


def preflight_job(cfg: ExperimentConfig) -> tuple[ConfigRecord, bool]:
    """The job the sites are asked whether they can serve: ``cfg``'s, as its train messages
    will carry it; a foundation model's base digest from the model built here as the run
    builds it (the weights load only for such a model). And whether the sites will build
    the model to answer (a foundation model)."""
    from models import MODELS
    from models.foundation import FOUNDATION_DIR

    digest = ""
    if FOUNDATION_DIR in MODELS.resources(cfg.model.name):
        from models.foundation import base_digest
        from models.tasks import build

        model, _ = build(cfg.model.name, cfg.model_options(), cfg.task.name,
                         cfg.task_options(), foundation_dir=cfg.model.foundation_dir)
        digest = base_digest(model)
    # a private job names a run id; this one is asked about, never trained or charged
    return cfg.job_spec(run_id="preflight", base_digest=digest).to_record(), bool(digest)


def ask_policies(grid: Grid, timeout: float, job: ConfigRecord | None = None, *,
                 first: float | None = None
                 ) -> tuple[list[SitePolicy], list[str], list[tuple[int, str]]]:
    """Every connected node's declared policy (with ``job``: and whether it can serve it),
    a line for each node that gave none (none within ``first`` seconds, or none for
    ``timeout`` seconds after an answer), and ``(node id, site id)`` of each answer."""
    nodes = list(grid.get_node_ids())
    ask = RecordDict({wire.CONFIG: ConfigRecord({**(dict(job) if job else {}),
                                                 wire.QUERY: wire.QUERY_POLICY})})
    messages = [Message(content=ask, dst_node_id=n, message_type=MessageType.QUERY)
                for n in nodes]
    policies, silent, answered, named = [], [], set(), []
    for reply in _gather(grid, messages, quiet=timeout, first=max(first or 0.0, timeout)):
        node = reply.metadata.src_node_id
        answered.add(node)
        if reply.has_error():
            silent.append(f"the policy query failed at {error_summary(reply)}")
            continue
        try:
            policies.append(SitePolicy.from_record(reply.content.config_records[wire.POLICY]))
        except (KeyError, PolicyDecodeError) as err:
            silent.append(f"node {node} answered the policy query with no valid policy ({err})")
            continue
        named.append((node, policies[-1].site_id))
    silent += [f"node {n} did not answer the policy query within {timeout:g} s"
               for n in nodes if n not in answered]
    return policies, silent, named


def site_names(named: list[tuple[int, str]]) -> tuple[dict[int, str], list[str]]:
    """Node id -> the site id it answered with, bound for the run (``SiteNames``: plain names
    only, an odd one names no node), and a problem line per name the run cannot grant:
    one that two nodes answered with (neither is that site for sure: one is misconfigured
    or impersonating it), or one that is another node's ``node-<id>``."""
    names = SiteNames()
    refused: dict[str, list] = {}
    for claim in names.claim(named):
        refused.setdefault(claim.site_id, []).append(claim)
    problems = []
    for site, claims in refused.items():
        if len(claims) > 1:
            nodes = ", ".join(str(c.node) for c in claims)
            problems.append(f"nodes {nodes} all answered as site {site!r}: a site id names "
                            "one node for a run (its MLflow records, failures and privacy "
                            "budget are kept under it) and the server cannot tell which one "
                            "is that site: one is misconfigured or impersonating it; its "
                            "operator fixes its site id (medfed site --site-id) or it is "
                            "disconnected")
        else:
            problems.append(f"{claims[0]}: its operator gives it a site id of its own "
                            "(medfed site --site-id)")
    return names.bound(), problems


def _gather(grid: Grid, messages: list[Message], *, quiet: float, first: float
            ) -> list[Message]:
    """Replies to ``messages``: up to ``first`` seconds for the first one, then until every
    node answered or none did for ``quiet`` seconds (``prompt_grid.collect``)."""
    if not messages:
        return []
    pushed = grid.push_messages(messages)
    return [m for got in collect(grid, pushed, first=first, quiet=quiet) for m in got]


def policy_problems(cfg: ExperimentConfig, policies: list[SitePolicy],
                    failed: list[str] = ()) -> tuple[list[str], list[str]]:
    """``(problems, warnings)`` of ``cfg`` against the sites' declared policies; each line
    names the sites (by site id) and the fix. ``failed``: a line for each connected site whose
    policy query failed or went unanswered (``ask_policies``' second list)."""
    train = [p for p in policies if p.role == wire.ROLE_TRAIN]
    problems, warnings = [], []
    s = cfg.strategy
    need = max(s.min_available_sites, s.min_train_sites)
    if len(train) < need:
        # connected sites that failed the query are not missing: their failure is the cause
        fix = "start more sites or lower these minimums"
        if failed:
            fix = (f"{len(failed)} more connected but gave no usable answer ("
                   f"{'; '.join(failed)}): see those sites' logs"
                   + (f"; also {fix}" if len(train) + len(failed) < need else ""))
        problems.append(f"{len(train)} training site(s) answered ({_names(train) or 'none'}), "
                        f"the strategy needs {need} (strategy.min_available_sites="
                        f"{s.min_available_sites}, strategy.min_train_sites="
                        f"{s.min_train_sites}): {fix}")
    mechanism = cfg.privacy.mechanism
    if mechanism == wire.DP_NONE:
        if required := [p for p in train if p.require_dp]:
            budgets = min(p.epsilon for p in required)
            problems.append(f"{_names(required)}: each requires differential privacy (its node "
                            f"config sets a privacy budget, {wire.NODE_REQUIRE_DP} on) and this "
                            "experiment trains without it: run with privacy=dpsgd "
                            f"privacy.epsilon=<at most {budgets:g}> (or privacy=sitedp)")
    elif without := [p for p in train if not p.has_budget]:
        problems.append(f"{_names(without)}: each has no privacy budget and refuses "
                        f"{mechanism}: its operator starts it with --dp-epsilon and --dp-delta "
                        "(simulated sites: +federation.site_node_config={dp-epsilon:10,"
                        "dp-delta:1e-5}, as experiment=dpsgd sets), or run with privacy=none")
    if cfg.secagg.enabled and len(train) >= need:     # SecAgg+'s own minimum, said up front
        from protocol.secagg_protocol import SecAggConfig, SecAggError

        try:
            SecAggConfig(degree=cfg.secagg.degree, threshold=cfg.secagg.threshold).resolve(
                len(train))
        except SecAggError as err:
            problems.append(f"{len(train)} training site(s) answered ({_names(train)}) and "
                            f"{err}: start more sites, or run with secagg.enabled=false")
    if not cfg.secagg.enabled and (secure := [p for p in train if p.require_secagg]):
        problems.append(f"{_names(secure)}: each requires secure aggregation (node config "
                        f"{wire.NODE_REQUIRE_SECAGG}) and this experiment sends plaintext "
                        "updates: run with secagg.enabled=true")
    problems += serving_problems(cfg, policies)
    if mechanism != wire.DP_NONE:
        phases = [cfg.pretrain_phase(), cfg] if cfg.pretrain.objective else [cfg]
        for phase in phases:
            for p in (p for p in train if p.has_budget):
                refused, warned = budget_check(phase, p)
                problems += [f"{p.site_id}: {line}" for line in refused]
                warnings += [f"{p.site_id}: {line}" for line in warned]
    return problems, warnings


def serving_problems(cfg: ExperimentConfig, policies: list[SitePolicy]) -> list[str]:
    """A line per thing some sites said they cannot serve of ``cfg``'s job (layout, foundation
    weights missing or of another digest, DP-SGD refused for the model, a model over their
    size caps), naming them and the fix. A site that did not answer a flag (no job asked, or
    an older site) is left to refuse in round 1."""
    problems = []
    layout = str(cfg.data.layout.get("name") or DEFAULT_LAYOUT)
    if lost := [p for p in policies if p.layout_ok is False]:
        problems.append(f"{_names(lost)}: each cannot read layout {layout!r} (their data were "
                        "checked with another layout at start, or their MedFed does not ship "
                        f"it): their operators restart them with --layout {layout} (or its "
                        "YAML file), or run with their layout (data/layout=...)")
    weights = str(cfg.model.options.get("weights", ""))
    if missing := [p for p in policies if p.weights_found is False]:
        problems.append(f"{_names(missing)}: foundation weights {weights!r} not found in their "
                        f"foundation-dir: copy the coordinator's directory {weights!r} there "
                        "(medfed site --foundation-dir DIR)")
    if differ := [p for p in policies if p.weights_match is False]:
        problems.append(f"{_names(differ)}: foundation weights {weights!r} differ from the "
                        "coordinator's (frozen-base digest): put the coordinator's copy of "
                        f"{weights!r} in their foundation-dir")
    refusals: dict[str, list[SitePolicy]] = {}
    for p in policies:
        if p.dp_refusal:        # the site's own line names the fix
            refusals.setdefault(p.dp_refusal, []).append(p)
        if p.size_refusal:      # the site's own line names its cap
            refusals.setdefault(f"{p.size_refusal}: make the model or train.batch_size "
                                "smaller, or its operator raises that cap", []).append(p)
    for line, sites in sorted(refusals.items()):
        problems.append(f"{_names(sites)}: {line}")
    return problems


def budget_check(cfg: ExperimentConfig, site: SitePolicy) -> tuple[list[str], list[str]]:
    """``(certain refusals, possible refusals)`` of this phase's privacy plan at ``site``."""
    p, rounds = cfg.privacy, cfg.federation.num_rounds
    refused, warned = [], []
    if site.epsilon_left == 0:
        return [f"its privacy budget epsilon {site.epsilon:g} is spent (ledger at "
                f"{site.epsilon_spent:.2f}); its operator decides whether to grant more"], []
    if p.noise_multiplier is not None and site.min_noise_multiplier is not None and \
            p.noise_multiplier < site.min_noise_multiplier:
        refused.append(f"privacy.noise_multiplier={p.noise_multiplier:g} is below its floor "
                       f"{site.min_noise_multiplier:g} ({wire.NODE_DP_MIN_NOISE})")
    if p.mechanism == wire.DP_SITE and p.noise == wire.DP_NOISE_SERVER and \
            not site.trust_server:
        refused.append(f"privacy.noise=server asks it to trust the server with the site-level "
                       f"DP noise and it does not ({wire.NODE_DP_TRUST_SERVER}): use "
                       "privacy=ddp (the sites add the noise) or ask its operator")
    if p.mechanism == wire.DP_SITE and p.noise == wire.DP_NOISE_DISTRIBUTED and \
            site.max_assumed_sites is not None and \
            (p.min_contributors or 1) > site.max_assumed_sites:
        refused.append(f"privacy.min_contributors={p.min_contributors}: each noise share would "
                       f"assume {p.min_contributors} honest contributors and it relies on at "
                       f"most {site.max_assumed_sites} ({wire.NODE_DP_MAX_ASSUMED_SITES}): "
                       f"run with privacy.min_contributors<={site.max_assumed_sites} (more "
                       "noise per site) or ask its operator")
    if p.mechanism == wire.DP_SGD:
        if p.noise_multiplier is not None:
            return refused, warned        # its epsilon depends on the site's data size
        planned, lower = p.epsilon, p.epsilon - CALIBRATION_TOLERANCE
    else:
        from protocol.accounting import epsilon     # Opacus: only for a site-level DP plan

        planned = lower = epsilon([(p.noise_multiplier, 1.0, 1)] * rounds, site.delta,
                                  p.accountant)
    what = f"{cfg.name} plans epsilon {planned:.3g} over {rounds} rounds"
    if planned > site.epsilon:
        refused.append(f"{what} > its budget {site.epsilon:g}: lower privacy.epsilon, "
                       "raise the noise or run fewer rounds")
    elif site.max_run_epsilon is not None and lower > site.max_run_epsilon:
        refused.append(f"{what} > its per-run cap {site.max_run_epsilon:g} "
                       f"({wire.NODE_DP_MAX_RUN_EPSILON}): lower privacy.epsilon, raise the "
                       "noise or run fewer rounds")
    elif planned > site.epsilon_left:
        warned.append(f"{what} > the {site.epsilon_left:.2f} left of its budget "
                      f"{site.epsilon:g}; composed with its ledger it may still fit - the "
                      "site decides and refuses the first round if not")
    return refused, warned


def _names(policies: list[SitePolicy]) -> str:
    return ", ".join(sorted(p.site_id for p in policies))
