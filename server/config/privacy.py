"""Server-side privacy checks: what the spec's own rules (``protocol.job``) cannot see.

The mechanism's parameters and the DP-SGD task refusals are the protocol's rules, the same a
site applies when it decodes the job; here the privacy request is checked against the rest of
the experiment (strategy capabilities, sampling, the number of sites).
"""

from __future__ import annotations

from protocol import wire
from protocol.job import SpecError, check_site_dp_scope
from strategies.registry import strategies_with, strategy_entry

from .schema import ConfigError, ExperimentConfig


def validate_privacy(cfg: ExperimentConfig) -> None:
    """Refuse privacy settings the accountant does not cover, saying which and why."""
    p = cfg.privacy
    try:
        p.check()                                  # also run at construction; cheap
        p.check_task(cfg.task.name, cfg.task_options())
        check_site_dp_scope(cfg.strategy.personalize, cfg.strategy.local_params,
                            p.mechanism)
    except SpecError as err:
        raise ConfigError(str(err)) from None
    if p.mechanism != wire.DP_SITE:
        return
    if not strategy_entry(cfg.strategy.name).sum_aggregating:
        summing = ", ".join(strategies_with("sum_aggregating"))
        raise ConfigError(f"privacy.mechanism=site-dp with strategy={cfg.strategy.name}: "
                          "server noise on a sum only protects strategies that aggregate by "
                          f"a plain weighted sum ({summing}); "
                          f"{cfg.strategy.name} needs individual updates or rescales them")
    if cfg.strategy.fraction_train != 1.0:
        raise ConfigError("privacy.mechanism=site-dp is accounted without sampling "
                          "amplification; set strategy.fraction_train=1.0")
    if cfg.strategy.min_train_sites != cfg.federation.num_sites:
        raise ConfigError("privacy.mechanism=site-dp needs every site's update in every round "
                          "(the noise is calibrated to the number of sites): set "
                          f"strategy.min_train_sites={cfg.federation.num_sites}")
    if p.noise == wire.DP_NOISE_DISTRIBUTED and not cfg.secagg.enabled:
        raise ConfigError("privacy.noise=distributed: each site adds its noise share inside "
                          "secure aggregation, which is off; set secagg.enabled=true (or "
                          "privacy.noise=server to trust the server with the noise)")
    if p.noise == wire.DP_NOISE_DISTRIBUTED:
        _check_contributors(cfg)
    if p.delta >= 1.0 / cfg.federation.num_sites:
        raise ConfigError(f"privacy.delta={p.delta:g} >= 1/num_sites: a site-level guarantee "
                          "that weak allows publishing one site's update")


def _check_contributors(cfg: ExperimentConfig) -> None:
    """Each share assumes ``m`` contributors and a site counts itself and its surviving
    SecAgg+ neighbours before it helps unmask: ``m`` must be at most ``degree + 1``."""
    from protocol.secagg_protocol import SecAggConfig, SecAggError

    n, m = cfg.federation.num_sites, cfg.privacy.min_contributors or cfg.federation.num_sites
    if m > n:
        raise ConfigError(f"privacy.min_contributors={m} > num_sites={n}: no round could "
                          "ever be unmasked")
    try:
        degree, _ = SecAggConfig(degree=cfg.secagg.degree,
                                 threshold=cfg.secagg.threshold).resolve(n)
    except SecAggError as err:
        raise ConfigError(f"secagg: {err}") from None
    if m > degree + 1:
        raise ConfigError(f"privacy.min_contributors={m} but a site sees only its "
                          f"{degree} SecAgg+ neighbours, so it can vouch for at most "
                          f"{degree + 1} contributors and would refuse every unmask; set "
                          f"privacy.min_contributors<={degree + 1} or raise secagg.degree")
