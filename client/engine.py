"""The one training engine: device, autocast, optimizer, loop and evaluation, written once.

Tasks and objectives (``models.tasks``) supply ``step`` and ``evaluator()``; everything that
differs per deployment (CUDA vs CPU, bf16 autocast, threads) is decided here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from models.metrics import SplitMetrics
from models.tasks import trained_head
from protocol.job import TrainConfig

from .privacy.dpsgd import DPSGDConfig, PrivateGradients, poisson_batches, steps_per_epoch

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an explicit ``cuda`` without a GPU fails."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device=cuda requested but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on CPU (bf16 matmuls are slow on most CPUs)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def param_groups(model: nn.Module, trainable: list[nn.Parameter], config: TrainConfig
                 ) -> list[dict]:
    """The optimizer's parameter groups: one at ``lr``, or with ``config.head_lr`` the class
    head's trainable parameters (``model.head``) at that rate and the rest at ``lr``.

    Raises
    ------
    ValueError
        ``head_lr`` is set but the model has no class head that trains here.
    """
    if config.head_lr is None:
        return [{"params": trainable}]
    head = trained_head(model)
    if head is None:
        raise ValueError(f"train.head_lr is set but this {type(model).__name__} has no class "
                         "head that trains here; unset train.head_lr")
    own = {id(p) for p in head.parameters() if p.requires_grad}
    rest = [p for p in trainable if id(p) not in own]
    groups = [{"params": [p for p in trainable if id(p) in own], "lr": config.head_lr}]
    return groups + ([{"params": rest}] if rest else [])


@contextlib.contextmanager
def head_alone(model: nn.Module, on: bool = True):
    """With ``on``: only the class head's parameters train inside the block (every other
    trainable parameter frozen, and trainable again after it) - a head-only round of
    ``train.head_only_rounds``. The frozen ones get no gradient, so DP-SGD neither clips nor
    noises them and the round returns them exactly as received.

    Raises
    ------
    ValueError
        ``on`` and the model has no class head that trains here.
    """
    if not on:
        yield
        return
    head = trained_head(model)
    if head is None:
        raise ValueError(f"train.head_only_rounds is set but this {type(model).__name__} has "
                         "no class head that trains here; unset train.head_only_rounds")
    own = {id(p) for p in head.parameters()}
    paused = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
    for p in paused:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in paused:
            p.requires_grad_(True)


class Engine:
    """Runs a task's steps over data on one device.

    Parameters
    ----------
    task : object
        Provides ``step(model, batch) -> StepOutput`` and ``evaluator() -> Evaluator``.
    device : torch.device
    """

    def __init__(self, task, device: torch.device):
        self.task = task
        self.device = device

    def fit(self, model: nn.Module, data: Dataset, config: TrainConfig,
            privacy: DPSGDConfig | None = None,
            extra_gradients: Callable[[], dict] | None = None) -> dict[str, float]:
        """Train in place; returns mean loss/metrics, steps and seconds.

        Without ``privacy``: ``local_epochs`` shuffled passes. With it: DP-SGD, i.e.
        ``local_epochs * int(1/q)`` Poisson-sampled steps (the audit's ``privacy.steps``:
        exactly that many), per-sample clipping and noise;
        with its ``augmentation_multiplicity`` k each drawn sample is read k times (k
        augmented views, consecutive rows, averaged before clipping).
        ``extra_gradients`` (the privacy audit's canaries only, needs ``privacy``) is called
        once per step for further per-sample gradients of norm <= C added before the noise.
        ``config.head_only``: only the class head trains (``head_alone``); per-group clipping
        then has nothing to split, so the head's gradient gets the whole bound C.
        """
        if extra_gradients is not None and privacy is None:
            raise ValueError("extra_gradients (audit canaries) only make sense with DP-SGD")
        if len(data) == 0:
            raise ValueError("no training samples at this site")
        start = time.perf_counter()
        # A data layout probe, not a task one: a StudyDataset knows its labels without loading
        # images; a plain list or ConcatDataset (tests, benchmarks) does not.
        if hasattr(data, "labels"):
            self.task.set_label_prior(data.labels)   # logit adjustment: this site's label counts
        model.to(self.device).eval()
        with torch.no_grad(), autocast(self.device):    # e.g. pseudo-labels, received model
            data = self.task.training_data(model, data, config.batch_size)
        model.train()
        if config.head_only and privacy is not None and privacy.head_clip_share is not None:
            privacy = dataclasses.replace(privacy, head_clip_share=None)   # the head has all of C
        with head_alone(model, config.head_only):
            totals, seen, steps = self._loop(model, data, config, privacy, extra_gradients)
        metrics = {f"train_{k}": v / max(seen, 1) for k, v in totals.items()}
        return metrics | {"steps": float(steps), "seconds": time.perf_counter() - start}

    def _loop(self, model: nn.Module, data: Dataset, config: TrainConfig,
              privacy: DPSGDConfig | None, extra_gradients: Callable[[], dict] | None
              ) -> tuple[dict[str, float], int, int]:
        """The steps of one ``fit`` over the parameters that train now: the loss/metric sums
        weighted by samples, the samples seen and the steps taken."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(param_groups(model, trainable, config), lr=config.lr,
                                      weight_decay=config.weight_decay)
        anchor = [p.detach().clone() for p in trainable] if config.proximal_mu else None
        if privacy is None:
            generator = torch.Generator().manual_seed(config.seed)
            loader = DataLoader(data, batch_size=config.batch_size, shuffle=True,
                                generator=generator)
            batches = (batch for _ in range(config.local_epochs) for batch in loader)
            private = None
        else:
            # A Poisson batch holds q*n studies on average, any number in the worst case, and
            # q is the coordinator's: it runs in physical chunks of at most batch_size studies
            # (x views rows), what the site's size check counted; their clipped sums add up.
            steps = privacy.steps or config.local_epochs * steps_per_epoch(privacy.sample_rate)
            views = range(privacy.augmentation_multiplicity)
            size = config.batch_size        # balanced: 17 drawn at 16 run as 9 + 8, not 16 + 1
            batches = ([default_collate([data[int(i)] for i in chunk for _ in views])
                        for chunk in (np.array_split(idx, -(-len(idx) // size))
                                      if len(idx) else ())]
                       for idx in poisson_batches(len(data), privacy.sample_rate, steps,
                                                  secure=privacy.secure_mode, seed=config.seed))
            private = PrivateGradients(model, privacy, privacy.sample_rate * len(data))
        totals: dict[str, float] = {}
        seen, steps = 0, 0
        for batch in batches:
            optimizer.zero_grad(set_to_none=True)
            extra = extra_gradients() if extra_gradients is not None else None
            out = self._backward(model, batch, private, extra)
            if anchor is not None:      # FedProx: gradient of (mu/2)||w - w_global||^2
                for p, a in zip(trainable, anchor):
                    p.grad.add_(p.detach() - a, alpha=config.proximal_mu)
            optimizer.step()
            self.task.after_step(model)             # e.g. DINO's EMA teacher; no-op by default
            steps += 1
            if out is not None:
                seen += out.n
                for key, value in {"loss": out.loss.item(), **out.metrics}.items():
                    totals[key] = totals.get(key, 0.0) + value * out.n
        return totals, seen, steps

    def _backward(self, model: nn.Module, batch: dict | list[dict],
                  private: PrivateGradients | None, extra: dict | None = None):
        """Fill ``p.grad`` for one batch; DP-SGD privatises it, its Poisson batch given as
        chunks (none: an empty batch still takes a noise-only step, as the accountant
        assumes)."""
        def loss_fn(chunk):
            with autocast(self.device):
                return self.task.step(model, _to(chunk, self.device))
        if private is not None:
            return private.backward([functools.partial(loss_fn, c) for c in batch], extra=extra)
        out = loss_fn(batch)
        out.loss.backward()
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Dataset, batch_size: int = 64) -> SplitMetrics:
        """The task's metrics over the whole dataset (``task.evaluator()`` fed batch by batch,
        computed once at the end), with the wall time in ``seconds``."""
        if len(data) == 0:
            raise ValueError("no evaluation samples at this site")
        start = time.perf_counter()
        model.to(self.device).eval()
        evaluator = self.task.evaluator()
        for batch in DataLoader(data, batch_size=batch_size):
            with autocast(self.device):
                evaluator.update(model, _to(batch, self.device))
        return dataclasses.replace(evaluator.compute(), seconds=time.perf_counter() - start)
