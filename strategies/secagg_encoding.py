"""Fixed-point encoding of model deltas for secure aggregation over Z_(2^32).

A site masks its *delta* from the round's global weights, not the weights themselves (deltas
are small, so a fixed range loses little). Each value is clipped to ``[-clip_range,
clip_range]`` - and every clipped value is counted, never silently - scaled, stochastically
rounded (unbiased), multiplied by the site's integer weight (its example count, capped) and
reduced mod 2^32. The weight itself rides along as one more element, so the weighted average
is computed entirely inside the secure sum. The scale is chosen so that the sum of
``max_sites`` sites at the extremes cannot overflow the signed 32-bit range; transport is
uint32, the same bytes as float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MODULUS_BITS = 32
_HALF = 1 << (MODULUS_BITS - 1)
_FLOAT32_EXACT = 1 << 24            # integers float32 holds exactly (encode works in float32)


@dataclass(frozen=True)
class Encoding:
    clip_range: float = 0.5         # |delta| per coordinate above this is clipped (and counted)
    max_sites: int = 100            # summands the field must hold without overflow
    max_weight: int = 1000          # example counts above this are capped

    def __post_init__(self):
        if self.clip_range <= 0 or self.max_sites < 1 or self.max_weight < 1:
            raise ValueError("clip_range > 0, max_sites >= 1 and max_weight >= 1 required")
        if self.scale < 1:
            raise ValueError(f"max_sites x max_weight x clip_range = "
                             f"{self.max_sites * self.max_weight * self.clip_range:g} leaves "
                             "no precision in 32 bits; lower one of them")

    @property
    def scale(self) -> float:
        """Units per 1.0: sum over max_sites of max_weight * (clip_range * scale + 1) < 2^31."""
        no_overflow = ((_HALF - 1) / (self.max_sites * self.max_weight) - 1) / self.clip_range
        return min(no_overflow, (_FLOAT32_EXACT - 1) / self.clip_range)

    @property
    def resolution(self) -> float:
        """Worst-case rounding error of one site's value (before averaging)."""
        return 1.0 / self.scale

    def weight_of(self, num_examples: int) -> int:
        return int(min(max(int(num_examples), 1), self.max_weight))


def encode(delta: np.ndarray, num_examples: int, encoding: Encoding,
           rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Flat float delta -> (uint32 vector of len + 1, number of clipped values).

    The last element carries the site's weight. float32 throughout: |value x scale| stays
    below 2^31 / max_sites, and float32 keeps the rounding fraction to better than 1e-3 up
    to values of ~10^4 units (a delta of ~0.007 at the default scale), exact below that.
    """
    weight = encoding.weight_of(num_examples)
    x = np.asarray(delta, dtype=np.float32).ravel()
    y = np.clip(x, -encoding.clip_range, encoding.clip_range)
    clipped = int(x.size - np.count_nonzero(y == x))
    y *= np.float32(encoding.scale)
    low = np.floor(y)
    y -= low                                                   # fraction in [0, 1)
    low += rng.random(x.size, dtype=np.float32) < y            # stochastic rounding, unbiased
    out = np.empty(x.size + 1, dtype=np.uint32)
    values = out[:-1].view(np.int32)
    np.copyto(values, low, casting="unsafe")                  # exact: integers < 2^24
    values *= weight                                           # |low x weight| < 2^31
    out[-1] = weight
    return out, clipped


def decode(total: np.ndarray, encoding: Encoding) -> tuple[np.ndarray, int]:
    """Sum of encoded vectors (mod 2^32) -> (weighted average delta float32, total weight)."""
    total = np.asarray(total, dtype=np.uint32)
    weight = int(total[-1])
    if weight <= 0:
        raise ValueError("the secure sum carries no weight (no site contributed)")
    signed = total[:-1].view(np.int32).astype(np.float64)
    return (signed / (encoding.scale * weight)).astype(np.float32), weight
