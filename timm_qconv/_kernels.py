"""The hot path of quantization-aware training: nearest-level lookup and its gradient.

``nearest_lookup(table, rows)`` rounds every weight of the ``(C, K)`` matrix ``rows`` to the
nearest entry of its row's sorted level table ``(C, L)``. Its backward gives the table the sum of
the incoming gradient over the weights that took each level; the weights get no gradient here
(the layers add the straight-through one).

Backends:

* ``"eager"`` (default): ``torch.searchsorted`` + ``gather``, codes saved for the backward (one
  byte each) and reused by the hash loss.
* ``"compiled"``: the same maths through ``torch.compile``, fused into one pass over the weights
  forward and one backward, with nothing saved. On a CPU, where QAT of a small-input model is
  bound by passes over the weights, this is what brings the overhead near the cost of a copy of
  the weights. It needs a C++ compiler on the CPU, Triton on the GPU; tables of more than 16
  levels use eager.
* ``"auto"``: ``"compiled"`` for what :mod:`timm_qconv._batched` does for a converted
  model in training (all layers' weights in one call, the hash loss in one more), for up to 8
  levels (3 bits) and once a probe has shown that ``torch.compile`` works on the device;
  ``"eager"`` for the rest (single layers, eval, 4 bits and more), which then never waits for a
  compiler. Compiling takes about a minute once per model at 2-3 bits and several minutes at 4
  bits (cached on disk by PyTorch), which is why ``"auto"`` stops at 3 bits.

The backend in force is, from the innermost: the one of :func:`use_backend` (a ``with`` block;
a quantized layer converted for a backend runs its kernels under it), else the process default
of :func:`set_backend`, else the environment variable ``TIMM_QCONV_KERNELS`` (read when first
needed, so that a bad value fails there with a clear message, not at ``import timm_qconv``),
else ``"eager"``. The batched path that "auto" and "compiled" use has limits the eager one has
not (see :mod:`timm_qconv._batched`), which is why it is not the default.
Inside a ``torch.compile``d model the eager formulation is traced and fused with the model.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ._errors import check_choice
from ._groups import midpoints

BACKENDS = ("auto", "eager", "compiled")
MAX_COMPILED_LEVELS = 16
#: "auto" compiles for up to 3 bits: for resnet34 that takes about a minute, 4 bits several.
AUTO_MAX_LEVELS = 8
ENV_VAR = "TIMM_QCONV_KERNELS"
_default: str | None = None  # set_backend's choice; None: the environment variable, else "eager"
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("timm_qconv_kernels", default=None)


def set_backend(backend: str) -> None:
    """Choose the process default: ``"auto"``, ``"eager"`` or ``"compiled"``."""
    global _default
    _default = check_choice("backend", backend, BACKENDS)


def default_backend() -> str:
    """The process default: :func:`set_backend`'s choice, else ``TIMM_QCONV_KERNELS``, else ``"eager"``."""
    if _default is not None:
        return _default
    return check_choice(ENV_VAR, os.environ.get(ENV_VAR, "eager"), BACKENDS)


def get_backend() -> str:
    """The backend in force here: the innermost :func:`use_backend`, else the process default."""
    scoped = _scoped.get()
    return scoped if scoped is not None else default_backend()


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[str]:
    """Run the ``with`` block's kernels with ``backend`` (this thread or task only)."""
    token = _scoped.set(check_choice("backend", backend, BACKENDS))
    try:
        yield backend
    finally:
        _scoped.reset(token)


def use_batched(backend: str, device: torch.device, n_levels: int) -> bool:
    """Whether layers with ``n_levels`` levels of a model converted for ``backend`` take the batched
    compiled path in training forwards and the hash loss."""
    if backend == "eager" or torch.compiler.is_compiling() or n_levels > MAX_COMPILED_LEVELS:
        return False
    if backend == "compiled":
        return True
    return n_levels <= AUTO_MAX_LEVELS and compiler_works(device.type)


def _probe(x: Tensor) -> Tensor:
    return torch.where(x > 0.5, x, -x).sum(1)


@functools.lru_cache(maxsize=None)
def compiler_works(device_type: str) -> bool:
    """Whether ``torch.compile`` can build a kernel on this kind of device (tried once; a few seconds)."""
    try:
        torch.compile(_probe)(torch.rand(4, 8, device=device_type))
        return True
    except Exception as error:  # a missing compiler surfaces as one of several torch error types
        warnings.warn(f"timm_qconv: torch.compile does not work on {device_type} here ({type(error).__name__}: "
                      f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}); quantization-aware "
                      "training uses the eager kernels, about twice as slow on a CPU. "
                      "TIMM_QCONV_KERNELS=eager skips this check.", RuntimeWarning, stacklevel=3)
        return False


def _fused_forward(rows: Tensor, table: Tensor) -> Tensor:
    """Nearest level as a chain of selects over the L-1 midpoints: pure elementwise work, so the
    compiler emits one vectorised pass (a gather by computed index would not vectorise)."""
    q = table[:, :1].expand_as(rows)
    for j in range(table.shape[1] - 1):
        low, high = table[:, j : j + 1], table[:, j + 1 : j + 2]
        q = torch.where(rows > (low + high) * 0.5, high, q)
    return q


def _fused_backward(rows: Tensor, table: Tensor, grad: Tensor) -> Tensor:
    """Per-level gradient sums from one pass: ``above[:, j]`` sums the gradient of the weights above
    midpoint ``j - 1`` (``above[:, 0]`` all of them); a level's share is the difference of neighbours."""
    above = [grad.sum(1)]
    for j in range(table.shape[1] - 1):
        mid = (table[:, j : j + 1] + table[:, j + 1 : j + 2]) * 0.5
        above.append(torch.where(rows > mid, grad, 0.0).sum(1))
    above = torch.stack(above, 1)
    return above - torch.cat([above[:, 1:], torch.zeros_like(above[:, :1])], 1)


@functools.lru_cache(maxsize=None)
def _compiled(n_levels: int) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    # One compiled pair per level count: specialised to the first shape, dynamic once a second comes.
    return torch.compile(_fused_forward), torch.compile(_fused_backward)


def _use_compiled(table: Tensor) -> bool:
    if torch.compiler.is_compiling() or table.shape[1] > MAX_COMPILED_LEVELS:
        return False
    return get_backend() == "compiled"


class _NearestLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, table: Tensor, rows: Tensor, ste: bool) -> tuple[Tensor, Tensor]:
        ctx.ste = ste
        ctx.compiled = _use_compiled(table)
        if ctx.compiled:
            ctx.save_for_backward(table, rows)
            codes = rows.new_empty(0, dtype=torch.long)
            ctx.mark_non_differentiable(codes)
            return _compiled(table.shape[1])[0](rows, table), codes
        codes = nearest_codes(table, rows)
        q = table.gather(1, codes)
        if table.shape[1] <= 256:  # one byte per weight kept until the backward, not eight
            codes = codes.to(torch.uint8)
        ctx.save_for_backward(table, codes)
        ctx.mark_non_differentiable(codes)  # also returned: the hash loss can reuse them (squared_error_from_codes)
        return q, codes

    @staticmethod
    def backward(ctx: Any, grad: Tensor, grad_codes: None) -> tuple[Tensor | None, Tensor | None, None]:
        grad_table = None
        if ctx.needs_input_grad[0]:
            table, saved = ctx.saved_tensors
            grad = grad.contiguous()
            if ctx.compiled:
                grad_table = _compiled(table.shape[1])[1](saved, table, grad)
            else:
                grad_table = torch.zeros_like(table).scatter_add_(1, saved.long(), grad)
        # Straight through: the incoming gradient itself, not a copy, so that autograd can move it
        # into the weight's .grad without cloning.
        return grad_table, (grad if ctx.ste else None), None


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantized value. Backward: its gradient, unchanged, to the float value too."""

    @staticmethod
    def forward(ctx: Any, quantized: Tensor, rows: Tensor) -> Tensor:
        return quantized.view_as(quantized)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, grad


def straight_through(quantized: Tensor, rows: Tensor) -> Tensor:
    """``quantized`` in the forward; in the backward its gradient also reaches ``rows`` unchanged."""
    return _StraightThrough.apply(quantized, rows)


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` in the forward; its gradient multiplied by ``factor`` in the backward."""
    if factor == 1.0 or not x.requires_grad:
        return x
    # (x - x.detach()) is exactly zero, so the forward value is x bit for bit.
    return x.detach() + (x - x.detach()) * factor


def nearest_codes(table: Tensor, rows: Tensor) -> Tensor:
    """Index of the nearest level for every weight: binary search among the midpoints of the
    sorted per-channel ``table`` (C, L). Costs O(N log L), never an (N x L) distance matrix."""
    return torch.searchsorted(midpoints(table).contiguous(), rows.detach().float().contiguous())


def nearest_lookup(table: Tensor, rows: Tensor, ste: bool = False) -> Tensor:
    """Round each weight of ``rows`` (C, K) to the nearest level of its row of ``table`` (C, L, sorted).

    Differentiable in ``table``; with ``ste=True`` the gradient also reaches ``rows`` straight
    through the rounding. Ties go to the lower level, as ``torch.searchsorted``.
    """
    return nearest_lookup_codes(table, rows, ste)[0]


def nearest_lookup_codes(table: Tensor, rows: Tensor, ste: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`nearest_lookup` and the codes it found (``None`` where the compiled kernel found none)."""
    rows = (rows if ste else rows.detach()).contiguous()
    table = table.contiguous()
    needs_grad = torch.is_grad_enabled() and (table.requires_grad or (ste and rows.requires_grad))
    if not needs_grad and not _use_compiled(table):
        codes = nearest_codes(table, rows)
        return table.gather(1, codes), codes
    q, codes = _NearestLookup.apply(table, rows, ste)
    return q, (codes if codes.numel() else None)


class _SquaredErrorFromCodes(torch.autograd.Function):
    """``sum((q - rows)**2) * scale`` where ``q = table.gather(1, codes)`` was already computed.

    The gradient reaches only ``table``: level ``(c, l)`` gets ``2 * scale`` times the summed error
    of the weights with code ``l`` in row ``c`` (the gradient of the hash loss with weights detached).
    """

    @staticmethod
    def forward(ctx: Any, table: Tensor, q: Tensor, rows: Tensor, codes: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        ctx.save_for_backward(q, rows, codes)
        ctx.table_shape, ctx.table_dtype = table.shape, table.dtype
        error = (q.float() - rows.float()).flatten()
        return torch.dot(error, error) * scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        q, rows, codes = ctx.saved_tensors
        error = q.float() - rows.float()
        grad_table = error.new_zeros(ctx.table_shape).scatter_add_(1, codes.long(), error)
        return grad_table.mul_(grad * (2 * ctx.scale)).to(ctx.table_dtype), None, None, None, None


def squared_error_from_codes(table: Tensor, q: Tensor, rows: Tensor, codes: Tensor, scale: float) -> Tensor:
    """``((table.gather(1, codes) - rows)**2).sum() * scale`` from an existing ``q``: one pass over
    the weights forward and one backward, with no nearest-level search (it reuses ``codes``)."""
    return _SquaredErrorFromCodes.apply(table, q.reshape(rows.shape), rows.detach(), codes, scale)
