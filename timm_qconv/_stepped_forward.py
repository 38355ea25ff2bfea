"""A model's forward on one batch, stopped before each of some layers in turn and resumed on request.

Calibration quantizes a model layer by layer, each on the inputs that the layers before it,
already quantized, produce. Running the model from its input up to each layer in turn costs
about ``L / 2`` full forwards for ``L`` layers. :class:`SteppedForward` runs the forward once, in a
greenlet (a coroutine with its own stack, in the caller's thread) that hands control back at the
forward pre-hook of the layer asked for, until the caller has read the layer's input (and changed
the layer's weights); asked for a later layer, it goes on from there.

Why a greenlet and not a thread: each thread that runs PyTorch operations gets its own OpenMP
team, and once more OpenMP threads exist than cores, libgomp stops letting idle ones spin; every
small operation of the caller then waits for its team to wake up (GPTQ's column loop on resnet18
took 30% longer with eight paused forward threads). A greenlet adds no thread.

A greenlet shares its thread's PyTorch settings (grad mode, autocast), which a forward may change
for part of its run (``with torch.autocast(...)`` around some layers): :meth:`SteppedForward.advance`
swaps them, so that the caller never runs with the forward's settings nor the forward with the
caller's later ones.

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


class SteppedForward:
    """``model(x)``, paused before the layers that :meth:`advance` names.

    ``layers`` maps names to the modules of ``model`` the forward may stop at. :meth:`advance`
    returns the input of the named layer's next call, or ``None`` when the forward cannot give it
    any more: the layer was already passed (another call order than expected) or the forward has
    ended; the caller then runs the model again itself. Errors of the forward are raised by
    :meth:`advance`. The forward starts with the caller's grad mode and autocast state. Always
    :meth:`close` it (it is a context manager): a paused forward holds its activations.
    """

    def __init__(self, model: nn.Module, x: Tensor, layers: dict[str, nn.Module]) -> None:
        self.model, self.x = model, x
        self.target: str | None = None
        self.passed: set[str] = set()
        self.finished = False
        self._greenlet = greenlet.greenlet(self._work)
        self._greenlet.gr_context = contextvars.copy_context()  # the caller's context (kernel backend, ...)
        self._settings = _settings()  # the forward's grad mode and autocast: the caller's, to start with
        self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in layers.items()]

    def _switch(self, into: Any, *args: Any) -> Any:
        """``into(*args)`` (a switch to the forward) with the forward's settings; the caller's back after."""
        caller = _settings()
        _restore(self._settings)
        try:
            return into(*args)
        finally:
            self._settings = _settings()
            _restore(caller)

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple) -> None:
            if greenlet.getcurrent() is not self._greenlet:
                return  # another forward of the same model (the caller's own)
            if name != self.target:
                self.passed.add(name)
                return
            self._greenlet.parent.switch(args[0])  # back to advance(), with the input; resumed by the next
        return hook

    def _work(self) -> None:
        self.model(self.x)

    def advance(self, name: str) -> Tensor | None:
        """Run on to the next call of layer ``name``; its input, or ``None`` if the forward cannot reach it."""
        if self.finished or name in self.passed:
            return None
        if self._greenlet.dead:
            self.finished = True
            return None
        self.target = name
        try:
            value = self._switch(self._greenlet.switch)  # starts the forward, or resumes it in the hook
        except BaseException:
            self.finished = True
            raise
        if self._greenlet.dead:  # the forward ended without calling the layer
            self.finished = True
            return None
        return value

    def close(self) -> None:
        """Stop the forward where it waits (unwinding its frames) and remove the hooks."""
        if self._greenlet and not self._greenlet.dead:
            self._switch(self._greenlet.throw, greenlet.GreenletExit)
        self.finished = True
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "SteppedForward":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
