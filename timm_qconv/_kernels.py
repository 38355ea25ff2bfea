"""The hot path of quantization-aware training: nearest-level lookup and its gradient.

``nearest_lookup(table, rows)`` rounds every weight of the ``(C, K)`` matrix ``rows`` to the
nearest entry of its row's sorted level table ``(C, L)``. Its backward gives the table the sum of
the incoming gradient over the weights that took each level; the weights get no gradient here
(the layers add the straight-through one).

Backends:

* ``"eager"`` (default), one layer at a time. The codes are saved for the backward (one byte
  each), and the hash loss's squared error is an output of the same autograd node
  (:class:`_Lookup`), so one backward pass gives the levels both gradients.

  - float32 on a CPU, up to 256 levels: the Numba kernels of :mod:`timm_qconv._native`, one pass
    over the weights forward (codes, quantized weight and squared error) and one backward (not
    :func:`threshold_codes`, which post-training quantization calls: see that module);
  - elsewhere (a GPU, other dtypes, or where Numba does not import), PyTorch operations: codes
    by comparison with the thresholds on a CPU (by bins above 16 levels; :func:`threshold_codes`),
    by ``torch.searchsorted`` on a GPU, then ``gather``; a ``scatter_add`` backward.
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
Inside a model the user compiles (``torch.compile``), float32 CPU weights call the Numba
kernels as custom operators (:mod:`timm_qconv._traced_ops`); elsewhere the PyTorch formulation
is traced and fused with the model.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import threading
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from . import _traced_ops
from ._errors import check_choice
from ._groups import midpoints

BACKENDS = ("auto", "eager", "compiled")
MAX_COMPILED_LEVELS = 16
#: Up to this many levels, the eager kernels count the thresholds below each weight one by one on a
#: CPU; above it, by bins (see threshold_codes).
CHAIN_MAX_LEVELS = 16
#: ...except in layers of at least this many weights, which count one by one up to
#: CHAIN_MAX_LEVELS_LARGE levels only: there the comparisons' three float32 buffers (weights,
#: count, comparison: 48 MiB) overflow the cache (32 MiB of L3 here), and 29 passes through memory
#: cost more than the bins' dozen. 4 bits, a 4096x1024 linear layer's forward and backward with
#: the hash loss: 38 -> 28 ms (hash), 44 -> 34 (kmeans), 44 -> 38 (log), 42 -> 33 (linear). At
#: resnet34's largest (2.4 M weights) the two are even in a training step.
LARGE_LAYER_NUMEL = 1 << 22
CHAIN_MAX_LEVELS_LARGE = 8
#: The binned search compares a weight with at most this many thresholds of its bin; more (levels
#: repeated or crowded together, as log's near zero) take the search in blocks.
MAX_BIN_THRESHOLDS = 4
#: Bins per threshold of the binned search, equal in value; and equal by bit pattern (log's levels,
#: for which 4 leave up to 3 thresholds in a bin at 5-8 bits, 16 one).
BINS_PER_THRESHOLD = 4
BINS_PER_THRESHOLD_BY_BITS = 16
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


@functools.lru_cache(maxsize=None)
def _native_module() -> Any:
    """:mod:`timm_qconv._native` if Numba imports (a dependency: a failure means a broken install),
    else ``None`` with a warning, once."""
    try:
        from . import _native
    except ImportError as error:
        warnings.warn(f"timm_qconv: Numba does not import ({error}); quantization-aware training on a CPU "
                      "falls back to PyTorch operations, whose quantizer work is about 3x slower. "
                      "pip install numba", RuntimeWarning, stacklevel=3)
        return None
    return _native


def _native_for(rows: Tensor, table: Tensor) -> Any:
    """The Numba kernels if they serve these float32 CPU tensors (up to 256 levels), else ``None``."""
    if (rows.device.type != "cpu" or rows.dtype != torch.float32 or table.shape[1] > 256
            or table.dtype != torch.float32 or torch.compiler.is_compiling()):
        return None
    return _native_module()


def _traced_op_serves(rows: Tensor, table: Tensor) -> bool:
    """Whether traced code calls the kernels as a custom operator (:mod:`timm_qconv._traced_ops`)
    for these tensors: float32 on a CPU, up to 256 levels, and not for ``torch.export``, whose
    graphs should hold aten operations only, to run without timm_qconv."""
    return (rows.device.type == "cpu" and rows.dtype == torch.float32 and table.dtype == torch.float32
            and table.shape[1] <= 256 and not torch.compiler.is_exporting())


def _native_lookup(native: Any, table: Tensor, thresholds: Tensor | None, groups: Tensor | None, rows: Tensor,
                   with_error: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """:func:`timm_qconv._native.lookup_forward` with this module's conventions: ``groups`` ``None``
    means one row of ``table`` (and of ``thresholds``) per row of weights."""
    if groups is None:
        groups = torch.arange(rows.shape[0])
    if thresholds is not None:
        thresholds = thresholds.detach().float().contiguous()
    return native.lookup_forward(thresholds, groups, table.detach(), rows.detach(), with_error)


def _per_row(table: Tensor, groups: Tensor | None) -> Tensor:
    """The ``(G, L)`` ``table`` with one row per row of weights ``(C, L)``: row ``groups[c]`` for row ``c``."""
    return table if groups is None else table[groups]


def _per_group(grad: Tensor, groups: Tensor | None, n_groups: int) -> Tensor:
    """The gradient ``(C, L)`` of :func:`_per_row`'s table summed into the ``(G, L)`` table's."""
    return grad if groups is None else grad.new_zeros(n_groups, grad.shape[1]).index_add_(0, groups, grad)


class _Scratch(threading.local):
    """Per-thread CPU buffers for the eager kernels' temporaries, reused from layer to layer and
    step to step. A fresh multi-megabyte tensor is new memory from the OS for every layer, and
    its first write costs page faults: converting a large layer's codes to int64 into a fresh tensor
    takes 3x the time of the same conversion into a reused one.

    A buffer is a named slot of raw bytes, viewed as whatever dtype its user asks for; temporaries
    that are never alive together share a slot (``"counts"``: the comparison counts, then the int64
    codes; ``"work"``: one comparison, the codes as int32, then the rounding error), so the slots
    cost about 12 bytes per weight of the largest layer. Layers above :data:`SCRATCH_MAX_NUMEL`
    weights allocate as usual.
    """

    def __init__(self) -> None:
        self.slots: dict[str, Tensor] = {}

    def like(self, x: Tensor, slot: str, dtype: torch.dtype | None = None) -> Tensor:
        """An uninitialised tensor of ``x``'s shape (and ``dtype``, default ``x``'s) in ``slot``,
        valid until the slot's next use."""
        dtype = dtype or x.dtype
        n = x.numel()
        if x.device.type != "cpu" or n > SCRATCH_MAX_NUMEL or torch.compiler.is_compiling():
            return torch.empty(x.shape, dtype=dtype, device=x.device)
        n_bytes = n * dtype.itemsize
        buffer = self.slots.get(slot)
        if buffer is None or buffer.numel() < n_bytes:
            buffer = self.slots[slot] = torch.empty(n_bytes, dtype=torch.uint8)
        return buffer[:n_bytes].view(dtype).view(x.shape)

    def index(self, codes: Tensor) -> Tensor:
        """``codes`` as int64 (what ``gather``/``scatter`` take), in slot ``"counts"``."""
        if codes.dtype == torch.int64:
            return codes
        return self.like(codes, "counts", torch.int64).copy_(codes)


_scratch = _Scratch()
#: Layers with more weights than this use fresh buffers (bounds what the slots keep per thread).
SCRATCH_MAX_NUMEL = 1 << 24


class _Lookup(torch.autograd.Function):
    """Outputs the rounded weights ``q``, their codes (eager only) and, when asked, the squared
    rounding error ``sum((q - rows)**2)``.

    ``table`` holds the levels ``(G, L)``, row ``groups[c]`` serving row ``c`` of the weights
    (``groups`` ``None``: one row per row of weights), and gets its gradient in that shape. The
    backward reads a copy of it: it may be a parameter (``linear``'s levels), edited in place
    before the backward runs.

    The error is an output of the same node so that one backward call receives the gradients of
    both: the levels' gradient is then one scatter of ``grad_q * grad_scale + 2 * grad_error *
    (q - rows)`` over the codes, where a separate hash-loss node would need a second scatter
    (and a second pass converting the codes). ``grad_scale`` applies to the task gradient only
    (see ``Quantizer.grad_scale``); the error's gradient is that of the weights-detached hash loss.
    """

    @staticmethod
    def forward(ctx: Any, table: Tensor, thresholds: Tensor | None, groups: Tensor | None, rows: Tensor, ste: bool,
                grad_scale: float, with_error: bool) -> tuple[Tensor, Tensor, Tensor]:
        ctx.ste, ctx.grad_scale, ctx.groups, ctx.n_groups = ste, grad_scale, groups, table.shape[0]
        ctx.compiled = thresholds is None and _use_compiled(table)
        ctx.set_materialize_grads(False)
        if ctx.compiled:
            row_table = _per_row(table, groups)
            ctx.save_for_backward(row_table, rows)
            codes, error = rows.new_empty(0, dtype=torch.long), rows.new_empty(0)
            ctx.mark_non_differentiable(codes, error)
            return _compiled(table.shape[1])[0](rows, row_table), codes, error
        native = _native_for(rows, table)
        ctx.native = native is not None
        if native is not None:
            if groups is None:
                ctx.groups = groups = torch.arange(rows.shape[0])
            q, codes, error, deviations = _native_lookup(native, table, thresholds, groups, rows, with_error)
            ctx.save_for_backward(table.clone(), codes, rows, deviations)
            if error is None:
                error = rows.new_empty(0)
                ctx.mark_non_differentiable(error)
            ctx.mark_non_differentiable(codes)
            return q, codes, error
        q, codes, error = _torch_lookup(table, thresholds, groups, rows, with_error)
        table = table.clone()
        if with_error:
            ctx.save_for_backward(table, codes, rows)  # not q: a layer's graph may keep the codes in its place
        else:
            error = rows.new_empty(0)
            ctx.mark_non_differentiable(error)
            ctx.save_for_backward(table, codes)
        ctx.mark_non_differentiable(codes)
        return q, codes, error

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None, grad_codes: None,
                 grad_error: Tensor | None) -> tuple[Tensor | None, None, None, Tensor | None, None, None, None]:
        grad_table = None
        if ctx.needs_input_grad[0]:
            table, saved, *error_inputs = ctx.saved_tensors  # saved: the codes, or the rows if compiled
            if ctx.compiled:
                grad = torch.zeros_like(saved) if grad is None else grad.contiguous()
                grad_rows = _compiled(table.shape[1])[1](saved, table, grad) * ctx.grad_scale
                grad_table = _per_group(grad_rows, ctx.groups, ctx.n_groups)
            elif ctx.native:
                error_coef = 0.0 if grad_error is None else float(grad_error) * 2.0 / ctx.grad_scale
                rows, deviations = error_inputs
                grad_table = _native_module().lookup_backward(saved, ctx.groups, table, rows,
                                                              None if grad is None else grad.contiguous(),
                                                              error_coef, ctx.grad_scale, deviations)
            else:
                with_error = grad_error is not None and bool(error_inputs)
                error_coef = (grad_error * (2.0 / ctx.grad_scale)).to(table.dtype) if with_error else None
                grad_table = _torch_level_grad(saved, table, ctx.groups, error_inputs[0] if with_error else None,
                                               grad, error_coef, ctx.grad_scale)
        # Straight through: the incoming gradient itself, not a copy, so that autograd can move it
        # into the weight's .grad without cloning.
        return grad_table, None, None, (grad if ctx.ste else None), None, None, None


def _torch_lookup(table: Tensor, thresholds: Tensor | None, groups: Tensor | None, rows: Tensor,
                  with_error: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The lookup in PyTorch operations: ``(q, codes, error)``, the codes uint8 up to 256 levels
    (one byte per weight for a backward to keep, not eight), ``error`` the float32
    ``sum((q - rows)**2)`` if ``with_error``, else ``None``. ``table`` (and ``thresholds``) as
    :class:`_Lookup`'s."""
    if groups is not None and thresholds is None:  # nearest level, found by its thresholds: tables once per group
        thresholds = midpoints(table.detach().float())
    codes = _codes(table, thresholds, rows, groups)
    q = _per_row(table, groups).gather(1, _scratch.index(codes))
    if not with_error:
        return q, codes, None
    diff = torch.sub(q, rows, out=_scratch.like(rows, "work")).view(-1)  # float32, as rows
    return q, codes, torch.dot(diff, diff).float()


def _torch_level_grad(codes: Tensor, table: Tensor, groups: Tensor | None, rows: Tensor | None, grad: Tensor | None,
                      error_coef: Tensor | None, scale: float) -> Tensor:
    """The levels' gradient in PyTorch operations, as the Numba ``lookup_backward``: per level, the
    sum over the weights of that code of ``grad + error_coef * (level - weight)``, times ``scale``,
    in ``table``'s shape (see :class:`_Lookup`). ``grad`` ``None``: no task term; ``error_coef`` (a
    0-d tensor, kept on the device) ``None``: no error term, and ``rows`` is not read."""
    index = _scratch.index(codes)
    row_table = _per_row(table, groups)
    combined = grad
    if error_coef is not None:
        q = row_table.gather(1, index)
        diff = torch.sub(q, rows, out=_scratch.like(q, "work"))  # in the table's dtype
        combined = diff.mul_(error_coef) if grad is None else torch.addcmul(grad, diff, error_coef, out=diff)
    grad_rows = torch.zeros_like(row_table)
    if combined is not None:  # scaled after the scatter (a (C, L) table), not before it (the (C, K) weights)
        grad_rows.scatter_add_(1, index, combined.contiguous()).mul_(scale)
    return _per_group(grad_rows, groups, table.shape[0])


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


def threshold_codes(thresholds: Tensor, rows: Tensor, groups: Tensor | None = None) -> Tensor:
    """Code of every weight of ``rows`` (C, K): the number of its row's ascending thresholds
    strictly below it. uint8 for up to 256 levels, else int64.

    ``thresholds`` is ``(C, L-1)``, one row per row of weights, or, with ``groups`` (C,), ``(G, L-1)``
    with row ``groups[c]`` serving row ``c``: the binned search then builds its tables once per
    group, not once per row.

    With the midpoints of sorted levels as thresholds this is the index of the nearest level, ties
    going to the lower one (:func:`compact_codes`). On a CPU, eager, up to 256 levels: comparisons
    with the thresholds, summed (:func:`_count_above`); beyond :data:`CHAIN_MAX_LEVELS` levels
    (:data:`CHAIN_MAX_LEVELS_LARGE` in layers of :data:`LARGE_LAYER_NUMEL` weights or more), with
    those of the weight's bin only (:func:`_count_above_binned`), or in two stages
    (:func:`_count_above_in_blocks`). These are streaming passes that the vector units run several
    times faster than ``torch.searchsorted``'s per-element binary search, which the other cases
    use: O(N log L), never an (N x L) distance matrix.
    """
    thresholds = thresholds.detach().float()
    rows = rows.detach().float()
    n_levels = thresholds.shape[1] + 1
    on_cpu, compiling = rows.device.type == "cpu", torch.compiler.is_compiling()
    chain_max = CHAIN_MAX_LEVELS if rows.numel() < LARGE_LAYER_NUMEL else CHAIN_MAX_LEVELS_LARGE
    binned = on_cpu and not compiling and chain_max < n_levels <= 256
    if groups is not None and not binned:
        thresholds, groups = thresholds[groups], None
    if on_cpu and compiling and n_levels <= CHAIN_MAX_LEVELS:
        # traced: the compiler fuses the comparisons itself
        return sum(((rows > thresholds[:, j : j + 1]).to(torch.uint8) for j in range(n_levels - 1)),
                   torch.zeros_like(rows, dtype=torch.uint8))
    if on_cpu and not compiling and n_levels <= 256:
        if not binned:
            count = _count_above(rows, thresholds)
        else:
            count = _count_above_binned(rows, thresholds, groups)
            if count is None:
                count = _count_above_binned(rows, thresholds, groups, by_bits=True)
            if count is None:
                count = _count_above_in_blocks(rows, thresholds if groups is None else thresholds[groups])
        # float32 -> uint8 directly is 3x slower than through int32, kept in a reused buffer
        return _scratch.like(count, "work", torch.int32).copy_(count).to(torch.uint8)
    codes = torch.searchsorted(thresholds.contiguous(), rows.contiguous())
    return codes.to(torch.uint8) if n_levels <= 256 else codes


def _count_above(rows: Tensor, thresholds: Tensor, slot: str = "counts") -> Tensor:
    """Float32 count of each row's ``thresholds`` (C, T) below each weight of ``rows`` (C, K).

    Comparisons written as float32 0/1 vectorise; written as bool or integers they do not (about
    3.5x slower per pass on AVX2), so the count is kept in float32 (exact up to 2**24).
    """
    count, above = _scratch.like(rows, slot), _scratch.like(rows, "work")
    first, *others = thresholds.unsqueeze(2).unbind(1)  # (C, 1) columns in one call, not T slices
    torch.gt(rows, first, out=count)
    for column in others:
        count += torch.gt(rows, column, out=above)
    return count


def _count_above_binned(rows: Tensor, thresholds: Tensor, groups: Tensor | None = None,
                        by_bits: bool = False) -> Tensor | None:
    """:func:`_count_above` for many thresholds, in a fixed number of passes; ``None`` where the
    thresholds crowd together in the bins (repeated levels): the caller then takes
    :func:`_count_above_in_blocks`. ``thresholds`` is ``(G, T)``, row ``groups[c]`` serving row
    ``c`` of ``rows`` (``None``: one row of thresholds per row of weights).

    Each threshold row's range is cut into equal bins, ``BINS_PER_THRESHOLD * (T + 1)`` of them,
    and a weight's bin is computed, not searched: ``(w - lo) * (bins / span)``, clamped. A table
    per threshold row gives the number of thresholds in the bins before each bin; the at most
    ``k`` thresholds in a weight's own bin (usually 1) are fetched by ``gather`` and compared.
    Exact, not approximate: thresholds are put in bins by the same float operations as the
    weights, which are monotone, so a threshold in an earlier bin is below the weight and one in a
    later bin above it, whatever the rounding. At 256 levels this takes a third of the time of a
    binary search by comparisons.

    With ``by_bits`` the bins are equal in :func:`_bit_order` instead of in value: the same number
    per octave of magnitude, for thresholds that halve towards zero (``log``'s), which equal bins
    in value would crowd into the bin around zero.
    """
    n_tables, n_thresholds = thresholds.shape
    n_bins = (BINS_PER_THRESHOLD_BY_BITS if by_bits else BINS_PER_THRESHOLD) * (n_thresholds + 1)
    if n_tables * n_bins > 2**24:  # the tables' offsets below must be exact in float32
        return None
    keys, lift = thresholds, 1.0
    if by_bits:
        if torch.isnan(thresholds).any():
            return None
        magnitude = thresholds.abs()
        if bool(((magnitude < torch.finfo(torch.float32).tiny) & (magnitude > 0)).any()):
            lift = 2.0**64  # subnormal thresholds (log's lowest at 8 bits) become normal: one octave each
        keys = _bit_order(thresholds, *(torch.empty_like(thresholds) for _ in range(3)), lift=lift)
    low = keys[:, :1]
    scale = n_bins / (keys[:, -1:] - low)
    # a row of one repeated threshold, or with infinite or NaN ones: all in one bin, found crowded
    scale = torch.where(torch.isfinite(scale), scale, 0.0)

    # All threshold rows' tables are kept end to end: bin b of threshold row g is entry g * n_bins + b.
    offset = torch.arange(n_tables, device=rows.device, dtype=torch.float32)[:, None] * n_bins

    def bin_of(x: Tensor, low: Tensor, scale: Tensor, offset: Tensor, out: Tensor) -> Tensor:
        # NaN (a NaN weight, or an infinite one times a zero scale) to bin 0, whose thresholds it
        # is not above: code 0, as the comparisons give. The offset is added last, to both
        # weights and thresholds: it may round a bin's fraction, but never across rows.
        return torch.sub(x, low, out=out).mul_(scale).nan_to_num_(0.0).clamp_(0, n_bins - 1).add_(offset)

    threshold_bins = bin_of(keys, low, scale, offset, torch.empty_like(keys)).long()
    per_bin = torch.zeros(n_tables * n_bins, dtype=torch.long, device=rows.device)
    per_bin.scatter_add_(0, threshold_bins.view(-1), torch.ones_like(threshold_bins.view(-1)))
    k = int(per_bin.max())
    if k > MAX_BIN_THRESHOLDS:
        return None
    per_bin = per_bin.view(n_tables, n_bins)
    before = per_bin.cumsum(1).sub_(per_bin)  # thresholds in earlier bins = index of the bin's first
    padded = torch.cat([thresholds, thresholds.new_full((n_tables, k), float("inf"))], 1)
    n_rows = rows.shape[0]
    groups = torch.arange(n_rows, device=rows.device) if groups is None else groups

    def flat(table: Tensor) -> Tensor:
        return table.float().view(1, -1).expand(n_rows, -1)  # every table, seen from every row of weights

    count, above, threshold = (_scratch.like(rows, slot) for slot in ("counts", "work", "thresholds"))
    keys = _bit_order(rows, count, threshold, above, lift=lift) if by_bits else rows
    bins = bin_of(keys, low[groups], scale[groups], offset[groups], above)
    index = _scratch.like(rows, "index", torch.int64).copy_(bins)
    torch.gather(flat(before), 1, index, out=count)
    for j in range(k):
        torch.gather(flat(padded.gather(1, before + j)), 1, index, out=threshold)  # the bin's j-th threshold
        count += torch.gt(rows, threshold, out=above)
    return count


def _bit_order(x: Tensor, signed: Tensor, bits: Tensor, out: Tensor, lift: float = 1.0) -> Tensor:
    """A monotone (non-decreasing) map of float32 ``x`` into ``out`` that spaces values by their bit
    patterns: the magnitude's bits read as an integer, with ``x``'s sign, so that every octave of
    magnitude spans the same width (2**23). NaN goes with -inf, below every threshold.
    ``signed`` and ``bits`` are float32 buffers of ``x``'s shape for the temporaries.

    Subnormal numbers break the spacing: their bit patterns grow linearly with the value (in units
    of 2**-149), so log-spaced ones crowd near zero. ``lift``, a power of two, multiplies ``x``
    first: exact for subnormals, which become normal, and monotone still where it overflows to
    infinity."""
    torch.nan_to_num(x, nan=-math.inf, out=signed)
    if lift != 1.0:
        signed.mul_(lift)
    torch.abs(signed, out=bits)
    out.copy_(bits.view(torch.int32))  # int -> float rounds, monotonically
    return torch.copysign(out, signed, out=out)


def _count_above_in_blocks(rows: Tensor, thresholds: Tensor) -> Tensor:
    """:func:`_count_above` for many thresholds, in ``O(sqrt(T))`` passes instead of ``T``.

    The sorted thresholds are cut into blocks of ``B``. The last threshold of each block, compared
    with every weight, gives the block ``b`` the weight falls in: all ``B * b`` thresholds before it
    are below the weight, none after it. Then each weight is compared with the ``B - 1`` other
    thresholds of its own block, fetched by ``gather``.
    """
    n_channels, n_thresholds = thresholds.shape
    # A gather costs about five comparisons: blocks of about sqrt(T) / 2 balance the two stages.
    block = max(2, round(math.sqrt(n_thresholds) / 2))
    n_blocks = -(-(n_thresholds + 1) // block)
    padded = thresholds.new_full((n_channels, n_blocks * block), float("inf"))
    padded[:, :n_thresholds] = thresholds
    padded = padded.view(n_channels, n_blocks, block)
    blocks = _count_above(rows, padded[:, :-1, -1], "blocks")
    index = _scratch.like(rows, "index", torch.int64).copy_(blocks)
    by_position = padded.transpose(1, 2).contiguous()  # (C, B, n_blocks): gather from contiguous rows
    count, above, threshold = (_scratch.like(rows, slot) for slot in ("counts", "work", "thresholds"))
    for j in range(block - 1):
        torch.gather(by_position[:, j], 1, index, out=threshold)
        if j == 0:
            torch.gt(rows, threshold, out=count)
        else:
            count += torch.gt(rows, threshold, out=above)
    return count.add_(blocks, alpha=block)


def compact_codes(table: Tensor, rows: Tensor) -> Tensor:
    """Index of the nearest level of every weight of ``rows`` (C, K) in its row of the sorted
    ``table`` (C, L), ties to the lower level; uint8 for up to 256 levels, else int64."""
    return threshold_codes(midpoints(table.detach().float()), rows)


def nearest_codes(table: Tensor, rows: Tensor) -> Tensor:
    """:func:`compact_codes` as int64, ready for ``gather``."""
    return compact_codes(table, rows).long()


def _codes(table: Tensor, thresholds: Tensor | None, rows: Tensor, groups: Tensor | None = None) -> Tensor:
    """:func:`threshold_codes` with ``thresholds`` (and ``groups``), or :func:`compact_codes` (nearest
    level of the per-row ``table``) if ``None``."""
    return compact_codes(table, rows) if thresholds is None else threshold_codes(thresholds, rows, groups)


def nearest_lookup(table: Tensor, rows: Tensor, ste: bool = False) -> Tensor:
    """Round each weight of ``rows`` (C, K) to the nearest level of its row of ``table`` (C, L, sorted).

    Differentiable in ``table``; with ``ste=True`` the gradient also reaches ``rows`` straight
    through the rounding. Ties go to the lower level, as ``torch.searchsorted``.
    """
    return lookup_codes(table, rows, ste=ste)[0]


def lookup_codes(
    table: Tensor, rows: Tensor, thresholds: Tensor | None = None, ste: bool = False, grad_scale: float = 1.0,
    with_error: bool = False, groups: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Each weight of ``rows`` (C, K) mapped to an entry of its row of ``table`` (C, L), with the
    codes found and, when asked, the squared error ``sum((q - rows)**2)``.

    Args:
        table: the levels, differentiable.
        rows: the weights.
        thresholds: ascending ``(C, L-1)``: code = number of thresholds below the weight
            (:func:`threshold_codes`); ``None``: the nearest level of the sorted ``table``.
        ste: let the gradient reach ``rows`` straight through the rounding.
        grad_scale: factor on the gradient that ``q`` passes to ``table`` (not on the error's).
        with_error: also return the squared error, differentiable in ``table`` only (the hash
            loss with the weights detached); one pass more in the forward, none in the backward.
        groups: ``(C,)``: ``table`` and ``thresholds`` have one row per group, row ``groups[c]``
            serving row ``c`` of ``rows`` (the search's tables are then built once per group).
    Returns:
        ``(q, codes, error)``; ``codes`` is ``None`` where the compiled kernel found none, and
        ``error`` where it was not asked for, the compiled kernel ran, or no gradient is needed
        (the error only serves the hash loss's backward).
    """
    rows = (rows if ste else rows.detach()).contiguous()
    table = table.contiguous()
    if torch.compiler.is_compiling() and _traced_op_serves(rows, table):
        thresholds = midpoints(table.detach()) if thresholds is None else thresholds.detach().float()
        groups = torch.arange(rows.shape[0], device=rows.device) if groups is None else groups
        q, codes, error = _traced_ops.lookup(thresholds, groups, table, rows, ste, grad_scale, with_error)
        return q, codes, (error if with_error else None)
    needs_grad = torch.is_grad_enabled() and (table.requires_grad or (ste and rows.requires_grad))
    if not needs_grad and (thresholds is not None or not _use_compiled(table)):
        native = _native_for(rows, table)
        if native is not None:
            q, codes, _, _ = _native_lookup(native, table, thresholds, groups, rows, with_error=False)
        else:
            q, codes, _ = _torch_lookup(table, thresholds, groups, rows, with_error=False)
        return q, codes.long(), None
    q, codes, error = _Lookup.apply(table, thresholds, groups, rows, ste, grad_scale, with_error)
    return q, (codes if codes.numel() else None), (error if error.ndim == 0 else None)


def codes_decoder(table: Tensor, groups: Tensor, codes: Tensor) -> Callable[[], Tensor]:
    """A call that returns the ``(C, K)`` levels of the ``codes`` :func:`lookup_codes` found, row
    ``c`` reading row ``groups[c]`` of ``table`` (G, L), in the table's dtype: its ``q``, bit for
    bit, without a gradient. Prepared now (checks, NumPy views for the Numba kernel), so that a
    backward that decodes does the pass over the weights and little else."""
    table = table.detach().contiguous()
    if (codes.device.type == "cpu" and codes.dtype == torch.uint8 and table.dtype == torch.float32
            and not torch.compiler.is_compiling()):
        native = _native_module()
        if native is not None:
            return native.decoder(codes.contiguous(), groups, table)
    return functools.partial(_gather_codes, table, groups, codes)


def _gather_codes(table: Tensor, groups: Tensor, codes: Tensor) -> Tensor:
    return table[groups].gather(1, codes.long())
