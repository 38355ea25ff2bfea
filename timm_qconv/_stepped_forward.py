"""A model's forward on one batch, stopped before each of some layers in turn and resumed on request.

Calibration quantizes a model layer by layer, each on the inputs that the layers before it,
already quantized, produce. Running the model from its input up to each layer in turn costs
about ``L / 2`` full forwards for ``L`` layers. :class:`SteppedForwards` runs each batch's forward
once, in a greenlet (a coroutine with its own stack, in the caller's thread) that hands control back
at the forward pre-hook of the layer asked for, until the caller has read the layer's input (and
changed the layer's weights); asked for a later layer, it goes on from there. One pre-hook per layer
serves all the batches' forwards (the one running is known), so many small batches cost no more
hook calls than one.

Why a greenlet and not a thread: each thread that runs PyTorch operations gets its own OpenMP
team, and once more OpenMP threads exist than cores, libgomp stops letting idle ones spin; every
small operation of the caller then waits for its team to wake up (GPTQ's column loop on resnet18
took 30% longer with eight paused forward threads). A greenlet adds no thread.

A greenlet shares its thread's PyTorch settings, which a forward may change for part of its run
(``with torch.autocast(...)`` around some layers): :meth:`SteppedForwards.advance` swaps grad mode
and the CPU and CUDA autocast state, so that the caller never runs with the forward's nor the
forward with the caller's. Other thread-wide modes a forward might enter around a layer
(``torch.inference_mode``, ``TorchFunctionMode``) are not swapped.

A paused forward holds what it keeps alive at that point (a ResNet: the block's input and the
current activation), for its batch only.
"""
from __future__ import annotations

import contextvars
from typing import Any

import greenlet
import torch
from torch import Tensor, nn

_AUTOCAST_DEVICES = ("cpu", "cuda")


def _settings() -> tuple:
    """This thread's grad mode and autocast state, as a forward's ``with`` blocks may change them."""
    return (torch.is_grad_enabled(),
            *((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES))


def _restore(settings: tuple) -> None:
    torch.set_grad_enabled(settings[0])
    for device, (enabled, dtype) in zip(_AUTOCAST_DEVICES, settings[1:]):
        torch.set_autocast_enabled(device, enabled)
        torch.set_autocast_dtype(device, dtype)


class _Forward:
    """One batch's forward: its greenlet, the layer it should stop at, the layers it went past."""

    def __init__(self, model: nn.Module, x: Tensor) -> None:
        self.greenlet = greenlet.greenlet(lambda: model(x))
        self.greenlet.gr_context = contextvars.copy_context()  # the caller's context (kernel backend, ...)
        self.settings = _settings()  # its grad mode and autocast: the caller's, to start with
        self.target: str | None = None
        self.passed: set[str] = set()
        self.finished = False


class SteppedForwards:
    """``model(x)`` for each of ``batches``, each paused before the layers that :meth:`advance` names.

    ``layers`` maps names to the modules of ``model`` the forwards may stop at. :meth:`advance`
    returns the input of the named layer's next call in a batch's forward, or ``None`` when that
    forward cannot give it any more: the layer was already passed (another call order than
    expected) or the forward has ended; the caller then runs the model again itself. Errors of a
    forward are raised by :meth:`advance`. Always :meth:`close` them (a context manager): a paused
    forward holds its activations.
    """

    def __init__(self, model: nn.Module, batches: list[Tensor], layers: dict[str, nn.Module]) -> None:
        self._forwards = [_Forward(model, x) for x in batches]
        self._running: _Forward | None = None  # the forward switched into, while it runs
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in layers.items()]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            forward = self._running
            if forward is None or greenlet.getcurrent() is not forward.greenlet:
                return  # another forward of the same model (the caller's own)
            if name != forward.target:
                forward.passed.add(name)
                return
            forward.greenlet.parent.switch(args[0])  # back to advance(), with the input; resumed by the next
        return hook

    def _switch(self, forward: _Forward, into: Any, *args: Any) -> Any:
        """``into(*args)`` (a switch to ``forward``) with its settings; the caller's back after."""
        caller = _settings()
        _restore(forward.settings)
        self._running = forward
        try:
            return into(*args)
        finally:
            self._running = None
            forward.settings = _settings()
            _restore(caller)

    def advance(self, index: int, name: str) -> Tensor | None:
        """Run batch ``index``'s forward on to the next call of layer ``name``; its input, or ``None``
        if that forward cannot reach it."""
        forward = self._forwards[index]
        if forward.finished or name in forward.passed:
            return None
        forward.target = name
        try:
            value = self._switch(forward, forward.greenlet.switch)  # starts the forward, or resumes it
        except BaseException:
            forward.finished = True
            raise
        if forward.greenlet.dead:  # the forward ended without calling the layer
            forward.finished = True
            return None
        return value

    def stop(self, index: int) -> None:
        """Stop batch ``index``'s forward where it waits, unwinding its frames."""
        forward = self._forwards[index]
        if forward.greenlet and not forward.greenlet.dead:
            self._switch(forward, forward.greenlet.throw, greenlet.GreenletExit)
        forward.finished = True

    def close(self) -> None:
        """Stop every forward and remove the hooks."""
        try:
            for index in range(len(self._forwards)):
                self.stop(index)
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    def __enter__(self) -> "SteppedForwards":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
