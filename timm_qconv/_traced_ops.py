"""The CPU lookup kernels as PyTorch custom operators, for models the user compiles.

``torch.compile`` cannot trace into Numba, so inside a compiled model the quantizers used to be
traced in their PyTorch formulation (comparisons, ``gather``, ``scatter_add``): Inductor's code
for it made a resnet34 training step at 2 bits 1.58x the compiled float step on a 2-core CPU,
after about a minute of compiling. As custom operators (``torch.library.custom_op``), the
kernels of :mod:`timm_qconv._native` are opaque to the compiler: the traced graph calls them as
they are, with their gradient registered here (``register_autograd``) and their output shapes
(``register_fake``) for tracing.

:func:`timm_qconv._kernels.lookup_codes` calls :func:`lookup` in traced code for float32 CPU
weights with up to 256 levels; GPUs keep the traced formulation, which the compiler fuses. The
operators run the Numba kernels, or where Numba does not import, the same maths in PyTorch.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


@torch.library.custom_op("timm_qconv::lookup", mutates_args=(), device_types="cpu")
def lookup(thresholds: Tensor, groups: Tensor, table: Tensor, rows: Tensor, ste: bool, grad_scale: float,
           with_error: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(q, codes, error)`` for the ``(C, K)`` float32 ``rows``: the code of each weight is the
    number of thresholds below it in row ``groups[c]`` of ``thresholds`` (G, T), ``q`` its level in
    the same row of ``table`` (G, T + 1), ``error`` the 0-d ``sum((q - rows)**2)`` (zero, with no
    gradient, unless ``with_error``). ``ste`` and ``grad_scale`` are read by the backward only
    (see ``_Lookup``)."""
    from . import _kernels  # here, not above: _kernels imports this module

    native = _kernels._native_module()
    if native is not None:
        q, codes, error, _ = native.lookup_forward(thresholds.contiguous(), groups, table.contiguous(),
                                                rows.contiguous(), with_error)
    else:
        q, codes, error = _kernels._torch_lookup(table, thresholds, groups, rows, with_error)
    return q, codes, (error if error is not None else rows.new_zeros(()))


@lookup.register_fake
def _(thresholds: Tensor, groups: Tensor, table: Tensor, rows: Tensor, ste: bool, grad_scale: float,
      with_error: bool) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(rows), torch.empty_like(rows, dtype=torch.uint8), rows.new_empty(())


@torch.library.custom_op("timm_qconv::lookup_backward", mutates_args=(), device_types="cpu")
def lookup_backward(codes: Tensor, groups: Tensor, table: Tensor, rows: Tensor, grad: Tensor, error_grad: Tensor,
                    grad_scale: float) -> Tensor:
    """Gradient of ``table`` (G, L): per level of each group, the sum over the weights of that code
    in the group's rows of ``grad * grad_scale + 2 * error_grad * (level - weight)``."""
    from . import _kernels

    native = _kernels._native_module()
    if native is not None:
        return native.lookup_backward(codes.contiguous(), groups, table.contiguous(), rows.contiguous(),
                                      grad.contiguous(), float(error_grad) * 2.0 / grad_scale, grad_scale)
    return _kernels._torch_level_grad(codes, table, groups, rows, grad, error_grad * (2.0 / grad_scale), grad_scale)


@lookup_backward.register_fake
def _(codes: Tensor, groups: Tensor, table: Tensor, rows: Tensor, grad: Tensor, error_grad: Tensor,
      grad_scale: float) -> Tensor:
    return torch.empty_like(table)


def _setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    _, groups, table, rows, ste, grad_scale, with_error = inputs
    _, codes, _ = output
    ctx.ste, ctx.grad_scale, ctx.with_error = ste, grad_scale, with_error
    ctx.save_for_backward(groups, table, codes, rows)


def _backward(ctx: Any, grad: Tensor | None, grad_codes: Any, grad_error: Tensor | None) -> tuple:
    groups, table, codes, rows = ctx.saved_tensors
    grad_table = None
    if ctx.needs_input_grad[2]:
        dense = grad if grad is not None else torch.zeros_like(rows)
        error_grad = grad_error if grad_error is not None and ctx.with_error else rows.new_zeros(())
        grad_table = lookup_backward(codes, groups, table, rows, dense, error_grad, ctx.grad_scale)
    return None, None, grad_table, (grad if ctx.ste else None), None, None, None


lookup.register_autograd(_backward, setup_context=_setup_context)
