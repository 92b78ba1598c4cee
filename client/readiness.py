"""What a site can serve of a job, declared before a run (the preflight's policy query).

The coordinator's preflight asks with the experiment's job (the ``JobSpec`` record every train
message carries, ``server/preflight.py``). The site answers flags only, from its OWN installed
code, node config and files, never a path, a file name or a count:

- **layout**: the layout the job reads with is one this site can read. A deployed site
  declares the layout its data were checked with at start (node config ``layout``:
  ``medfed site --layout NAME|FILE``) and serves that one; a site that declares none serves
  every layout shipped with its installed MedFed. "Serves" compares what selects the series
  and texts read (rules, channels, policies), not just the name: a job may not rename its own
  selection rules into a layout the site agreed to (:func:`served_layout`, which a train or
  evaluate message meets too). Preprocessing (target size, spacing, windows) is the
  experiment's.
- **foundation weights** (a job whose model loads a pretrained encoder): the weights NAME
  resolves to a directory in the site's node config ``foundation-dir``, and the frozen base the
  site builds from it has the job's digest - exactly the check a train message meets
  (``client.foundation.check_site_model``), so the answer cannot disagree with round 1.
  Weights that match may still be refused by that check for DP-SGD (a method or layer the
  site's exact clipper has no per-sample rule for): the answer then carries round 1's
  refusal line, which names the method or layer, never data.
- **size**: the job's model is within the site's size caps (node config
  ``max-model-parameters``, ``max-study-tokens``, ``max-step-tokens``,
  ``max-step-activations``), sized on the meta device exactly as round 1 sizes it
  (``QueryLimits.check_model_size``) and never built when it is not; the answer carries round
  1's refusal line (the model's sizes and the caps, never data). A foundation model is sized
  from the directory's config once its weights are found.

The job is decoded as a train message's is (``client.job.decode_job``); its weights name is
checked to be a bare name before anything touches the filesystem, so a forged query with a
path or ``..`` in it makes the site read nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from flwr.app import ConfigRecord

from models import MODELS
from models.foundation import FOUNDATION_DIR, resolve_weights
from protocol import wire
from protocol.layout import DEFAULT_LAYOUT, Layout

from .foundation import FoundationRefused, check_site_model, site_foundation_dir
from .job import decode_job
from .privacy.policy import PrivacyRefused
from .queries import QueryLimits, QueryRefused

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Readiness:
    """A site's answer about one job: flags, and the DP-SGD and size refusals round 1 would
    give; None where the job does not need the check (or nothing is refused)."""
    layout_ok: bool
    weights_found: bool | None = None
    weights_match: bool | None = None
    dp_refusal: str | None = None
    size_refusal: str | None = None


def asks_for_job(config: ConfigRecord) -> bool:
    """Whether the policy query carries a job (older coordinators ask without one)."""
    return wire.MODEL_NAME in config


def job_readiness(config: ConfigRecord, settings: dict, data_dir: Path, *,
                  simulated: bool = False) -> Readiness:
    """This site's :class:`Readiness` for the job in a policy query's ``config`` record;
    ``simulated``: the layout as a simulated site reads it (the job's, as sent:
    :func:`served_layout`), so the preflight answers as round 1 would.

    Raises
    ------
    client.job.JobError
        The job is malformed or names what this site's registries do not offer (as a train
        message with it would be refused).
    """
    job = decode_job(config, site_seed=0)
    try:
        served_layout(job.layout, settings, simulated=simulated)
        layout_ok = True
    except LayoutRefused:
        layout_ok = False
    sized = partial(QueryLimits.from_settings(settings).check_model_size,   # on the meta
                    batch=job.train.batch_size * job.privacy.augmentation_multiplicity,
                    per_sample=job.privacy.mechanism == wire.DP_SGD)          # device only
    if FOUNDATION_DIR not in MODELS.resources(job.model_name):
        return Readiness(layout_ok, size_refusal=_size_refusal(sized, job.build))
    # The name was checked by decode_job (FoundationConfig); resolve_weights checks it again
    # before any path is formed: nothing below reads a path the query could have chosen.
    name = str(job.model_options.get("weights", ""))
    directory = site_foundation_dir(settings, data_dir)
    try:
        found = resolve_weights(directory, name).is_dir()
    except ValueError:                      # no foundation-dir here (FoundationLoadError)
        found = False
    if not found:       # said here, where paths may be read: the answer is the flag alone
        log.warning("foundation weights %r not found in %s (node config %r)", name,
                    directory or "no directory: none is set", wire.NODE_FOUNDATION_DIR)
        return Readiness(layout_ok, weights_found=False)
    refusal = None
    build = partial(job.build, foundation_dir=directory)
    try:        # sized from the directory's config before anything is built
        too_large = _size_refusal(sized, build)
        if too_large is not None:
            return Readiness(layout_ok, weights_found=True, size_refusal=too_large)
        model, _ = build()
        check_site_model(model, job)
        match = True
    except FoundationRefused:
        match = False
    except PrivacyRefused as err:           # raised after the base digest matched: the weights
        match, refusal = True, str(err)     # are the job's; DP-SGD is refused as in round 1
    except (OSError, ValueError) as err:     # unreadable or invalid weights: not the job's base
        log.warning("foundation weights %r could not be built here: %s", name,
                    type(err).__name__)
        match = False
    return Readiness(layout_ok, weights_found=True, weights_match=match, dp_refusal=refusal)


def _size_refusal(sized, build) -> str | None:
    """The line round 1 would refuse ``build``'s model with for its size (the site's caps:
    ``QueryLimits.check_model_size``, meta device), or None within them."""
    try:
        sized(build)
    except QueryRefused as err:
        return str(err)
    return None


class LayoutRefused(ValueError):
    """The job's layout is not one this site serves (its reason names layouts, no data)."""


def served_layout(job_layout: Layout | None, settings: dict, *,
                  simulated: bool) -> Layout | None:
    """The layout this site reads a job with, once its selection is checked as the site's own.

    The job's layout is data the coordinator sent; its rules select which of the site's series
    (and whether its report texts) are read - a rule admitting any series description would
    train on whatever the archive holds. A deployed site therefore reads only with the
    selection of a layout it holds itself: the one it declared (node config ``layout``) or,
    declaring none, the one shipped with its installed MedFed under that name. The job's
    layout must equal it in every rule, channel and policy (:meth:`Layout.selection`); its
    preprocessing (target size, spacing, intensity windows), which experiments set, is the
    job's. ``None`` (the job names no layout) means the default brain reader. A simulated site
    (the federation's own synthetic hospitals, run by the same user) reads the job's layout
    as sent.

    Raises
    ------
    LayoutRefused
        The job's layout selects otherwise than the declared one, or than the shipped layout
        of its name, or no such layout is served here.
    """
    if simulated:
        return job_layout
    from .data.layout import load_layout

    name = job_layout.name if job_layout is not None else DEFAULT_LAYOUT
    served = site_layouts(settings)
    if name not in served:
        raise LayoutRefused(f"the job's layout {name!r} is not one this site serves "
                            f"({', '.join(sorted(served))})")
    if job_layout is None:
        return None
    declared = settings.get(wire.NODE_LAYOUT)
    own = load_layout(str(declared) if declared else name)
    if own.selection() != job_layout.selection():
        raise LayoutRefused(f"the job's layout {name!r} differs from this site's own "
                            f"{name!r} in the rules or policies that select what is read")
    return job_layout


def site_layouts(settings: dict) -> set[str]:
    """Names of the layouts this site reads: its declared one (node config ``layout``, a
    shipped name or the operator's YAML file), else every layout its installed code ships."""
    from .data.layout import load_layout, shipped_layouts

    declared = settings.get(wire.NODE_LAYOUT)
    if not declared:
        return {DEFAULT_LAYOUT, *shipped_layouts()}
    text = str(declared)
    if text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        return {load_layout(text).name}       # the operator's own file (node config)
    return {text}


__all__ = ["LayoutRefused", "Readiness", "asks_for_job", "job_readiness", "served_layout",
           "site_layouts"]
