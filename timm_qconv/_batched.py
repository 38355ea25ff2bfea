"""A model's quantized weights computed before its training forward: for all layers the compiled
kernels cover, in one fused call; for the others, one layer after another.

Per layer, recomputing the quantized weight costs a handful of small framework calls (the levels
from the quantizer's parameters, the per-channel table, the gradient scale) on top of the fused
kernel, and as many autograd nodes in the backward; across a ResNet's 36 convs that fixed cost
is as large as the kernels themselves. Every converted model gets, from :func:`add_hooks`, a
forward pre-hook that fills each quantized layer's ``weight_override`` slot before the model's
forward runs:

* for the ``"compiled"`` or ``"auto"`` backend (see :mod:`timm_qconv._kernels`), per quantizer
  class and bit width, all layers' levels in one call (:meth:`Quantizer.batched_levels`) and all
  their quantized weights in one compiled call, with one compiled backward;
* for the rest (``"eager"``, the default), each layer's own computation, as its forward would
  have run it, one layer after another, for layers of up to :data:`UP_FRONT_MAX_NUMEL` weights.
  The same work, in another order: inside the forward it ran right after the previous layer's
  convolution, which had evicted its code and data from the caches, and each of its small calls
  cost several times what it costs here (a ``torch.empty`` 20-60 µs instead of 1.5). A resnet34
  step on 2 cores: 1-7% less time.

A layer whose weight changed since, that runs outside the model's own forward, or under other
saved-tensor hooks (non-reentrant checkpointing), computes its weight itself as before. Results
never outlive the forward that made them.

:meth:`BatchedPath.level_stats` serves the hash loss (:mod:`timm_qconv.loss`): one pass over all
the weights gathers each level's weight count, weight sum and squared error.
"""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ._kernels import MAX_COMPILED_LEVELS, _fused_backward, _fused_forward, use_batched
from .layers import QuantMixin, WeightOverride


def _as_rows(weights: list[Tensor], levels: Tensor, row_group: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Each weight as float32 rows ``(C, K)``, with its per-channel level table ``(C, L)``."""
    tables = levels[row_group].split([w.shape[0] for w in weights])
    return [(w.flatten(1).float(), table) for w, table in zip(weights, tables)]


def _forward_all(weights: list[Tensor], levels: Tensor, row_group: Tensor, outs: list[Tensor]) -> None:
    """Quantize every weight into its ``outs`` buffer (written in place, no temporary)."""
    for out, w, (rows, table) in zip(outs, weights, _as_rows(weights, levels, row_group)):
        out.copy_(_fused_forward(rows, table).to(w.dtype).view_as(w))


def _backward_all(weights: list[Tensor], levels: Tensor, row_group: Tensor, scale: Tensor,
                  grads: list[Tensor]) -> Tensor:
    """Gradient of the stacked levels ``(G, L)``: per channel, then summed per group and scaled."""
    per_channel = torch.cat([_fused_backward(rows, table, g.flatten(1).float())
                             for g, (rows, table) in zip(grads, _as_rows(weights, levels, row_group))])
    return torch.zeros_like(levels).index_add_(0, row_group, per_channel) * scale[:, None]


def _level_stats(rows: Tensor, table: Tensor) -> Tensor:
    """Per channel ``(C, 2L + 1)``: the count and the sum of the weights that take each level, and
    the squared quantization error, from one pass over the weights."""
    return torch.cat([_fused_backward(rows, table, torch.ones_like(rows)), _fused_backward(rows, table, rows),
                      (_fused_forward(rows, table) - rows).square().sum(1, keepdim=True)], 1)


#: Compiled versions ``torch._dynamo`` keeps of each kernel (default 8): one per level count and
#: range of shapes, for every model of the process. A sweep over bit widths in one process went
#: past 8 in the hash loss's kernel, which then ran uncompiled for the rest of the process
#: (1.6-2.2x the float step instead of 1.06-1.10), silently.
RECOMPILE_LIMIT = 64


def _raised_recompile_limit() -> Any:
    """A ``with`` block in which this module's compiled kernels may keep :data:`RECOMPILE_LIMIT` versions."""
    return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)


@functools.lru_cache(maxsize=None)
def _compiled_all() -> tuple[Callable[..., None], Callable[..., Tensor], Callable[..., Tensor]]:
    # The training path is specialised to the model's shapes on the first call (constant loop
    # bounds vectorise best); the hash loss's statistics, off that path, take one kernel with
    # dynamic shapes called per layer: all layers in one specialised graph took minutes to compile.
    return torch.compile(_forward_all), torch.compile(_backward_all), torch.compile(_level_stats, dynamic=True)


class _LookupAll(torch.autograd.Function):
    """Nearest-level lookup of a batch's weights against its stacked per-group levels ``(G, L)``.

    Channel ``c`` (counted across all the weights) uses row ``batch.row_group[c]`` of ``levels``;
    group ``g``'s gradient is scaled by ``batch.scale[g]``; the weights get theirs straight through.
    """

    @staticmethod
    def forward(ctx: Any, batch: "_Batch", levels: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:
        ctx.batch = batch
        ctx.set_materialize_grads(False)  # an unused layer's weight keeps a None gradient
        ctx.save_for_backward(levels, *weights)
        graph = levels.requires_grad or any(w.requires_grad for w in weights)
        outs, ctx.owns_buffers = batch.take_buffers(ctx, weights, graph)
        with _raised_recompile_limit():
            _compiled_all()[0](list(weights), levels, batch.row_group, outs)
        for out in outs:  # written behind autograd's back: a graph still holding them must notice
            torch.autograd.graph.increment_version(out)
        return tuple(out.detach() for out in outs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        levels, *weights = ctx.saved_tensors
        batch = ctx.batch
        if ctx.owns_buffers:  # every user of this step's weights has run its backward by now
            batch.owner = None
        grad_levels = None
        if ctx.needs_input_grad[1] and any(g is not None for g in grads):  # else nothing to reduce
            dense = [g if g is not None else torch.zeros_like(w) for g, w in zip(grads, weights)]
            with _raised_recompile_limit():
                grad_levels = _compiled_all()[1](weights, levels, batch.row_group, batch.scale, dense)
        # The weights' gradients are the incoming ones, not copies, so .grad takes them as they are.
        return (None, grad_levels, *grads)


@dataclass
class _Batch:
    """Layers quantized together: same quantizer class, bit width and mode.

    Their quantized weights are written into buffers kept from step to step: a fresh 85 MB a step
    (resnet34) made the C allocator hand memory back to the system and page-fault it in again,
    which cost more than the quantization itself. A forward that finds them still in use by an
    earlier graph (two forwards before a backward) writes into new tensors instead: the buffers
    belong to the graph of the forward that took them until its backward runs or it is dropped.
    """

    layers: list[nn.Module]
    row_group: Tensor  # (channels of all layers,) row of the stacked levels for each channel
    scale: Tensor  # (groups of all layers,) factor on each group's gradient from the task loss
    inv_numel: Tensor  # (groups of all layers,) 1 / weights in the group's layer (hash loss is a mean)
    buffers: list[Tensor] | None = None
    owner: weakref.ref | None = None  # the autograd node of the graph using the buffers

    @property
    def ste(self) -> bool:
        return self.layers[0].mode == "ste"

    def levels(self) -> Tensor:
        quantizers = [layer.quantizer for layer in self.layers]
        with torch.autocast(self.row_group.device.type, enabled=False):  # float32 under autocast too
            return type(quantizers[0]).batched_levels(quantizers).float()

    def __getstate__(self) -> dict:
        # Pickling a model (torch.save) keeps the plan but not the buffers or their owner.
        return {**self.__dict__, "buffers": None, "owner": None}

    def take_buffers(self, node: Any, weights: tuple[Tensor, ...], graph: bool) -> tuple[list[Tensor], bool]:
        """Output tensors for ``node``'s forward, and whether they are the kept buffers. Without a
        ``graph`` (nothing requires grad) no backward would free the kept ones: fresh tensors."""
        if not graph or (self.owner is not None and self.owner() is not None):
            return [torch.empty_like(w) for w in weights], False
        if self.buffers is None:
            self.buffers = [torch.empty_like(w) for w in weights]
        self.owner = weakref.ref(node)
        return self.buffers, True


#: Eager layers of at most this many weights get theirs computed ahead of the forward; larger ones
#: when they run. Ahead of the forward, a weight stays alive until its layer runs: resnet34's six
#: largest convs (13 M of its 21 M weights, in its last stage) would hold 52 MB through most of the
#: forward, and gain least (their kernels outweigh their Python).
UP_FRONT_MAX_NUMEL = 1 << 20


def _eligible(layers: list[QuantMixin]) -> list[QuantMixin]:
    """The layers the compiled kernels can serve."""
    return [m for m in layers if m.quantizer.nearest and m.quant_config.n_levels <= MAX_COMPILED_LEVELS
            and m.weight.dtype == torch.float32]


def _make_batch(layers: list[QuantMixin]) -> _Batch:
    row_group, scale, inv_numel, offset = [], [], [], 0
    for layer in layers:
        quantizer = layer.quantizer
        row_group.append(quantizer.group_index + offset)
        scale.append(torch.full((quantizer.n_groups,), quantizer.grad_scale(layer.weight)))
        inv_numel.append(torch.full((quantizer.n_groups,), 1.0 / layer.weight.numel()))
        offset += quantizer.n_groups
    device = row_group[0].device
    return _Batch(layers, torch.cat(row_group), torch.cat(scale).to(device), torch.cat(inv_numel).to(device))


class BatchedPath:
    """The batched path of one model: its kernel backend, its hooks and its plan of batches.

    Held by the model's forward hooks only (no attribute on the model), so it goes wherever the
    model goes: ``copy.deepcopy`` and pickling take it along, :func:`remove_hooks` takes it off.
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._key: list[tuple] = []
        self._layers: list[QuantMixin] = []  # every quantized layer of the model, in its order
        self._batches: list[_Batch] = []
        self._handles: tuple = ()

    def plan(self, model: nn.Module) -> list[_Batch]:
        """The model's batches, rebuilt only when its quantized layers, quantizers, modes or devices change."""
        layers = [m for m in model.modules() if isinstance(m, QuantMixin) and m.quantizer is not None]
        key = [(layer, layer.quantizer, layer.mode, layer.weight.shape, layer.weight.dtype, layer.weight.device)
               for layer in layers]
        if len(self._key) == len(key) and all(
                a[0] is b[0] and a[1] is b[1] and a[2:] == b[2:] for a, b in zip(self._key, key)):
            return self._batches
        by_kind: dict[tuple, list[QuantMixin]] = {}
        for layer in _eligible(layers):
            by_kind.setdefault((type(layer.quantizer), layer.quant_config.n_bits, layer.mode), []).append(layer)
        self._key, self._layers = key, layers
        self._batches = [_make_batch(group) for group in by_kind.values()]
        return self._batches

    def compiled(self, batch: _Batch) -> bool:
        """Whether the backend sends ``batch`` through the compiled kernels now."""
        return use_batched(self.backend, batch.row_group.device, batch.layers[0].quant_config.n_levels)

    def before_forward(self, model: nn.Module, args: Any) -> None:
        """Forward pre-hook: fill each ``"ste"`` layer's ``weight_override`` in a training forward, from
        one call per batch the compiled kernels cover, and for the other layers whose weight trains,
        from each layer's own computation, one layer after another (see the module docstring)."""
        if not model.training or not torch.is_grad_enabled() or getattr(model, "grad_checkpointing", False):
            return
        served = set()
        for batch in self.plan(model):
            if not batch.ste or not self.compiled(batch):  # "float"-mode layers train on their float weights
                continue
            quantized = _LookupAll.apply(batch, batch.levels(), *[layer.weight for layer in batch.layers])
            for layer, q in zip(batch.layers, quantized):
                layer.weight_override = WeightOverride.of(q, layer.weight)
                served.add(layer)
        if torch.compiler.is_compiling():  # traced code: each layer computes its own, as the user's graph has it
            return
        for layer in self._layers:
            if (layer.training and layer.mode == "ste" and layer.weight.requires_grad
                    and layer.weight.numel() <= UP_FRONT_MAX_NUMEL and layer not in served):
                layer.weight_override = WeightOverride.of(layer.compute_weight(), layer.weight)

    def after_forward(self, model: nn.Module, args: Any, output: Any) -> None:
        """Forward hook (also when the forward raised): results never outlive the forward."""
        for layer in self._layers:  # the layers before_forward can have served
            layer.weight_override = None

    def level_stats(self, model: nn.Module) -> list[tuple[_Batch, Tensor, Tensor]]:
        """For every batch the compiled kernels cover: the batch, its stacked levels ``(G, L)``
        (with their graph) and per group, from one pass over the weights, each level's weight
        count ``(G, L)``, weight sum ``(G, L)`` and the squared error ``(G, 1)``, side by side."""
        found = []
        for batch in self.plan(model):
            if not self.compiled(batch):
                continue
            levels = batch.levels()
            with torch.no_grad(), _raised_recompile_limit():
                weights = [layer.weight.detach() for layer in batch.layers]
                stats_of = _compiled_all()[2]
                rows = _as_rows(weights, levels.detach(), batch.row_group)
                per_channel = torch.cat([stats_of(w, table) for w, table in rows])
                stats = levels.new_zeros(levels.shape[0], per_channel.shape[1])
                stats.index_add_(0, batch.row_group, per_channel)
            found.append((batch, levels, stats))
        return found


def batched_path(model: nn.Module) -> BatchedPath | None:
    """The batched path :func:`add_hooks` gave ``model``, or ``None``."""
    for hook in model._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, BatchedPath):
            return owner
    return None


def add_hooks(model: nn.Module, backend: str) -> BatchedPath:
    """Give ``model`` the batched path for ``backend``, replacing any earlier one."""
    remove_hooks(model)
    path = BatchedPath(backend)
    path._handles = (model.register_forward_pre_hook(path.before_forward),
                     model.register_forward_hook(path.after_forward, always_call=True))
    return path


def remove_hooks(model: nn.Module) -> None:
    """Take the batched path's hooks off ``model`` (nothing happens without them)."""
    path = batched_path(model)
    if path is None:
        return
    for handle in path._handles:
        handle.remove()
    path.after_forward(model, (), None)
