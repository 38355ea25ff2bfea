"""The hot path of quantization-aware training: nearest-level lookup and its gradient.

``nearest_lookup(table, rows)`` rounds every weight of the ``(C, K)`` matrix ``rows`` to the
nearest entry of its row's sorted level table ``(C, L)``. Its backward gives the table the sum of
the incoming gradient over the weights that took each level; the weights get no gradient here
(the layers add the straight-through one).

Two backends compute it:

* ``"eager"`` (default): ``torch.searchsorted`` + ``gather``, codes saved for the backward.
* ``"compiled"``: the same maths through ``torch.compile``, fused into one pass over the weights
  forward and one backward, with nothing saved. On a CPU, where QAT of a small-input model is
  bound by passes over the weights, this is what brings the overhead near the cost of the conv
  itself. It compiles once per level count (about 20 s, cached on disk by PyTorch) and needs a
  C++ compiler on the CPU, Triton on the GPU; tables of more than 16 levels use eager.

Select it with :func:`set_backend` or the environment variable ``TIMM_QCONV_KERNELS``.
If the whole model is ``torch.compile``d, the eager backend is traced and fused as well.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Callable

import torch
from torch import Tensor

from ._errors import check_choice

BACKENDS = ("eager", "compiled")
MAX_COMPILED_LEVELS = 16
_backend = check_choice("TIMM_QCONV_KERNELS", os.environ.get("TIMM_QCONV_KERNELS", "eager"), BACKENDS)


def set_backend(backend: str) -> None:
    """Choose how quantized layers compute their weights: ``"eager"`` or ``"compiled"``."""
    global _backend
    _backend = check_choice("backend", backend, BACKENDS)


def get_backend() -> str:
    return _backend


def _codes(rows: Tensor, table: Tensor) -> Tensor:
    """Nearest-level codes by counting the midpoints below each weight (unrolled over L: fusable)."""
    code = torch.zeros_like(rows, dtype=torch.int64)
    for j in range(table.shape[1] - 1):
        mid = (table[:, j : j + 1] + table[:, j + 1 : j + 2]) * 0.5
        code = code + (rows > mid).to(torch.int64)
    return code


def _fused_forward(rows: Tensor, table: Tensor) -> Tensor:
    return table.gather(1, _codes(rows, table))


def _fused_backward(rows: Tensor, table: Tensor, grad: Tensor) -> Tensor:
    code = _codes(rows, table)
    sums = [torch.where(code == level, grad, 0.0).sum(1) for level in range(table.shape[1])]
    return torch.stack(sums, 1)


@functools.lru_cache(maxsize=None)
def _compiled(n_levels: int) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    # One compiled pair per level count; shapes are dynamic so every layer shares it.
    return (torch.compile(_fused_forward, dynamic=True), torch.compile(_fused_backward, dynamic=True))


def _use_compiled(table: Tensor) -> bool:
    return _backend == "compiled" and table.shape[1] <= MAX_COMPILED_LEVELS and not torch.compiler.is_compiling()


class _NearestLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, table: Tensor, rows: Tensor) -> Tensor:
        if _use_compiled(table):
            ctx.save_for_backward(table, rows)
            ctx.compiled = True
            return _compiled(table.shape[1])[0](rows, table)
        mids = ((table[:, 1:] + table[:, :-1]) * 0.5).contiguous()
        codes = torch.searchsorted(mids, rows)
        ctx.save_for_backward(table, codes)
        ctx.compiled = False
        return table.gather(1, codes)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        table, saved = ctx.saved_tensors
        grad = grad.contiguous()
        if ctx.compiled:
            return _compiled(table.shape[1])[1](saved, table, grad), None
        return torch.zeros_like(table).scatter_add_(1, saved, grad), None


def nearest_lookup(table: Tensor, rows: Tensor) -> Tensor:
    """Round each weight of ``rows`` (C, K) to the nearest level of its row of ``table`` (C, L, sorted).

    Differentiable in ``table`` only. Ties go to the lower level, as ``torch.searchsorted``.
    """
    rows = rows.detach().contiguous()
    table = table.contiguous()
    if not (table.requires_grad and torch.is_grad_enabled()) and not _use_compiled(table):
        mids = ((table[:, 1:] + table[:, :-1]) * 0.5).contiguous()
        return table.gather(1, torch.searchsorted(mids, rows))
    return _NearestLookup.apply(table, rows)
