"""Whole-model conversion: pick layers, swap them for quantized ones, freeze them back to plain ones.

:func:`quantize_model` works in place, in two phases: it selects and builds every replacement
first, and swaps modules only when all of them were built, so a bad argument or a bad layer leaves
the model exactly as it was. Plugins take part through hooks: ``layer_quant_config`` decides each
layer during the first phase; ``before_quantize``/``after_quantize`` and ``before_freeze``/
``after_freeze`` surround the changes.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from torch import nn

from . import _batched
from ._errors import all_finite, check_choice, check_module
from ._kernels import BACKENDS, default_backend
from ._registry import make_config
from .backend import set_kernel_backend
from .config import QuantConfig
from .layers import MODES, QUANT_LAYERS, QuantMixin
from .loss import hash_loss  # noqa: F401  (its home is loss.py; still importable from here)
from .plugins import call_hook
from .selection import FilterFn, LayerSelection


def plan_quantization(
    model: nn.Module,
    layers: Any = None,
    avoid: Any = (),
    skip_first_last: bool = False,
    filter_fn: FilterFn | None = None,
) -> list[str]:
    """Names of the layers :func:`quantize_model` selects, in module order (nothing is changed).

    The arguments are :class:`~timm_qconv.selection.LayerSelection`'s. Plugins'
    ``layer_quant_config`` decisions come after this; see :func:`layer_configs`.
    """
    check_module("model", model)
    return LayerSelection(layers, avoid, skip_first_last, filter_fn).select(model)


def _decide(name: str, module: nn.Module, config: QuantConfig) -> QuantConfig | None:
    """One layer's config after the plugins' ``layer_quant_config`` hook; ``None`` keeps it float."""
    decision = call_hook("layer_quant_config", name=name, module=module, config=config)
    if decision is None:
        return config
    if decision is False:
        return None
    if not isinstance(decision, (dict, QuantConfig)):
        raise TypeError(f"layer_quant_config returned {decision!r} for layer {name!r}; expected None, False, "
                        f"a QuantConfig or a dict of {type(config).__name__} fields")
    try:
        return make_config(decision) if isinstance(decision, QuantConfig) else make_config(config, **decision)
    except (TypeError, ValueError) as error:
        raise type(error)(f"layer_quant_config returned {decision!r} for layer {name!r}: {error}") from error


def layer_configs(model: nn.Module, names: Sequence[str], config: QuantConfig) -> dict[str, QuantConfig]:
    """Each layer's config once plugins had their say (``layer_quant_config``); nothing is changed.

    Args:
        model: the model the layers belong to.
        names: the selected layers, e.g. from :func:`plan_quantization`.
        config: the config every layer gets unless a plugin decides otherwise.
    Returns:
        ``{name: config}`` in the order of ``names``, without the layers plugins keep in float.
    Raises:
        ValueError: plugins keep every layer in float.
    """
    modules = dict(model.named_modules())
    decided = {name: _decide(name, modules[name], config) for name in names}
    configs = {name: c for name, c in decided.items() if c is not None}
    if not configs:
        raise ValueError(f"plugins' layer_quant_config kept every selected layer of {type(model).__name__} "
                         f"in float ({len(names)} layers); nothing is left to quantize")
    return configs


def check_finite(modules: dict[str, nn.Module], names: Iterable[str]) -> None:
    """Raise, naming the layer, if a layer to be quantized has no weights, or NaN or inf weights."""
    for name in names:
        if modules[name].weight.numel() == 0:
            shape = tuple(modules[name].weight.shape)
            raise ValueError(f"layer {name!r} ({modules[name]}) has no weights (shape {shape}); "
                             f"expected at least one input and one output channel, or pass avoid=[{name!r}]")
        if not all_finite(modules[name].weight.detach()):
            raise ValueError(f"layer {name!r} has non-finite weights (NaN or inf); fix them or pass avoid=[{name!r}]")


def _set_everywhere(model: nn.Module, replacements: dict[int, nn.Module]) -> None:
    """Swap modules by identity under every parent that holds them (shared modules included)."""
    for parent in model.modules():
        # _modules, not named_children(): the latter skips a module held twice by the same parent.
        for child_name, child in list(parent._modules.items()):
            new = replacements.get(id(child))
            if new is not None:
                setattr(parent, child_name, new)


def quantize_model(
    model: nn.Module,
    method: Any = "hash",
    n_bits: int | None = None,
    n_functions: int | None = None,
    layers: Any = None,
    avoid: Any = (),
    skip_first_last: bool = False,
    mode: str = "ste",
    filter_fn: FilterFn | None = None,
    kernels: str | None = None,
    **options: Any,
) -> nn.Module:
    """Replace the model's Conv2d (and, when asked, Linear) layers with quantized ones, in place.

    Args:
        model: any ``nn.Module``, timm models included.
        method: a method name (see :func:`~timm_qconv.list_methods`), Quantizer class or config.
        n_bits: bits per weight, 1..8 (``None``: the method's default).
        n_functions: channel groups per layer: the output channels are split into this many
            groups, each with its own levels (``None``: the method's default).
        layers: layer kinds to quantize: ``"conv"``, ``"linear"`` or both (or the classes);
            ``None``: convs only.
        avoid: module names or glob patterns to leave in float (a name covers its submodules).
        skip_first_last: leave the stem conv and the classifier in float (timm's ``pretrained_cfg``
            ``first_conv``/``classifier`` when the model has them).
        mode: ``"ste"`` or ``"float"`` training, see :mod:`timm_qconv.layers`.
        filter_fn: ``filter_fn(module, name) -> bool``; only layers it accepts are quantized.
        kernels: the kernel backend this model's layers use, ``"eager"``, ``"compiled"`` or
            ``"auto"`` (``None``: the process default, see :mod:`timm_qconv.backend`).
        **options: the method's own options.
    Returns:
        the same model object, converted. Plugins may keep a layer in float or change its options
        (hook ``layer_quant_config``); each layer's options are its ``quant_config``.
    """
    config = make_config(method, n_bits=n_bits, n_functions=n_functions, **options)
    check_choice("mode", mode, MODES)
    kernels = default_backend() if kernels is None else check_choice("kernels", kernels, BACKENDS)
    selection = LayerSelection(layers, avoid, skip_first_last, filter_fn)
    chosen = selection.select(check_module("model", model))
    modules = dict(model.named_modules())
    check_finite(modules, chosen)  # everything is checked before anything is built
    call_hook("before_quantize", model=model, config=config)
    configs = layer_configs(model, chosen, config)
    replacements = {}
    for fqn, layer_config in configs.items():
        module = modules[fqn]
        replacements[id(module)] = QUANT_LAYERS[type(module)].from_float(module, method=layer_config, mode=mode)
    _set_everywhere(model, replacements)
    set_kernel_backend(kernels, model)
    call_hook("after_quantize", model=model, layers=list(configs))
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantMixin]]:
    """``(name, layer)`` for every quantized layer of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantMixin)]


def freeze_model(model: nn.Module) -> nn.Module:
    """Replace every quantized layer by a plain ``nn.Conv2d``/``nn.Linear`` holding its quantized weight.

    In place; returns the model. The result runs and loads without timm_qconv installed.
    """
    check_module("model", model)
    call_hook("before_freeze", model=model)
    if isinstance(model, QuantMixin):
        model = model.to_float()
    else:
        _set_everywhere(model, {id(m): m.to_float() for _, m in quantized_layers(model)})
        _batched.remove_hooks(model)
    call_hook("after_freeze", model=model)
    return model
