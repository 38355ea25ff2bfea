"""The quantized weight of a layer, kept between forwards that need no gradient.

An evaluation pass (``model.eval()`` under ``torch.no_grad()``) would otherwise recompute every
layer's quantized weight for every batch although nothing changed: 8.7 times the float forward
for resnet34 at 4 bits. :class:`WeightCache` keeps the last result with a key of everything it
was computed from, and hands it back only while that key still holds:

* each tensor it read (the float weight, the quantizer's parameters and buffers): the very
  object, its version counter (bumped by every in-place change: an optimizer step,
  ``load_state_dict``, ``weight.mul_(...)``), its storage address (``.data = ...``), dtype and
  device (``.to(...)``);
* the quantizer object itself (``reset_quantizer`` builds a new one) and its training flag;
* autocast (levels computed under it can differ) and inference mode.

It is used only where no autograd graph is needed (grad disabled, or nothing requires grad), so a
training step never sees it; the first forward that needs a graph drops it, freeing its memory.

One change escapes version counters: an in-place edit through ``.data`` (``w.data.mul_(2)``).
Switching to training mode (``model.train()``, which every train/validate loop does before
training again) clears the cache, as does :meth:`WeightCache.clear`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn


def module_tensors(module: nn.Module, buffers: bool = True) -> Iterable[Tensor]:
    """``module``'s parameters (and with ``buffers``, its buffers). A module without submodules has
    them read from its own dicts: a third of the cost of the ``parameters()``/``buffers()``
    generators, which the layers' version checks pay per layer and step."""
    if module._modules:
        return (*module.parameters(), *(module.buffers() if buffers else ()))
    own = (*module._parameters.values(), *(module._buffers.values() if buffers else ()))
    return [t for t in own if t is not None]


def autocast_dtype(tensor: Tensor) -> torch.dtype | bool:
    """The autocast dtype in force for ``tensor``'s device, else False: part of what a quantized
    weight computed now depends on (its levels' precision)."""
    device = tensor.device.type
    return (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
            and torch.get_autocast_dtype(device))


def _tensor_key(t: Tensor) -> tuple:
    return t, t._version, t.data_ptr(), t.dtype, t.device


class WeightCache:
    """One layer's cached quantized weight and the key it was computed under."""

    __slots__ = ("key", "value")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: Tensor | None = None

    def clear(self) -> None:
        self.key = self.value = None

    @staticmethod
    def _key(weight: Tensor, quantizer: nn.Module) -> tuple:
        tensors = (weight, *module_tensors(quantizer))
        return (quantizer, quantizer.training, autocast_dtype(weight), torch.is_inference_mode_enabled(),
                *map(_tensor_key, tensors))

    @staticmethod
    def _matches(a: tuple, b: tuple) -> bool:
        # Tensors compare by identity (== on tensors is elementwise), the rest by value.
        return len(a) == len(b) and a[0] is b[0] and a[1:4] == b[1:4] and all(
            x[0] is y[0] and x[1:] == y[1:] for x, y in zip(a[4:], b[4:]))

    def get(self, weight: Tensor, quantizer: nn.Module, compute: Callable[[], Tensor]) -> Tensor:
        """``compute()``, or its last result if nothing it depends on changed since.

        Caches only when the result needs no autograd graph; otherwise computes and drops the
        cache (a training forward never keeps a second copy of the weights alive).
        """
        needs_graph = torch.is_grad_enabled() and (weight.requires_grad or any(
            p.requires_grad for p in quantizer.parameters()))
        if needs_graph or torch.compiler.is_compiling():
            self.clear()
            return compute()
        key = self._key(weight, quantizer)
        if self.key is not None and self._matches(self.key, key):
            return self.value
        self.clear()  # the old weight is freed before the new one is made
        value = compute()
        self.key, self.value = key, value
        return value

    def __getstate__(self) -> Any:
        return (None, None)  # a copied or pickled layer recomputes its weight (a falsy state would skip __setstate__)

    def __setstate__(self, state: Any) -> None:
        self.clear()
