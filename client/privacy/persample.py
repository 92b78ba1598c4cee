"""Exact per-sample gradient clipping in one backward pass ("book-keeping", Bu et al. 2023).

DP-SGD needs ``sum_i min(1, C / ||g_i||) g_i`` where ``g_i`` is sample *i*'s gradient. Opacus'
hooks mode materialises every ``g_i`` (memory ~ batch x parameters) on top of the ordinary
backward; its ghost mode runs backward twice. Here one backward pass computes only gradients
with respect to layer *outputs*, and per layer:

* the per-sample norm comes from the captured input ``a [B, T, i]`` and output gradient
  ``g [B, T, o]`` - for a Linear layer either with the ghost-norm identity
  ``||g_i^T a_i||^2 = <a_i a_i^T, g_i g_i^T>`` (cost ~ B T^2 (i + o)) or by materialising
  ``g_i^T a_i`` (cost ~ B T i o), whichever is cheaper for that layer's shapes;
* once every norm is known, the clipped sum is one weighted matrix product per layer
  (``g^T (c * a)``, scaling the narrower factor), the same work the ordinary weight-gradient
  computation does.

Each Gram is taken while its operand is still in cache: ``a a^T`` in the forward hook, ``g g^T``
and the layer's norm in the gradient hook the moment ``g`` is produced (on the benchmark ViT
this made the norms ~20% cheaper than computing them after the backward pass).

Parameters do not require grad during this pass, so autograd never computes the unclipped
weight gradients that Opacus would throw away. Supported parameter holders: ``nn.Linear``,
``nn.LayerNorm``, ``models.vit.TokenEmbedding``, and (rules in ``models.conv_grads``)
convolutions, transposed convolutions and affine ``GroupNorm``/``InstanceNorm``: a convolution's
per-sample norm materialises its per-sample weight gradients (in chunks), its clipped sum is one
weight gradient of the clip-scaled input, as for a Linear; and (rules in
:mod:`client.privacy.adapter_grads`) ``peft``'s IA3 scaling and DoRA magnitude vectors, whose
per-sample gradients are kept like a LayerNorm's. Anything else is refused by name, so a new
layer type cannot silently escape clipping.

Every layer's input must lead with the batch (the leading dimension of the model's first
input): a layer that sees another leading dimension is refused, since its rows would be taken
for samples. With augmentation multiplicity (``capture(views=k)``, De et al. 2022) each sample
is ``k`` consecutive rows (its augmented views), and its gradient is the sum over them: a
Linear layer's rows are regrouped like a sample's tokens, every other rule's per-row gradients
are summed per sample before the norm. The one exception to rows being samples (or their
views) is declared by the model (``FoldsBatch``): token-wise Linear layers under a module type
that folds further items into the batch dimension batch-major (Swin's window attention: row
r's W windows are rows ``r*W .. (r+1)*W-1``), whose rows are regrouped per sample. These
checks, on the model and on each layer's rows, live in :mod:`client.privacy.persample_checks`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.checkpointing import recomputing
from models.conv_grads import (CONV_TYPES, NORM_TYPES, conv_clipped_sum, conv_per_sample,
                               conv_unsupported, norm_per_sample)
from models.tasks import trained_head
from models.vit import TokenEmbedding

from . import adapter_grads
from .persample_checks import FoldsBatch, UnsupportedLayerError, admitted_layers, checked_batch

__all__ = ["SUPPORTED", "FoldsBatch", "PerSampleClipper", "UnsupportedLayerError"]

SUPPORTED = ("Linear, LayerNorm, TokenEmbedding, Conv/ConvTranspose (1-3D), "
             "GroupNorm, InstanceNorm, " + adapter_grads.SUPPORTED)


def _acc(x: Tensor) -> Tensor:
    """Accumulate in at least float32 (bf16 activations under autocast), float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _flat(x: Tensor, batch: int) -> Tensor:
    """``[B*m, *, d]`` -> ``[B, T, d]`` (T = m times the product of the middle dims; m = 1
    unless each sample is several rows: its augmented views and/or, declared batch-major
    (``FoldsBatch``), the items a layer folds into the batch)."""
    return x.reshape(batch, -1, x.shape[-1])


class _Layer:
    """What one parameter-holding module saw in the current step."""

    def __init__(self, module: nn.Module, name: str, folds: bool, owner: nn.Module | None):
        self.module = module
        self.name = name or "<root>"
        self.folds = folds              # may fold further items into the batch (FoldsBatch)
        # The module whose forward is observed: the parameter holder itself, or for IA3's
        # ``ia3_l`` ParameterDict (no forward) the IA3 layer owning it.
        self.owner = owner
        self.hooked = owner if owner is not None else module
        self.tokenwise = (isinstance(module, nn.Linear)
                          or adapter_grads.tokenwise(module, owner))
        self.rule = _small_rule(module, owner)       # None: norm, then one weighted sum
        self.batch = 0                  # the step's samples, set by the forward hook
        self.views = 1                  # rows per sample before any fold (capture's views)
        # Fixed at construction: inside ``capture()`` every parameter has requires_grad off.
        self.trainable = {n: p for n, p in module.named_parameters(recurse=False)
                          if p.requires_grad}
        self.input: Tensor | None = None
        self.grad_output: Tensor | None = None
        self.per_sample: dict[str, Tensor] = {}     # small layers: per-sample grads themselves
        self.factor: Tensor | None = None           # IA3/DoRA: what multiplies the vector
        self.input_gram: Tensor | None = None       # Linear, ghost path: a a^T [B, T, T]
        self.sq_norm: Tensor | None = None          # Linear: per-sample squared norm [B]
        self.calls = 0

    def params(self) -> dict[str, nn.Parameter]:
        return self.trainable


# Per-layer rules: (layer) -> per-sample squared norm [B]; and (layer, clip factors) -> grads.
def _ghost(t: int, i: int, o: int) -> bool:
    """Ghost norm (cost ~ T^2 (i + o)) cheaper than materialising g_i^T a_i (~ T i o)?"""
    return t > 1 and t * t * (i + o) < t * i * o


def _gram(x: Tensor) -> Tensor:
    with torch.autocast(x.device.type, enabled=False):   # hooks may run inside autocast
        return torch.bmm(x, x.transpose(1, 2))


def _linear_norms(layer: _Layer) -> Tensor:
    """Called as soon as the output gradient arrives (it is then still in cache); the ghost
    path's input Gram ``a a^T`` was taken in the forward hook, while ``a`` was."""
    with torch.autocast(layer.input.device.type, enabled=False):     # norms in >= float32
        return _linear_norms_fp32(layer)


def _linear_norms_fp32(layer: _Layer) -> Tensor:
    b = layer.batch
    a, g = _acc(_flat(layer.input, b)), _acc(_flat(layer.grad_output, b))   # [B,T,i], [B,T,o]
    t, i, o = a.shape[1], a.shape[2], g.shape[2]
    sq = torch.zeros(a.shape[0], dtype=a.dtype, device=a.device)
    if "weight" not in layer.trainable:
        pass
    elif t == 1:
        sq = a.square().sum((1, 2)) * g.square().sum((1, 2))
    elif _ghost(t, i, o):
        gram = layer.input_gram if layer.input_gram is not None else _gram(a)
        sq = torch.linalg.vecdot(gram.reshape(a.shape[0], -1), _gram(g).reshape(a.shape[0], -1))
    else:
        sq = torch.bmm(g.transpose(1, 2), a).square().sum((1, 2))
    if "bias" in layer.trainable:
        sq = sq + g.sum(1).square().sum(1)
    return sq


def _linear_grads(layer: _Layer, clip: Tensor) -> dict[str, Tensor]:
    a, g = _flat(layer.input, layer.batch), _flat(layer.grad_output, layer.batch)
    c = clip.to(g.dtype)[:, None, None]
    out = {}
    if "weight" in layer.trainable:         # scale whichever factor is narrower by c_i
        if a.shape[-1] < g.shape[-1]:
            left, right = g, a * c.to(a.dtype)
        else:
            left, right = g * c, a
        out["weight"] = _acc(left.reshape(-1, g.shape[-1])).t() @ _acc(right.reshape(-1, a.shape[-1]))
    if "bias" in layer.trainable:           # sum_i c_i (sum_t g_it) without scaling g
        out["bias"] = _acc(clip.to(g.dtype)) @ _acc(g.sum(1))
    return out


def _grouped(t: Tensor, layer: _Layer) -> Tensor:
    """Per-row ``[B*k, ...]`` -> per-sample ``[B, ...]``: a sample's ``k`` consecutive rows
    (its augmented views, ``capture(views=k)``) summed; unchanged for k = 1."""
    if layer.views == 1:
        return t
    return t.reshape(layer.batch, layer.views, *t.shape[1:]).sum(1)


def _layernorm_per_sample(layer: _Layer) -> dict[str, Tensor]:
    m: nn.LayerNorm = layer.module
    b, shape = layer.input.shape[0], tuple(m.normalized_shape)
    normed = F.layer_norm(_acc(layer.input), shape, eps=m.eps).reshape(b, -1, *shape)
    g = _acc(layer.grad_output).reshape(b, -1, *shape)              # [B, T, *normalized_shape]
    return {"weight": (g * normed).sum(1), "bias": g.sum(1)}


def _token_embedding_per_sample(layer: _Layer) -> dict[str, Tensor]:
    m: TokenEmbedding = layer.module
    g = _acc(layer.grad_output)                                          # [B, 1+S*N, D]
    b, _, d = g.shape
    seq = g[:, 1:].reshape(b, m.num_sequences, -1, d).sum(2)            # [B, S, D]
    return {"cls_token": g[:, 0].reshape(b, 1, 1, d),                 # param [1, 1, D]
            "seq_embed": seq.reshape(b, 1, m.num_sequences, 1, d)}      # param [1, S, 1, D]


def _conv_norms(layer: _Layer) -> Tensor:
    """Per-sample squared norm of a convolution's trainable parameters (``conv_grads``)."""
    with torch.autocast(layer.input.device.type, enabled=False):
        a, g = _acc(layer.input), _acc(layer.grad_output)
        per_sample = conv_per_sample(layer.module, a, g)
        return sum(_grouped(per_sample[n], layer).flatten(1).square().sum(1)
                   for n in layer.trainable)


def _conv_grads(layer: _Layer, clip: Tensor) -> dict[str, Tensor]:
    rows = clip.repeat_interleave(layer.views)      # each of a sample's views: its factor
    with torch.autocast(layer.input.device.type, enabled=False):
        return conv_clipped_sum(layer.module, _acc(layer.input), _acc(layer.grad_output), rows,
                                set(layer.trainable))


def _norm_per_sample(layer: _Layer) -> dict[str, Tensor]:
    with torch.autocast(layer.input.device.type, enabled=False):
        return norm_per_sample(layer.module, _acc(layer.input), _acc(layer.grad_output))


def _rows(x: Tensor, layer: _Layer) -> Tensor:
    """``[B*m, *, d]`` -> ``[B, T, d]`` in >= float32: a sample's rows (views, declared folds,
    tokens) together, for the row-wise rules."""
    return _acc(_flat(x, layer.batch))


def _ia3_per_sample(layer: _Layer) -> dict[str, Tensor]:
    (name,) = layer.trainable
    return adapter_grads.ia3_per_sample(_rows(layer.factor, layer), _rows(layer.grad_output, layer),
                                        name)


def _dora_per_sample(layer: _Layer) -> dict[str, Tensor]:
    return adapter_grads.dora_per_sample(_rows(layer.factor, layer),
                                         _rows(layer.grad_output, layer))


_PER_SAMPLE: dict[type, Callable[[_Layer], dict[str, Tensor]]] = {
    nn.LayerNorm: _layernorm_per_sample,
    TokenEmbedding: _token_embedding_per_sample,
    **{t: _norm_per_sample for t in NORM_TYPES},
}


def _small_rule(module: nn.Module, owner: nn.Module | None
                ) -> Callable[[_Layer], dict[str, Tensor]] | None:
    """The layer's rule giving its per-sample gradients ``[B, ...]`` themselves (None: a
    Linear/convolution, norm first and one weighted sum later)."""
    if owner is not None:
        return _ia3_per_sample
    if adapter_grads.is_dora(module):
        return _dora_per_sample
    rule = _PER_SAMPLE.get(type(module))
    if rule is None:
        return None
    return lambda layer: {n: _grouped(t, layer) for n, t in rule(layer).items()}


# Layers whose per-sample norm is taken when the output gradient arrives and whose clipped
# sum is one weighted product afterwards (inputs and output gradients kept until then).
_NORM_THEN_SUM: dict[type, tuple[Callable[[_Layer], Tensor],
                                 Callable[[_Layer, Tensor], dict[str, Tensor]]]] = {
    nn.Linear: (_linear_norms, _linear_grads),
    **{t: (_conv_norms, _conv_grads) for t in CONV_TYPES},
}


def _rule_missing(module: nn.Module) -> str | None:
    """Why ``module`` (holding trainable parameters) has no exact rule here, or None."""
    if isinstance(module, nn.Linear):
        return None
    if type(module) in _NORM_THEN_SUM or type(module) in _PER_SAMPLE:
        return conv_unsupported(module) if isinstance(module, CONV_TYPES) else None
    return type(module).__name__


class PerSampleClipper:
    """Computes the per-sample-clipped gradient sum of a model in one backward pass.

    Parameters
    ----------
    model : nn.Module
        Every trainable parameter must live in a supported module type.
    max_grad_norm : float
        Clipping bound C on each sample's whole-model gradient norm.
    head_share : float, optional
        Per-group clipping: the class head's part of each sample's gradient (``model.head``)
        is clipped to ``C sqrt(head_share)`` and the rest to ``C sqrt(1 - head_share)``, so the
        whole still has norm <= C (the same sensitivity, the same noise and accounting); the
        head no longer competes with the adapters for one bound. None: one bound, C.

    Use::

        with clipper.capture():
            loss_sum = per_sample_losses.sum()
            loss_sum.backward()
        grads, norms = clipper.clipped_sum()
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, head_share: float | None = None):
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        owners = adapter_grads.ia3_owners(model)       # IA3 vector holder -> its IA3 layer
        bases = adapter_grads.dora_bases(model)        # DoRA magnitude -> the base it adapts

        def rule_missing(module: nn.Module) -> str | None:
            if id(module) in owners or adapter_grads.is_dora(module):
                return adapter_grads.missing(module, owners.get(id(module)), bases.get(id(module)))
            return _rule_missing(module)
        self.layers = [_Layer(module, name, folds, owners.get(id(module))) for name, module, folds
                       in admitted_layers(model, rule_missing, SUPPORTED)]
        self._quiet = 0                 # > 0: a forward pass the hooks must not record
        self._dora = [layer.module for layer in self.layers
                      if adapter_grads.is_dora(layer.module)]
        self._hooks: list = []
        self._batch = 0                 # this step's samples (the model's first input's
                                        # rows / views)
        self._views = 1                 # rows per sample (augmentation multiplicity)
        # Per-group bounds (index: layer is in the head): C sqrt(1 - s) and C sqrt(s), so a
        # sample's clipped gradient still has norm <= C and the noise sigma C covers it.
        self.in_head, self.bounds = _head_groups(model, self.layers, head_share,
                                                 self.max_grad_norm)

    def parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers:
            yield from layer.params().values()

    @contextlib.contextmanager
    def capture(self, views: int = 1):
        """Forward and backward inside this block record inputs and output gradients.

        ``views`` (augmentation multiplicity): the batch holds each sample's ``views``
        augmented copies as consecutive rows (sample i: rows ``i*views .. (i+1)*views-1``);
        a sample's gradient, clipped as one, is the sum of its rows' gradients (the caller
        differentiates ``sum of row losses / views`` for their mean)."""
        if isinstance(views, bool) or not isinstance(views, int) or views < 1:
            raise ValueError(f"views must be an integer >= 1, got {views!r}")
        params = list(self.parameters())
        self._batch, self._views = 0, views
        self._hooks.append(self.model.register_forward_pre_hook(self._batch_hook,
                                                                with_kwargs=True))
        for layer in self.layers:
            layer.input, layer.grad_output, layer.per_sample, layer.calls = None, None, {}, 0
            layer.input_gram = layer.sq_norm = layer.factor = None
            self._hooks.append(layer.hooked.register_forward_hook(self._forward_hook(layer),
                                                                  with_kwargs=True))
            if layer.owner is not None:     # IA3: the base output the vector scales
                self._hooks.append(layer.owner.base_layer.register_forward_hook(
                    self._base_output_hook(layer)))
        for p in params:
            p.requires_grad_(False)
        try:
            with adapter_grads.quiet_lora_weight(self._dora, self._quietly):
                yield self
        finally:
            for p in params:
                p.requires_grad_(True)
            for h in self._hooks:
                h.remove()
            self._hooks.clear()

    def _batch_hook(self, module, args, kwargs):
        first = next((x for x in (*args, *kwargs.values()) if isinstance(x, Tensor)), None)
        if first is not None and not self._batch:
            self._batch = _samples(first.shape[0], self._views)

    @contextlib.contextmanager
    def _quietly(self):
        """A forward pass inside is not the batch's (DoRA's identity pass forming B A)."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def _base_output_hook(self, layer: _Layer):
        def hook(module, inputs, output):
            if not self._quiet and not recomputing():
                layer.factor = output.detach()
        return hook

    def _forward_hook(self, layer: _Layer):
        def hook(module, inputs, kwargs, output):
            if self._quiet:
                return None
            if recomputing():   # a checkpointed block's second run, in backward: the first
                # run recorded the input and hooked the output; only the graph's shape must
                # be the same again (a root the first run made here is made again, unhooked)
                return None if output.requires_grad else output.detach().requires_grad_(True)
            layer.calls += 1
            if layer.calls > 1:     # a second use would need cross terms between the uses
                raise UnsupportedLayerError(
                    f"{type(module).__name__} is called twice in one forward pass; "
                    "shared layers are not supported by exact per-sample clipping")
            layer.input = (inputs[0] if inputs else kwargs["x"]).detach()
            self._batch = checked_batch(layer.name, module, layer.folds, layer.input.shape[0],
                                        self._batch, self._views, tokenwise=layer.tokenwise)
            layer.batch, layer.views = self._batch, self._views
            if adapter_grads.is_dora(module):
                layer.factor = adapter_grads.dora_factor(module, inputs, kwargs)
            if layer.owner is not None or adapter_grads.is_dora(module):
                layer.input = None      # row-wise rules read the factor, not the input
            if isinstance(module, nn.Linear) and "weight" in layer.trainable:
                a = _acc(_flat(layer.input, layer.batch))
                if _ghost(a.shape[1], a.shape[2], module.out_features):
                    layer.input_gram = _gram(a)
            if not output.requires_grad:    # first layer: start the graph at its output
                output = output.detach().requires_grad_(True)

            def grad_hook(grad):
                layer.grad_output = grad.detach()
                if layer.rule is not None:  # small layers: keep per-sample grads, drop the rest
                    layer.per_sample = layer.rule(layer)
                    layer.input = layer.grad_output = layer.factor = None
                else:
                    layer.sq_norm = _norm_then_sum(module)[0](layer)
                    layer.input_gram = None
            output.register_hook(grad_hook)
            return output
        return hook

    def _squared_norms(self) -> list[Tensor]:
        """Each layer's ``[B]`` per-sample squared gradient norm (after backward)."""
        out = []
        for layer in self.layers:
            if layer.per_sample:
                out.append(sum(t.reshape(t.shape[0], -1).square().sum(1)
                               for n, t in layer.per_sample.items() if n in layer.params()))
            elif layer.sq_norm is not None:
                out.append(layer.sq_norm)
            else:
                raise RuntimeError(f"{type(layer.module).__name__} got no gradient this step "
                                   "(is it unused by the loss?)")
        return out

    def per_sample_norms(self) -> Tensor:
        """``[B]`` L2 norm of each sample's whole-model gradient (after backward)."""
        return sum(self._squared_norms()).sqrt()

    def clipped_sum(self) -> tuple[dict[nn.Parameter, Tensor], Tensor]:
        """``{param: sum_i c_i g_i}`` with ``c_i = min(1, C / ||g_i||)`` and the norms ``[B]``
        (per-group clipping: each group's own ``c_i`` from its own part of ``g_i``)."""
        squared = self._squared_norms()
        norms = sum(squared).sqrt()
        if self.bounds is None:
            clip = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)      # Opacus' formula
            clips = [clip] * len(self.layers)
        else:
            group = {h: sum(sq for sq, inside in zip(squared, self.in_head) if inside == h).sqrt()
                     for h in (False, True)}
            factor = {h: (self.bounds[h] / (group[h] + 1e-6)).clamp(max=1.0) for h in group}
            clips = [factor[h] for h in self.in_head]
        grads: dict[nn.Parameter, Tensor] = {}
        for layer, clip in zip(self.layers, clips):
            params = layer.params()
            if layer.per_sample:
                parts = {n: torch.einsum("b,b...->...", clip, t).reshape(params[n].shape)
                         for n, t in layer.per_sample.items() if n in params}
            else:
                parts = _norm_then_sum(layer.module)[1](layer, clip)
            for name, value in parts.items():
                grads[params[name]] = value.to(params[name].dtype)
            layer.input = layer.grad_output = layer.sq_norm = None
            layer.per_sample = {}
        return grads, norms


def _samples(rows: int, views: int) -> int:
    """The samples in a batch of ``rows`` rows, ``views`` consecutive rows each."""
    if rows % views:
        raise ValueError(f"{rows} rows are not whole groups of {views} views per sample")
    return rows // views


def _head_groups(model: nn.Module, layers: list[_Layer], head_share: float | None,
                 max_grad_norm: float) -> tuple[list[bool], tuple[float, float] | None]:
    """Which layers belong to ``model.head``, and the two groups' bounds (None: one bound)."""
    head = trained_head(model)
    inside = {id(m) for m in head.modules()} if head is not None else set()
    in_head = [id(layer.module) in inside for layer in layers]
    if head_share is None:
        return in_head, None
    if not 0 < head_share < 1:
        raise ValueError(f"head_clip_share must be in (0, 1), got {head_share}")
    if not any(in_head) or all(in_head):
        raise ValueError("head_clip_share splits the clipping bound between the class head and "
                         "the rest, but this model trains "
                         f"{'no class head' if not any(in_head) else 'only its class head'}; "
                         "unset it")
    return in_head, (max_grad_norm * (1 - head_share) ** 0.5, max_grad_norm * head_share ** 0.5)


def _norm_then_sum(module: nn.Module):
    return _NORM_THEN_SUM[nn.Linear if isinstance(module, nn.Linear) else type(module)]
