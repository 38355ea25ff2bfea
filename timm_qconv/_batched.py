"""One fused call for all of a model's quantized weights, in a training forward (compiled backend).

Per layer, recomputing the quantized weight costs a handful of small framework calls on top of
the fused kernel; across a ResNet's 36 convs that fixed cost is as large as the kernels
themselves. With the ``"compiled"`` backend, :func:`attach` gives the model a forward pre-hook
that quantizes every eligible layer's weight in one compiled call (and one backward), and hands
each layer its result; a layer whose weight changed since, or that runs outside the model's own
forward, computes its weight itself as before. Results never outlive the forward that made them.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._groups import as_rows
from ._kernels import MAX_COMPILED_LEVELS, _fused_backward, _fused_forward, get_backend, scale_grad

_HANDLES = "_timm_qconv_batch_hooks"


def _forward_all(rows: list[Tensor], tables: list[Tensor]) -> list[Tensor]:
    return [_fused_forward(r, t) for r, t in zip(rows, tables)]


def _backward_all(rows: list[Tensor], tables: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    return [_fused_backward(r, t, g) for r, t, g in zip(rows, tables, grads)]


@functools.lru_cache(maxsize=None)
def _compiled_all() -> tuple[Callable[..., list[Tensor]], Callable[..., list[Tensor]]]:
    return torch.compile(_forward_all, dynamic=True), torch.compile(_backward_all, dynamic=True)


class _LookupAll(torch.autograd.Function):
    """Nearest-level lookup of many weight matrices; straight-through gradient to the weights."""

    @staticmethod
    def forward(ctx: Any, n: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.n = n
        ctx.save_for_backward(*tensors)
        return tuple(_compiled_all()[0](list(tensors[n:]), list(tensors[:n])))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        tables, rows = list(saved[: ctx.n]), list(saved[ctx.n :])
        grad_tables = [None] * ctx.n
        if any(ctx.needs_input_grad[1 : 1 + ctx.n]):  # levels frozen: nothing to reduce
            dense = [g.contiguous() if g is not None else torch.zeros_like(r) for g, r in zip(grads, rows)]
            grad_tables = _compiled_all()[1](rows, tables, dense)
        # The weights' gradients are the incoming ones, not copies, so .grad takes them as they are.
        return (None, *grad_tables, *grads)


def _eligible(module: nn.Module) -> list[nn.Module]:
    from .layers import QuantMixin

    return [m for m in module.modules()
            if isinstance(m, QuantMixin) and m.mode == "ste" and m.quantizer is not None and m.quantizer.nearest
            and m.quant_config.n_levels <= MAX_COMPILED_LEVELS]


def _prefetch(model: nn.Module, args: Any) -> None:
    if get_backend() != "compiled" or not model.training or not torch.is_grad_enabled():
        return
    layers = _eligible(model)
    if not layers:
        return
    rows, tables = [], []
    for layer in layers:
        r = as_rows(layer.weight).float()
        quantizer = layer.quantizer
        rows.append(r.contiguous())
        tables.append(scale_grad(quantizer.levels()[quantizer.group_index], quantizer.grad_scale(r)).contiguous())
    quantized = _LookupAll.apply(len(layers), *tables, *rows)
    for layer, q in zip(layers, quantized):
        layer._prefetched_weight = (q.view(layer.weight.shape).to(layer.weight.dtype), layer.weight, layer.weight._version)


def _discard(model: nn.Module, args: Any, output: Any) -> None:
    for module in model.modules():
        module.__dict__.pop("_prefetched_weight", None)


def take_prefetched(layer: nn.Module) -> Tensor | None:
    """The layer's weight from this forward's batched call, if it is still current."""
    entry = layer.__dict__.pop("_prefetched_weight", None)
    if entry is None or not layer.training:
        return None
    q, weight, version = entry
    return q if weight is layer.weight and weight._version == version else None


def attach(model: nn.Module) -> None:
    """Give ``model`` the hooks that batch its layers' weight quantization (idempotent)."""
    if _HANDLES not in model.__dict__:
        model.__dict__[_HANDLES] = (model.register_forward_pre_hook(_prefetch), model.register_forward_hook(_discard))


def detach(model: nn.Module) -> None:
    """Remove the hooks of :func:`attach`."""
    for handle in model.__dict__.pop(_HANDLES, ()):
        handle.remove()
