"""Site-level DP, the server's half: Gaussian noise on the sum of clipped site updates.

Flower's ``DifferentialPrivacyClientSideFixedClipping`` does the work (it injects the
clipping norm for the sites' ``fixedclipping_mod``, checks that every sampled site answered
with equal weight, adds N(0, (sigma C / n)^2) to the average and composes Flower's
``RdpAccountant``). This subclass configures the accountant, reports the spent epsilon and
checkpoints the accountant's history, so a resumed run continues the guarantee instead of
counting from zero. It sits directly around FedAvg (Flower's accountant checks the
aggregation rule), inside the fault guard.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import numpy as np
from flwr.serverapp import PrivacyConfig as FlowerPrivacyConfig
from flwr.serverapp import RdpAccountant
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

from .state import RoundReport, StrategyWrapper, from_json_array, json_array

ACCOUNTANT = "accountant"


def site_accountant(*, num_sites: int, delta: float) -> RdpAccountant:
    """Flower's RDP accountant for one release per round over all sites (no amplification)."""
    return RdpAccountant(FlowerPrivacyConfig(
        target_delta=delta, population_size=num_sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION))


def spent_epsilon(accountant: RdpAccountant) -> float:
    """Epsilon spent at the accountant's delta; 0 before any release."""
    spent = accountant.get_privacy_spent()
    return float(spent.epsilon) if spent.num_releases else 0.0


def accountant_state(accountant: RdpAccountant) -> dict[str, np.ndarray]:
    """The accountant's event history (Flower's own JSON state) as one named array."""
    return {ACCOUNTANT: json_array(accountant.state_dict())}


def load_accountant_state(accountant: RdpAccountant, state: Mapping[str, np.ndarray],
                          owner: str) -> None:
    """Replay a saved history into ``accountant`` (Flower checks the privacy config matches)."""
    if set(state) != {ACCOUNTANT}:
        raise ValueError(f"{owner}: expected the accountant's history in the checkpoint, got "
                         f"{sorted(state)}; without it site-level epsilon would restart at 0")
    accountant.load_state_dict(from_json_array(state[ACCOUNTANT]))


class SiteDPAccounting:
    """The server's site-level accountant as checkpointed state and as the round's report
    (for ``SiteLevelDP`` and for ``SumNoise`` inside secure aggregation)."""

    accountant: RdpAccountant
    owner: ClassVar[str]                  # names the mechanism in a refused checkpoint

    @property
    def epsilon(self) -> float:
        """Site-level epsilon spent so far (at the configured delta); 0 before any release."""
        return spent_epsilon(self.accountant)

    def state_dict(self) -> dict[str, np.ndarray]:
        return accountant_state(self.accountant)

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        load_accountant_state(self.accountant, state, self.owner)

    def round_report(self) -> RoundReport:
        return RoundReport(site_level_epsilon=self.epsilon)


class SiteLevelDP(SiteDPAccounting, StrategyWrapper, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper with site-count accounting."""

    kind = "site-dp"
    owner = "site-level DP"

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clipping_norm: float,
                 num_sites: int, delta: float):
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sites,
                         accountant=site_accountant(num_sites=num_sites, delta=delta))



class DistributedNoise(SiteDPAccounting):
    """Distributed site-level DP inside ``SecAggPlus``: every site added its own Skellam share
    before masking (``client.privacy.ddp``), so the unmasked sum already carries the noise and
    this object adds **nothing**. It only reports the guarantee the sites booked for the sum -
    ``(sigma, 1, 1)`` Gaussian rows, which dominate the Skellam sum (``protocol.skellam``) -
    and refuses a sum of fewer than ``min_contributors`` sites, whose noise would be short.

    It plugs into ``SecAggPlus``'s site-DP hook; its ``add_noise`` is that hook's name and
    returns the average unchanged. The server's number is a report: each site's ledger holds
    its own, computed from its own settings.
    """

    owner = "distributed site-level DP (sites' noise)"

    def __init__(self, *, noise_multiplier: float, clipping_norm: float, num_sites: int,
                 min_contributors: int, delta: float):
        self.noise_multiplier, self.clipping_norm = noise_multiplier, clipping_norm
        self.num_sites, self.min_contributors = num_sites, min_contributors
        self.accountant = site_accountant(num_sites=num_sites, delta=delta)

    def add_noise(self, average: np.ndarray, *, contributors: int) -> np.ndarray:
        """The hook ``SecAggPlus`` calls after unmasking: account, add nothing."""
        from flwr.serverapp import GaussianPrivacyEvent

        if contributors < self.min_contributors:
            raise ValueError(f"{contributors} sites in the sum, fewer than min_contributors="
                             f"{self.min_contributors}: its noise is short of the guarantee")
        self.accountant.compose(GaussianPrivacyEvent(
            noise_multiplier=self.noise_multiplier, sample_size=contributors,
            population_size=self.num_sites))
        return average
