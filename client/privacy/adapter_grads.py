"""Exact per-sample gradients of ``peft``'s own adapter parameters: IA3's scaling vector and
DoRA's magnitude vector (rules for :mod:`client.privacy.persample`).

LoRA's ``lora_A``/``lora_B`` are ``nn.Linear`` and need nothing here. The other two live in
peft's layer classes, and both act on a layer's output channel by channel, so a sample's
gradient is a sum over its rows (tokens, views, declared folds) of the output gradient times
what multiplies the vector:

* **IA3** (``peft.tuners.ia3.layer.Linear``, not feed-forward): ``out = base(x) * l``, so
  ``dL/dl_j = sum_t base(x)_tj g_tj``. The vector sits in a ``ParameterDict`` (``ia3_l``),
  which has no forward of its own: the rule observes its owner, the IA3 layer, and the base
  layer's output. Feed-forward IA3 (``x * l`` before the base layer) is refused; we never build
  it (``models/foundation/lora.py``).
* **DoRA** (``peft.tuners.lora.dora.DoraLinearLayer``): its forward adds
  ``(m / n - 1) * base + (m / n) * s * B(A(x))`` to the base output, with the column norm
  ``n = ||W + s B A||`` detached (DoRA section 4.3), so ``dL/dm_j = sum_t g_tj u_tj`` with
  ``u = (base + s B(A(x))) / n``, recomputed from the forward's own inputs when the layer runs.
  Its forward also passes an identity matrix through ``lora_A``/``lora_B`` to form ``B A`` for
  ``n`` (``get_lora_weight``); that call has no gradient path and is not a batch, so the clipper
  runs it unobserved (:func:`quiet_lora_weight`).

Anything else in these classes is refused by name (:func:`missing` says why): IA3 merged,
disabled, with several or inactive adapters, or on a non-Linear layer; DoRA on a transposed
``fan_in_fan_out`` weight or on embeddings/convolutions (their subclasses); and DoRA over a
base that is not a plain ``nn.Linear`` (a quantised one: its weight is not the matrix the
forward used) - when the clipper is built (through the LoRA layer holding the magnitude) and
again when the layer runs. Several active DoRA adapters on one layer are exact as they are
(each adds its own term to the output).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .persample_checks import UnsupportedLayerError

SUPPORTED = "peft IA3 Linear (output scaling), peft DoRA magnitude (Linear)"


def _peft_types() -> tuple[type, type, type]:
    from peft.tuners.ia3.layer import IA3Layer
    from peft.tuners.ia3.layer import Linear as IA3Linear
    from peft.tuners.lora.dora import DoraLinearLayer

    return IA3Layer, IA3Linear, DoraLinearLayer


def _uses_peft(model: nn.Module) -> bool:
    return any(type(m).__module__.startswith("peft.") for m in model.modules())


def ia3_owners(model: nn.Module) -> dict[int, nn.Module]:
    """``{id(ia3_l ParameterDict): its IA3 layer}`` for every IA3 layer in ``model``."""
    if not _uses_peft(model):
        return {}
    ia3_layer = _peft_types()[0]
    return {id(m.ia3_l): m for m in model.modules() if isinstance(m, ia3_layer)}


def dora_bases(model: nn.Module) -> dict[int, nn.Module]:
    """``{id(DoRA magnitude layer): the base layer its LoRA layer adapts}``."""
    if not _uses_peft(model):
        return {}
    return {id(dora): m.get_base_layer() for m in model.modules()
            if isinstance(getattr(m, "lora_magnitude_vector", None), nn.ModuleDict)
            for dora in m.lora_magnitude_vector.values()}


def is_dora(module: nn.Module) -> bool:
    return (type(module).__module__.startswith("peft.")
            and type(module) is _peft_types()[2])     # not its Embedding/Conv subclasses


def missing(module: nn.Module, owner: nn.Module | None, base: nn.Module | None = None
            ) -> str | None:
    """Why this peft parameter holder has no exact rule here (None: it has one). ``owner``:
    the IA3 layer whose ``ia3_l`` ``module`` is (None: ``module`` is not an IA3 vector);
    ``base``: for a DoRA magnitude layer, the base layer it adapts (``dora_bases``)."""
    if owner is not None:
        if type(owner) is not _peft_types()[1]:
            return f"IA3 on {type(owner).__name__}"
        if owner.is_feedforward:
            return "IA3 scaling a feed-forward input"
        if owner.merged or len(owner.ia3_l) != 1:
            return "IA3 merged or with several adapters"
        if owner.disable_adapters or list(owner.active_adapters) != list(owner.ia3_l):
            return "IA3 disabled or its adapter inactive"   # the vector would get no gradient
        if not isinstance(owner.base_layer, nn.Linear):
            return f"IA3 on a {type(owner.base_layer).__name__} base"
        return None
    if is_dora(module):
        if module.fan_in_fan_out:
            return "DoRA on a transposed (fan_in_fan_out) weight"
        if base is not None and type(base) is not nn.Linear:
            return f"DoRA over a {type(base).__name__} base (a plain Linear only)"
        return None
    return type(module).__name__


def tokenwise(module: nn.Module, owner: nn.Module | None) -> bool:
    """Rules here act row by row, like a Linear layer (declared batch folds are regrouped)."""
    return owner is not None or is_dora(module)


def dora_factor(module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
    """What multiplies the magnitude in a DoRA forward, per row: ``(base + s B(A(x))) / n``
    (``n`` detached in peft, so this is the whole of ``d out / d m``), in >= float32 (peft
    takes ``n`` in the input's dtype: under bf16 autocast the two differ by rounding)."""
    x = args[0] if args else kwargs["x"]
    lora_a, lora_b, scaling = kwargs["lora_A"], kwargs["lora_B"], kwargs["scaling"]
    base_layer, base_result = kwargs["base_layer"], kwargs.get("base_result")
    if type(base_layer) is not nn.Linear:
        raise UnsupportedLayerError(f"no exact per-sample gradient rule for DoRA over a "
                                    f"{type(base_layer).__name__} base (a plain Linear only)")
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        xa = x.detach().to(torch.promote_types(x.dtype, torch.float32))
        weight = base_layer.weight.to(xa.dtype)
        a, b = lora_a.weight.to(xa.dtype), lora_b.weight.to(xa.dtype)
        if base_result is None:                 # peft: F.linear(x, W), no bias
            base = F.linear(xa, weight)
        else:                                   # peft: the base output less its bias
            base = base_result.detach().to(xa.dtype)
            if base_layer.bias is not None:
                base = base - base_layer.bias.to(base.dtype)
        norm = torch.linalg.norm(weight + scaling * (b @ a), dim=1)
        return (base + scaling * F.linear(F.linear(xa, a), b)) / norm


def dora_per_sample(factor: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
    """``{"weight": [B, out]}``: each sample's magnitude gradient, from the factor and the
    output gradient as ``[B, T, out]`` (a sample's rows together)."""
    return {"weight": (grad_output * factor).sum(1)}


def ia3_per_sample(base_output: Tensor, grad_output: Tensor, name: str) -> dict[str, Tensor]:
    """``{name: [B, out, 1]}`` (the vector is ``[out, 1]``): each sample's scaling gradient,
    from the base output and the output gradient as ``[B, T, out]``."""
    return {name: (grad_output * base_output).sum(1)[..., None]}


@contextlib.contextmanager
def quiet_lora_weight(dora_layers: list[nn.Module],
                      quiet: Callable[[], contextlib.AbstractContextManager]) -> Iterator[None]:
    """Inside: each of ``dora_layers`` forms ``B A`` (its identity pass through
    ``lora_A``/``lora_B``, for the detached column norm) inside ``quiet()``, where the
    clipper's hooks do not record."""
    patched = list(dora_layers)
    for m in patched:
        original = m.get_lora_weight

        def unobserved(*args, _original=original, **kwargs):
            with quiet():
                return _original(*args, **kwargs)
        m.get_lora_weight = unobserved
    try:
        yield
    finally:
        for m in patched:
            del m.get_lora_weight           # the class's method again
