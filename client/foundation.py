"""A foundation model's base weights are the SITE's: resolved in its own directory, checked
against the coordinator's digest, never received over the wire.

The job names the encoder by a bare name (``models.foundation.config.check_weights_name``);
this site looks it up in node config ``foundation-dir`` (its operator's choice), builds the
model from its own copy, and refuses the job when the frozen base it built differs from the
one the coordinator built (``wire.BASE_DIGEST``) - the federation would otherwise average
adapters trained on different encoders. The refusal is policy (no site data in it), so its
reason reaches the coordinator (``client.mods.errors.POLICY_REFUSALS``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from models.foundation import base_digest, dp_refusal, site_owned_base
from protocol import wire
from protocol.job import JobSpec

from .privacy.dpsgd import clipping_refusal
from .privacy.policy import PrivacyRefused


class FoundationRefused(ValueError):
    """This site will not train or evaluate the foundation model the job asks for."""


def site_foundation_dir(settings: dict, data_dir: Path) -> Path | None:
    """Node config ``foundation-dir`` (relative: under the site's data directory), or None."""
    value = settings.get(wire.NODE_FOUNDATION_DIR)
    if not value:
        return None
    path = Path(str(value))
    return path if path.is_absolute() else data_dir / path


def check_site_model(model: nn.Module, job: JobSpec) -> bool:
    """Refuse a built model whose base differs from the coordinator's, or that DP-SGD cannot
    cover; before anything is trained or charged. Returns whether the base is site-owned
    (its frozen weights then neither arrive nor leave).

    Raises
    ------
    FoundationRefused
        No digest in the job, or another digest than this site's base gives.
    PrivacyRefused
        DP-SGD requested for a model it cannot cover: a backbone family (or method) whose
        per-sample rule does not hold, or - any model - a trainable layer the exact clipper
        has no rule for (``client.privacy.dpsgd.clipping_refusal``). Asked here, before the
        ledger is charged: the clipper itself is built only once training starts.
    """
    site_base = site_owned_base(model)
    if site_base:
        _check_base(model, job)
    if job.privacy.mechanism == wire.DP_SGD:
        reason = (dp_refusal(model) if site_base else None) or clipping_refusal(model)
        if reason:
            what = "this foundation model" if site_base else f"model {job.model_name!r}"
            raise PrivacyRefused(f"privacy.mechanism=dp-sgd refused for {what}: {reason}")
    return site_base


def _check_base(model: nn.Module, job: JobSpec) -> None:
    if not job.base_digest:
        raise FoundationRefused("the job names a foundation model but no base digest "
                                f"({wire.BASE_DIGEST!r}); this site will not train an "
                                "unverified base")
    own = base_digest(model)
    if own != job.base_digest:
        raise FoundationRefused(
            f"this site's foundation weights {job.model_options.get('weights')!r} differ from "
            f"the coordinator's (frozen-base digest {own[:12]} here, {job.base_digest[:12]} in "
            "the job); put the same weights in this site's foundation-dir")


def expected_arrays(model: nn.Module, local: list[str]) -> set[str]:
    """The keys a site-owned-base model receives and sends: its trainable state (not frozen,
    not kept at the site)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return set(model.state_dict()) - frozen - set(local)


__all__ = ["FoundationRefused", "check_site_model", "expected_arrays", "site_foundation_dir"]
