"""Gaussian noise for DP-SGD from a cryptographically secure generator.

``torch.normal`` draws from MT19937/Philox: fast, but not cryptographically secure, and
Opacus' secure mode needs ``torchcsprng``, which has no wheels for current PyTorch. Here the
bits come from AES-128 in counter mode (``cryptography``, AES-NI; a NIST SP 800-90A-style CTR
keystream) keyed from ``os.urandom``, and become normals by the Box-Muller transform on 24-bit
float32 uniforms - what ``torch.normal`` itself does on the CPU, so this is Opacus' secure mode
with the CSPRNG it asks for. Against floating-point attacks on the Gaussian mechanism (Holohan &
Braghin 2021, Jin et al. 2022) each released value is the sum of four independent normals
divided by two, summed in float32 one normal at a time - the defence Opacus' ``secure_mode``
uses.

The transform runs piece by piece (``_PIECE`` values, cache-resident) with NumPy's SIMD
``log``/``sqrt``/``sin``/``cos`` into preallocated buffers: 4 normals per released value cost
~1.9 ns on one core, against ~9 ns for NumPy's ziggurat on an AES-CTR bit generator (which
made the secure noise ~17% of a DP step on the benchmark ViT; ``bench/dp_overhead``).
Box-Muller on 24-bit uniforms bounds each normal at ``sqrt(2 ln 2^24)`` = 5.77 sd (reached with
probability 2^-24 per draw), as in ``torch.normal``; the four-normal sum reaches 11.5 sd.

On a CUDA device the host generator is the bottleneck (drawing 4 x 5M normals on the CPU and
copying them made a DP step 29x slower than a non-DP step on an H200), so there the normals
come from the GPU's Philox generator, re-keyed for every draw with 64 bits from
``os.urandom``: the keys are unpredictable, but Philox is not a vetted CSPRNG. The four-normal
sum is kept. A site that needs the host CSPRNG on a GPU can train on CPU.

``secure=False`` (tests and benchmarks that must be reproducible) draws from a seeded
``torch.Generator`` instead.
"""

from __future__ import annotations

import logging
import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from torch import Tensor


log = logging.getLogger(__name__)
_LOGGED_DEVICE_NOISE: list[bool] = []     # say once per process which generator a GPU uses

_PIECE = 8192                              # released values per piece: 4 x 32 KiB of words
_TWO_PI_24 = np.float32(2 * math.pi * 2.0 ** -24)
_UNIT_24 = np.float32(2.0 ** -24)


class _SecureNormals:
    """Sums of four Box-Muller normals from an AES-128-CTR keystream, written into arrays."""

    def __init__(self, key: bytes, nonce: bytes):
        self._aes = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
        self._zeros = memoryview(bytes(16 * _PIECE))
        self._raw = bytearray(16 * _PIECE + 15)          # update_into wants a block of slack
        self._words = np.frombuffer(self._raw, np.uint32, 4 * _PIECE)
        self._bits = np.empty((4, _PIECE), np.uint32)
        self._u = np.empty((4, _PIECE), np.float32)
        self._sum = np.empty(_PIECE, np.float32)
        self._term = np.empty(_PIECE, np.float32)

    def fill(self, out: np.ndarray, scale: float, *, add: bool = False) -> None:
        """``out[i] (+)= scale * (z1 + z2 + z3 + z4) / 2`` for fresh standard normals z."""
        half = np.float32(scale / 2)
        for start in range(0, out.size, _PIECE):
            k = min(_PIECE, out.size - start)
            self._aes.update_into(self._zeros[:16 * k], self._raw)
            np.right_shift(self._words[:4 * k].reshape(4, k), 8, out=self._bits[:, :k])
            u = self._u[:, :k]
            u[...] = self._bits[:, :k]                   # 24-bit integers, exact in float32
            radius, angle = u[0::2], u[1::2]             # two Box-Muller pairs per value
            radius += 1                                  # (0, 1]: log never sees 0
            radius *= _UNIT_24
            np.log(radius, out=radius)
            radius *= -2
            np.sqrt(radius, out=radius)
            angle *= _TWO_PI_24
            total, term = self._sum[:k], self._term[:k]
            np.cos(angle[0], out=total)
            total *= radius[0]
            for trig, pair in ((np.sin, 0), (np.cos, 1), (np.sin, 1)):
                trig(angle[pair], out=term)
                term *= radius[pair]
                total += term
            total *= half
            if add:
                out[start:start + k] += total
            else:
                out[start:start + k] = total


class GaussianNoise:
    """Source of N(0, std^2) noise tensors.

    Parameters
    ----------
    secure : bool
        AES-CTR CSPRNG keyed from ``os.urandom`` (default); False: seeded ``torch.Generator``.
    seed : int
        Only for ``secure=False``.
    """

    def __init__(self, *, secure: bool = True, seed: int = 0):
        self.secure = secure
        if secure:
            self._normals = _SecureNormals(os.urandom(16), os.urandom(16))
        else:
            self._generator = torch.Generator().manual_seed(seed)

    def sample(self, shape: torch.Size | tuple[int, ...], std: float,
               device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Tensor:
        """A tensor of the given shape with i.i.d. N(0, std^2) entries."""
        n = math.prod(shape)
        if std == 0 or n == 0:
            return torch.zeros(shape, device=device, dtype=dtype)
        if not self.secure:
            return (torch.randn(n, generator=self._generator) * std) \
                .reshape(shape).to(device=device, dtype=dtype)
        if torch.device(device).type == "cuda":
            return self._device_sample(n, std, torch.device(device)).reshape(shape).to(dtype)
        z = np.empty(n, np.float32)
        self._normals.fill(z, std)
        return torch.from_numpy(z).reshape(shape).to(device=device, dtype=dtype)

    def add_(self, target: Tensor, std: float) -> Tensor:
        """``target += N(0, std^2)`` noise in place (no full-size temporary on the CPU path)."""
        if std == 0 or target.numel() == 0:
            return target
        if (self.secure and target.device.type == "cpu" and target.dtype == torch.float32
                and target.is_contiguous()):
            self._normals.fill(target.detach().view(-1).numpy(), std, add=True)
            return target
        return target.add_(self.sample(target.shape, std, device=target.device,
                                       dtype=target.dtype))

    @staticmethod
    def _device_sample(n: int, std: float, device: torch.device) -> Tensor:
        if not _LOGGED_DEVICE_NOISE:
            _LOGGED_DEVICE_NOISE.append(True)
            log.info("DP noise on %s: device Philox re-keyed from os.urandom per draw "
                     "(not the host AES-CTR CSPRNG)", device)
        gen = torch.Generator(device=device)
        gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
        z = torch.randn((4, n), generator=gen, device=device, dtype=torch.float32)
        return z.sum(0) * (std / 2)


MAX_SPLIT = 16                             # Skellam draws per value a site accepts


class SkellamNoise:
    """Integer ``Skellam(variance)`` noise: ``Poisson(variance / 2) - Poisson(variance / 2)``,
    the share a site adds before masking (``protocol.skellam``).

    The Poisson draws come from NumPy's Generator on an AES-128-CTR bit generator keyed from
    ``os.urandom`` (PTRS transformed rejection, Hoermann 1993, for the large means used here:
    exact up to float64 rounding of its acceptance test). ``key`` (16 bytes, secret): the
    stream of that AES key, so a site can redraw a round's share bit for bit. ``secure=False``:
    a seeded PCG64 (tests and benchmarks that must be reproducible).
    """

    def __init__(self, *, secure: bool = True, seed: int = 0, key: bytes | None = None):
        if secure:
            from randomgen import AESCounter
            key = key or os.urandom(16)        # a given key: the same stream again (replays)
            self._rng = np.random.Generator(AESCounter(key=int.from_bytes(key, "little")))
        else:
            self._rng = np.random.default_rng(seed)

    def sample(self, variance: float, n: int) -> np.ndarray:
        """``n`` i.i.d. Skellam values (int64) of the given variance: one draw pair when the
        Poisson means stay <= ``POISSON_EXACT_MAX``, else the exact sum of ``k`` smaller
        Skellams (Skellams add), refused beyond ``MAX_SPLIT`` (an encoding that fine is a
        misconfigured - or hostile - server's, and would cost the site k-fold)."""
        from protocol.skellam import POISSON_EXACT_MAX

        if not variance > 0:
            raise ValueError(f"Skellam variance must be > 0, got {variance}")
        k = math.ceil(variance / (2 * POISSON_EXACT_MAX))
        if k > MAX_SPLIT:
            raise ValueError(f"a Skellam share of variance {variance:.3g} needs {k} draws per "
                             f"value (> {MAX_SPLIT}): the encoding's scale is too fine for "
                             "exact noise; refusing")
        half = variance / (2 * k)
        out = self._rng.poisson(half, n) - self._rng.poisson(half, n)
        for _ in range(k - 1):
            out += self._rng.poisson(half, n) - self._rng.poisson(half, n)
        return out
