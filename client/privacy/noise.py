"""Gaussian noise for DP-SGD from a cryptographically secure generator.

``torch.normal`` draws from MT19937/Philox: fast, but not cryptographically secure, and
Opacus' secure mode needs ``torchcsprng``, which has no wheels for current PyTorch. Here the
bits come from AES-128 in counter mode (``randomgen.AESCounter``, AES-NI; a NIST-style CTR
generator) keyed from ``os.urandom``, turned into normals by NumPy's ziggurat. Against
floating-point attacks on the Gaussian mechanism (Holohan & Braghin 2021, Jin et al. 2022) each
released value is the sum of four such normals divided by two - the defence Opacus'
``secure_mode`` uses.

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
from randomgen import AESCounter
from torch import Tensor


log = logging.getLogger(__name__)
_LOGGED_DEVICE_NOISE: list[bool] = []     # say once per process which generator a GPU uses


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
            key = int.from_bytes(os.urandom(16), "little")
            self._rng = np.random.Generator(AESCounter(key=key))
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
            if not _LOGGED_DEVICE_NOISE:
                _LOGGED_DEVICE_NOISE.append(True)
                log.info("DP noise on %s: device Philox re-keyed from os.urandom per draw "
                         "(not the host AES-CTR CSPRNG)", device)
            gen = torch.Generator(device=device)
            gen.manual_seed(int.from_bytes(os.urandom(8), "little"))
            z = torch.randn((4, n), generator=gen, device=device, dtype=torch.float32)
            return (z.sum(0) * (std / 2)).reshape(shape).to(dtype)
        z = self._rng.standard_normal((4, n), dtype=np.float32).sum(0) * np.float32(std / 2)
        return torch.from_numpy(z).reshape(shape).to(device=device, dtype=dtype)
