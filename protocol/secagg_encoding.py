"""Fixed-point encoding of model deltas for secure aggregation over Z_(2^32).

A site masks its *delta* from the round's global weights, not the weights themselves (deltas
are small, so a fixed range loses little). Each value is clipped to ``[-clip_range,
clip_range]`` - and every clipped value is counted, never silently - scaled, stochastically
rounded (unbiased to 2^-16 of a unit; the coin flips come from an AES-CTR stream keyed from
``os.urandom``),
multiplied by the site's integer weight (its example count, capped) and reduced mod 2^32. The weight itself rides along as the first element, so the weighted average
is computed entirely inside the secure sum. The scale is chosen so that the sum of
``max_sites`` sites at the extremes cannot overflow the signed 32-bit range; transport is
uint32, the same bytes as float32.

``encode`` works piece by piece (``CHUNK`` values, cache-resident) and adds the site's masks
to each piece before moving on, so the whole masked input costs one pass over memory.

Distributed DP (``protocol.skellam``): with a ``NoiseShare`` the site first clips the whole
delta to L2 norm ``clip_norm`` (the sensitivity the noise is calibrated to, from the same
number), rounds it as above with weight 1, and adds its integer Skellam share to every value
slot *before* the masks, so the server only ever unmasks a noisy sum. ``noisy_encoding``
gives the encoding the headroom bits that noise needs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .secagg_crypto import CHUNK, MaskSum, Words, keystream
from .skellam import NoiseShare, exact_scale, noise_headroom_sites

MODULUS_BITS = 32
_HALF = 1 << (MODULUS_BITS - 1)
_FLOAT32_EXACT = 1 << 24            # integers float32 holds exactly (encode works in float32)
# Slots before the values: the site's weight, how many of its values the encoding clipped, and
# whether its example count was capped (0/1). They are masked and summed like the values, so
# the server reads only their totals over the sites (never one site's count: a coordinator
# choosing a small clip_range would learn how many of a site's update values exceed it).
HEADER = 3


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


class _Pieces:
    """Encodes consecutive pieces of one delta; reuses its buffers across pieces."""

    def __init__(self, encoding: Encoding, weight: int, rounding_seed: bytes):
        self.clip = np.float32(encoding.clip_range)
        self.scale = np.float32(encoding.scale)
        self.weight = np.int32(weight)
        self.clipped = 0
        self._coins = keystream(rounding_seed)
        self._words = Words()
        self._y, self._low = (np.empty(CHUNK, np.float32) for _ in range(2))
        self._flags = np.empty(CHUNK, bool)

    def into(self, x: np.ndarray, out: np.ndarray) -> None:
        """float32 piece ``x`` -> int32 view ``out`` (same length)."""
        n = x.size
        y, low, flags = self._y[:n], self._low[:n], self._flags[:n]
        # two reductions decide whether the piece needs clipping at all (a NaN fails both
        # comparisons and takes the checked path); most pieces of a delta do not
        if np.min(x) >= -self.clip and np.max(x) <= self.clip:
            np.multiply(x, self.scale, out=y)
        else:
            np.clip(x, -self.clip, self.clip, out=y)
            self.clipped += n - int(np.count_nonzero(np.equal(x, y, out=flags)))
            if np.isnan(np.min(y)):
                raise ValueError("the update holds NaN; a site never sends it into the sum")
            y *= self.scale
        np.floor(y, out=low)
        y -= low                                                  # fraction f in [0, 1)
        y *= np.float32(2.0 ** 16)                                # exact: a power of two
        # 16 random bits per value: c uniform on {0, ..., 2^16 - 1}, so c < f 2^16 with
        # probability ceil(f 2^16) / 2^16 - the fraction itself, up to 2^-16 of a unit
        # (4e-11 in model units at the default scale)
        coins = self._words.next(self._coins, (n + 1) // 2).view(np.uint16)[:n]
        np.less(coins, y, out=flags)
        np.copyto(out, low, casting="unsafe")                     # exact: integers < 2^24
        np.add(out, flags, out=out)                               # round up
        out *= self.weight                                         # |value x weight| < 2^31


def noisy_encoding(*, clip_range: float, max_sites: int, share: NoiseShare) -> Encoding:
    """The encoding of a distributed-DP round: unit weights, room for ``max_sites`` updates
    plus the noise of ``max_sites`` shares (``protocol.skellam`` states the bound), and a
    scale no finer than a single exact Poisson draw per value allows (``exact_scale``)."""
    if clip_range < share.clip_norm:
        raise ValueError(f"clip_range {clip_range:g} < clip_norm {share.clip_norm:g}: the "
                         "encoding would clip values of a norm-clipped update")
    # summands that bring the scale down to exact_scale: ((2^31 - 1) / M - 1) / r <= s
    coarse = math.ceil((_HALF - 1) / (exact_scale(share) * clip_range + 1))

    def summands(h: int) -> int:
        return max(max_sites + h, coarse)

    headroom = noise_headroom_sites(
        noise_multiplier=share.noise_multiplier, clip_norm=share.clip_norm,
        clip_range=clip_range, max_sites=max_sites, min_contributors=share.min_contributors,
        scale_for=lambda h: Encoding(clip_range=clip_range, max_sites=summands(h),
                                     max_weight=1).scale)
    return Encoding(clip_range=clip_range, max_sites=summands(headroom), max_weight=1)


def clip_l2(x: np.ndarray, clip_norm: float) -> np.ndarray:
    """``x`` scaled down to L2 norm ``clip_norm`` if longer (a copy only then)."""
    # accumulated in float64 through NumPy's small cast buffers: no float64 copy of the
    # update (float32 accumulation is off by ~1e-5 relative at 10^7 values: too loose for
    # the sensitivity the noise is calibrated to)
    norm = float(np.sqrt(np.einsum("i,i->", x, x, dtype=np.float64)))
    if not math.isfinite(norm):
        raise ValueError("the update holds NaN or inf; a site never sends it into the sum")
    return x if norm <= clip_norm else x * np.float32(clip_norm / norm * (1 - 1e-6))


def encode(delta: np.ndarray, num_examples: int, encoding: Encoding, *,
           masks: list[tuple[bytes, int]] = (), rounding_seed: bytes | None = None,
           noise: NoiseShare | None = None,
           sampler: Callable[[float, int], np.ndarray] | None = None
           ) -> tuple[np.ndarray, int]:
    """Flat float delta -> (uint32 vector of ``HEADER`` + len, number of clipped values), with
    ``sum(sign * PRG(seed))`` over ``masks`` already added (mod 2^32).

    The first ``HEADER`` elements carry the site's weight, its count of clipped values (at
    most ``(2^31 - 1) / max_sites``, so that the sum cannot wrap) and whether its example
    count was capped at ``max_weight``, masked like the values. float32 throughout:
    |value x scale| stays below 2^31 / max_sites, and float32 keeps the rounding fraction to
    better than 1e-3 up to values of ~10^4 units (a delta of ~0.007 at the default scale),
    exact below that.
    ``rounding_seed`` (32 bytes) makes the rounding reproducible (tests only).
    ``noise``: distributed DP - clip to L2 ``noise.clip_norm``, weight 1, and add
    ``sampler(variance, n)`` (int64 Skellam values, the site's CSPRNG) with the share's
    variance at this encoding's scale and this delta's size.
    """
    x = np.asarray(delta, dtype=np.float32).ravel()
    weight = encoding.weight_of(num_examples)
    capped = int(int(num_examples) > encoding.max_weight)
    variance = 0.0
    if noise is not None:
        if sampler is None:
            raise ValueError("a noise share needs its sampler")
        x = clip_l2(x, noise.clip_norm)
        weight, capped = 1, 0                   # the noise is calibrated to one vote per site
        variance = noise.variance(scale=encoding.scale, dim=max(x.size, 1))
    pieces = _Pieces(encoding, weight, rounding_seed or os.urandom(32))
    mask = MaskSum(list(masks))
    out = np.empty(x.size + HEADER, dtype=np.uint32)
    out[:HEADER] = (weight, 0, capped)
    for start in range(0, out.size, CHUNK):
        part = out[start:start + CHUNK]
        first = max(start, HEADER)              # the first value slot in this piece
        if first < start + part.size:
            values = part[first - start:]
            pieces.into(x[first - HEADER:start + part.size - HEADER], values.view(np.int32))
            if variance:                        # int64 noise, reduced mod 2^32, before masks
                drawn = sampler(variance, values.size)
                np.add(values, (drawn & 0xFFFFFFFF).astype(np.uint32), out=values)
        mask.add_to(part)
    # known once every piece is encoded; the masks are additive mod 2^32, so it joins its
    # already masked slot
    np.add(out[1:2], np.uint32(min(pieces.clipped, (_HALF - 1) // encoding.max_sites)),
           out=out[1:2])
    return out, pieces.clipped


def read_header(header: np.ndarray) -> tuple[int, int, int]:
    """``(weight, clipped values, capped sites)`` summed over the sites, read from a secure
    sum's first ``HEADER`` elements."""
    weight = int(header[0])
    if not 0 < weight < _HALF:
        raise ValueError("the secure sum carries no valid weight (no site contributed, or the "
                         "masks did not cancel)")
    return weight, int(header[1]), int(header[2])


def decode_into(values: np.ndarray, weight: int, encoding: Encoding, out: np.ndarray) -> None:
    """Summed uint32 values (any piece of a sum, header excluded) -> their weighted
    average in ``out`` (float32): computed in float64, rounded once, in NumPy's small cast
    buffers (no float64 temporary)."""
    np.divide(values.view(np.int32), encoding.scale * weight, out=out, casting="same_kind")


def decode(total: np.ndarray, encoding: Encoding) -> tuple[np.ndarray, int]:
    """Sum of encoded vectors (mod 2^32) -> (weighted average delta float32, total weight)."""
    total = np.asarray(total, dtype=np.uint32)
    weight, _, _ = read_header(total[:HEADER])
    average = np.empty(total.size - HEADER, dtype=np.float32)
    decode_into(total[HEADER:], weight, encoding, average)
    return average, weight
