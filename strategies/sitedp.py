"""Site-level DP, the server's half: Gaussian noise on the sum of clipped site updates.

Flower's ``DifferentialPrivacyClientSideFixedClipping`` does the work (it injects the
clipping norm for the sites' ``fixedclipping_mod``, checks that every sampled site answered
with equal weight, adds N(0, (sigma C / n)^2) to the average and composes Flower's
``RdpAccountant``). This subclass only configures the accountant and exposes the spent epsilon for tracking. It sits directly around FedAvg (Flower's
accountant checks the aggregation rule), inside the fault guard.
"""

from __future__ import annotations

from flwr.serverapp import PrivacyConfig as FlowerPrivacyConfig
from flwr.serverapp import RdpAccountant
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod


class SiteLevelDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping DP wrapper with site-count accounting."""

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clipping_norm: float,
                 num_sites: int, delta: float):
        accountant = RdpAccountant(FlowerPrivacyConfig(
            target_delta=delta, population_size=num_sites,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION))
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sites,
                         accountant=accountant)

    @property
    def epsilon(self) -> float:
        """Site-level epsilon spent so far (at the configured delta); 0 before any release."""
        spent = self.privacy_spent()
        return float(spent.epsilon) if spent is not None and spent.num_releases else 0.0
