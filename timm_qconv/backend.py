"""Which kernels quantized layers run: for the process, for one model, or for a ``with`` block.

The backends (``"eager"``, ``"compiled"``, ``"auto"``) are described in :mod:`timm_qconv._kernels`.
A model takes the process default when :func:`~timm_qconv.quantize_model` converts it (or the
``kernels=`` given there) and keeps it: changing the process default later changes models
converted later, not this one; :func:`set_kernel_backend` with ``model=`` changes one model.
Every converted model carries the hooks of :mod:`timm_qconv._batched`, whatever its backend.
"""
from __future__ import annotations

from torch import nn

from . import _batched
from ._errors import check_choice, check_module
from ._kernels import BACKENDS, default_backend, set_backend
from ._kernels import use_backend as kernel_backend
from .layers import QuantMixin

__all__ = ["BACKENDS", "get_kernel_backend", "kernel_backend", "set_kernel_backend"]


def set_kernel_backend(backend: str, model: nn.Module | None = None) -> None:
    """Choose the kernels: the process default, or with ``model`` that model's own.

    Args:
        backend: ``"eager"``, ``"compiled"`` or ``"auto"``.
        model: a converted model (all its quantized layers take ``backend``; the batched path is
            added for ``"compiled"``/``"auto"`` and removed for ``"eager"``). ``None``: set the
            process default, used by models converted from now on and by layers of no model.
    """
    check_choice("backend", backend, BACKENDS)
    if model is None:
        set_backend(backend)
        return
    check_module("model", model)
    layers = [m for m in model.modules() if isinstance(m, QuantMixin)]
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no quantized layer; call quantize_model first")
    for layer in layers:
        layer.kernels = backend
    _batched.add_hooks(model, backend)


def get_kernel_backend(model: nn.Module | None = None) -> str:
    """The process default, or with ``model`` the backend its quantized layers were given."""
    if model is None:
        return default_backend()
    check_module("model", model)
    for module in model.modules():
        if isinstance(module, QuantMixin) and module.kernels is not None:
            return module.kernels
    return default_backend()
