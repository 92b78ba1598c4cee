"""The site policy codec: what a site declares when the server asks before a run (preflight).

A site answers a ``query`` message asking :data:`~protocol.wire.QUERY_POLICY` with one
:class:`SitePolicy`, read from its operator's node config and its own privacy ledger: flags
(require-dp, require-secagg, role, whether a budget is set) and the budget's numbers with the
epsilon its ledger has spent. No data counts, nothing about its studies. The site encodes it
with ``to_record``; the server decodes it with ``from_record``, distrusting every field.
Asked with the experiment's job, it also answers whether it can serve it (layout, foundation
weights present and of the job's frozen-base digest; ``client/readiness.py``): flags, and
the line its DP-SGD check would refuse the job's model with (method or layer names only).

What a site declares is a courtesy to fail early; it enforces the same policy on every round
it is asked to train (``client/privacy/policy.py``), whatever the preflight concluded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import ConfigRecord

from . import wire


class PolicyDecodeError(ValueError):
    """A policy reply that does not follow this codec; the message names the field."""


@dataclass(frozen=True)
class SitePolicy:
    """One site's declared policy.

    Parameters
    ----------
    site_id, role : str
        Who answers, and ``train`` or ``external`` (evaluates, never trains).
    require_dp : bool
        The site refuses non-private training (it has a budget and ``require-dp``).
    require_secagg : bool
        The site refuses to send a plaintext model update.
    epsilon, delta : float, optional
        The operator's lifetime budget; None when the site has none (it refuses DP requests).
    epsilon_spent : float
        What the site's ledger has spent, composed at its ``delta``, rounded up to 0.01.
    max_run_epsilon, min_noise_multiplier : float, optional
        The operator's per-run cap and noise floor (node config), None when unset.
    layout_ok, weights_found, weights_match : bool, optional
        Asked with a job: the site reads its layout; a foundation model's weights NAME is in
        its foundation-dir; its frozen base has the job's digest. None: not asked, or not
        needed by the job (no foundation model; weights not found, so not compared).
    dp_refusal : str, optional
        Asked with a job whose weights match: the line round 1 would refuse DP-SGD for the
        job's model with (a method or layer the site's clipper has no rule for). None: not
        refused, or not asked. Decoded as one printable line of at most
        :data:`MAX_REFUSAL_CHARS` characters (the server logs it).
    size_refusal : str, optional
        Asked with a job: the line round 1 would refuse the job's model with for its size
        (parameters, tokens or activations a step over the site's node-config caps: model
        and config numbers, no data). None: within the caps, or not asked. Decoded as
        ``dp_refusal`` is.
    trust_server : bool
        The site accepts site-level DP whose noise the server adds (``dp-trust-server``).
    max_assumed_sites : int, optional
        Distributed site-level DP: the most honest contributors this site's noise share may
        rely on (``dp-max-assumed-sites``); it refuses rounds with a larger
        ``privacy.min_contributors``. None: no cap set.
    """
    site_id: str
    role: str = wire.ROLE_TRAIN
    require_dp: bool = False
    require_secagg: bool = False
    epsilon: float | None = None
    delta: float | None = None
    epsilon_spent: float = 0.0
    max_run_epsilon: float | None = None
    min_noise_multiplier: float | None = None
    layout_ok: bool | None = None
    weights_found: bool | None = None
    weights_match: bool | None = None
    dp_refusal: str | None = None
    size_refusal: str | None = None
    trust_server: bool = False
    max_assumed_sites: int | None = None

    @property
    def has_budget(self) -> bool:
        return self.epsilon is not None

    @property
    def epsilon_left(self) -> float | None:
        return None if self.epsilon is None else max(self.epsilon - self.epsilon_spent, 0.0)

    def to_record(self) -> ConfigRecord:
        record = ConfigRecord({wire.SITE_ID: self.site_id, wire.NODE_ROLE: self.role,
                               wire.NODE_REQUIRE_DP: self.require_dp,
                               wire.NODE_REQUIRE_SECAGG: self.require_secagg,
                               wire.NODE_DP_TRUST_SERVER: self.trust_server,
                               wire.POLICY_HAS_BUDGET: self.has_budget,
                               wire.POLICY_EPSILON_SPENT: math.ceil(self.epsilon_spent * 100)
                               / 100})
        for key, value in _OPTIONAL_NUMBERS:
            if getattr(self, value) is not None:
                record[key] = float(getattr(self, value))
        for key, value in _OPTIONAL_FLAGS:
            if getattr(self, value) is not None:
                record[key] = bool(getattr(self, value))
        if self.max_assumed_sites is not None:
            record[wire.NODE_DP_MAX_ASSUMED_SITES] = int(self.max_assumed_sites)
        for key, value in _REFUSALS:
            if getattr(self, value) is not None:
                record[key] = str(getattr(self, value))
        return record

    @classmethod
    def from_record(cls, record: ConfigRecord) -> SitePolicy:
        """Decode and check a reply (types, ranges, a budget's two numbers together).

        Raises
        ------
        PolicyDecodeError
        """
        def get(key: str, kind: type, default=None):
            value = record.get(key, default)
            if value is None or isinstance(value, kind) and not (
                    kind is float and isinstance(value, bool)):
                return value
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                return float(value)
            raise PolicyDecodeError(f"policy field {key!r} is not a {kind.__name__}")

        role = get(wire.NODE_ROLE, str, wire.ROLE_TRAIN)
        if role not in wire.ROLES:
            raise PolicyDecodeError(f"policy role {role!r} is not one of {', '.join(wire.ROLES)}")
        numbers = {value: get(key, float) for key, value in _OPTIONAL_NUMBERS}
        spent = get(wire.POLICY_EPSILON_SPENT, float, 0.0)
        for name, value in [*numbers.items(), ("epsilon_spent", spent)]:
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise PolicyDecodeError(f"policy field {name} must be finite and >= 0")
        if get(wire.POLICY_HAS_BUDGET, bool, False) != (numbers["epsilon"] is not None) or \
                (numbers["epsilon"] is None) != (numbers["delta"] is None):
            raise PolicyDecodeError("policy budget is inconsistent (has-budget, dp-epsilon, "
                                    "dp-delta)")
        cap = get(wire.NODE_DP_MAX_ASSUMED_SITES, int)
        if cap is not None and (isinstance(cap, bool) or cap < 1):
            raise PolicyDecodeError(f"policy field {wire.NODE_DP_MAX_ASSUMED_SITES!r} must be an "
                                    "int >= 1")
        return cls(site_id=get(wire.SITE_ID, str, ""), role=role,
                   require_dp=get(wire.NODE_REQUIRE_DP, bool, False),
                   require_secagg=get(wire.NODE_REQUIRE_SECAGG, bool, False),
                   trust_server=get(wire.NODE_DP_TRUST_SERVER, bool, False),
                   epsilon_spent=spent, max_assumed_sites=cap,
                   **{value: _one_line(get(key, str)) for key, value in _REFUSALS},
                   **numbers,
                   **{value: get(key, bool) for key, value in _OPTIONAL_FLAGS})


MAX_REFUSAL_CHARS = 400     # a refusal line is a sentence; longer is cut (the server logs it)


def _one_line(text: str | None) -> str | None:
    """``text`` as one printable line of at most :data:`MAX_REFUSAL_CHARS` characters: a
    site's free text cannot forge log lines or flood the coordinator's output."""
    if text is None:
        return None
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return line if len(line) <= MAX_REFUSAL_CHARS else line[:MAX_REFUSAL_CHARS - 3] + "..."


# SitePolicy field -> its key; absent from the record when None
_OPTIONAL_NUMBERS = ((wire.NODE_DP_EPSILON, "epsilon"), (wire.NODE_DP_DELTA, "delta"),
                     (wire.NODE_DP_MAX_RUN_EPSILON, "max_run_epsilon"),
                     (wire.NODE_DP_MIN_NOISE, "min_noise_multiplier"))
# SitePolicy field -> its key; absent from the record when None (not asked or not needed)
_OPTIONAL_FLAGS = ((wire.POLICY_LAYOUT_OK, "layout_ok"), (wire.POLICY_WEIGHTS_FOUND,
                   "weights_found"), (wire.POLICY_WEIGHTS_MATCH, "weights_match"))
# SitePolicy field -> its key: a site's refusal line, absent when None
_REFUSALS = ((wire.POLICY_DP_REFUSAL, "dp_refusal"), (wire.POLICY_SIZE_REFUSAL, "size_refusal"))
