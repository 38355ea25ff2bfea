"""Quantization-aware layers: :class:`QuantConv2d` and :class:`QuantLinear`.

Each layer keeps its float weight and owns a :class:`~timm_qconv.methods.base.Quantizer`. The
forward runs the ordinary ``conv2d``/``linear`` on a transformed weight, as timm's ``StdConv2d`` does:

* ``mode="ste"`` (default): the quantized weight is used while training, and the gradient reaches
  the float weight straight through the rounding (Bengio et al., 2013) and the quantizer's
  parameters through the levels.
* ``mode="float"``: the prototype's behaviour; training uses the float weight and the quantizer
  learns only through the hash loss (:meth:`QuantMixin.hash_loss`).

In eval mode both modes use the quantized weight. Forwards that need no gradient (evaluation
under ``torch.no_grad()``) reuse it until the weight or the quantizer changes (see
:mod:`timm_qconv._weight_cache`), so they cost what the float layer costs. A training forward's
graph keeps the quantized weight of thresholded methods as its codes, one byte per weight, and
decodes it in the backward (:mod:`timm_qconv._saved_codes`; under autocast, the weight is cast
before the convolution so that its half-precision copy is kept as codes too); ``"float"`` mode,
``poly`` and the batched compiled path keep their weights as before.

Two plain attributes let code outside the layer steer its next weight without the layer knowing
who does it (the layer imports nothing from the model-level batched path):

* ``weight_override``: a :class:`WeightOverride` holding this layer's quantized weight, already
  computed elsewhere (the batched path computes all of a model's layers before its forward). The
  next training forward takes it, once, if the float weight is still the one it was computed
  from, in the same grad mode and autocast; otherwise the layer computes its weight itself.
* ``kernels``: the kernel backend this layer's own weight computation runs under (``None``: the
  one in force, see :mod:`timm_qconv._kernels`); set per model by ``quantize_model``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._errors import all_finite, check_choice
from ._kernels import get_backend, use_backend
from ._registry import config_owner, make_config
from ._saved_codes import autocast_weight, hooks_free, saved_as_codes
from ._weight_cache import WeightCache, autocast_dtype
from .config import QuantConfig
from .methods.base import Quantizer

MODES = ("ste", "float")


def _forward_context(weight: Tensor) -> tuple:
    """What else a quantized weight depends on: grad mode (its graph) and autocast (its levels)."""
    return torch.is_grad_enabled(), autocast_dtype(weight)


@dataclass
class WeightOverride:
    """A quantized weight computed outside the layer for its next training forward.

    Args:
        quantized: the quantized weight, with its graph where grad is enabled (the layer's shape and dtype).
        source: the float weight parameter it was computed from.
        version: ``source._version`` at that time; an in-place change since makes it stale.
        context: grad mode and autocast at that time; a forward that runs under others (a
            ``torch.no_grad()`` or ``torch.autocast`` block inside the model) computes its own.
    """

    quantized: Tensor
    source: Tensor
    version: int
    context: tuple

    @classmethod
    def of(cls, quantized: Tensor, weight: Tensor) -> "WeightOverride":
        """``quantized``, computed just now from ``weight`` in the current context."""
        return cls(quantized, weight, weight._version, _forward_context(weight))

    def is_current(self, weight: Tensor) -> bool:
        """Whether it was computed from ``weight`` as it is now, in the context in force now."""
        return self.source is weight and weight._version == self.version and self.context == _forward_context(weight)


class QuantMixin:
    """What :class:`QuantConv2d` and :class:`QuantLinear` share; mixed into an ``nn`` layer class."""

    weight: nn.Parameter
    quant_config: QuantConfig
    quantizer: Quantizer | None
    mode: str
    weight_override: WeightOverride | None = None
    kernels: str | None = None
    _float_class: type[nn.Module]

    def _setup_quant(self, method: Any, n_bits: int | None, n_functions: int | None, mode: str, options: dict) -> None:
        self.quant_config = make_config(method, n_bits=n_bits, n_functions=n_functions, **options)
        self.mode = check_choice("mode", mode, MODES)
        self.quantizer = None
        self.weight_cache = WeightCache()
        if not self.weight.is_meta:
            self.reset_quantizer()

    def reset_quantizer(self) -> None:
        """(Re)build the quantizer from the current weight, e.g. after loading pretrained float weights."""
        weight = self.weight.detach()
        if weight.numel() == 0:
            raise ValueError(f"{self._get_name()}({self.extra_repr_float()}) has no weights "
                             f"(shape {tuple(weight.shape)}); "
                             "expected at least one input and one output channel/feature")
        if not all_finite(weight):
            raise ValueError(f"weight of {self._get_name()} {tuple(weight.shape)} has non-finite values; "
                             "cannot quantize it")
        self.quantizer = config_owner(self.quant_config)(weight, self.quant_config)

    def quantized_weight(self) -> Tensor:
        """The weight as used in eval: quantized, with the straight-through gradient.

        A current :attr:`weight_override` stands in for it in a training forward, once, where no
        other saved-tensor hooks are in force.
        """
        override = self.weight_override
        if override is not None:
            self.weight_override = None
            # Under other saved-tensor hooks (non-reentrant checkpointing) the backward may run this
            # forward again, when no override is left: the weight is then computed here both times.
            if self.training and override.is_current(self.weight) and hooks_free():
                return override.quantized
        return self.weight_cache.get(self.weight, self.quantizer, self.compute_weight)

    def compute_weight(self) -> Tensor:
        """The quantized weight with the straight-through gradient, computed now (no cache, no override)."""
        # traced code takes the eager formulation; no ``with`` block where this backend is in force already
        if self.kernels is None or torch.compiler.is_compiling() or self.kernels == get_backend():
            return self.quantizer(self.weight, ste=True)
        with use_backend(self.kernels):
            return self.quantizer(self.weight, ste=True)

    def train(self, mode: bool = True) -> "QuantMixin":
        # Training frees the cached weight; ``train()`` then ``eval()`` is also the way to drop it
        # after an edit that version counters miss (``.data``). ``eval()`` on an eval model keeps it.
        if mode:
            self.weight_cache.clear()
        return super().train(mode)

    def forward_weight(self) -> Tensor:
        """The weight this forward uses: float while training in ``"float"`` mode, else quantized."""
        if self.training and self.mode == "float":
            return self.weight
        return self.quantized_weight()

    def hash_loss(self, wrt_weights: bool = False) -> Tensor:
        """Mean squared error between the quantized and the float weight.

        Differentiable in the quantizer's parameters; with ``wrt_weights=True`` also in the weight,
        pulling each weight towards its level.
        """
        if not wrt_weights:  # this step's forward's error if it is still alive, else one fused pass
            return self.quantizer.squared_error(self.weight) / self.weight.numel()
        return (self.quantizer(self.weight).float() - self.weight.float()).pow(2).mean()

    @torch.no_grad()
    def eval_quantized_weight(self) -> Tensor:
        """The quantized weight as eval mode computes it, whatever mode the layer is in now."""
        was_training = self.quantizer.training
        self.quantizer.eval()
        try:
            return self.quantizer(self.weight)
        finally:
            self.quantizer.train(was_training)

    def to_float(self) -> nn.Module:
        """A plain ``nn`` layer holding the quantized weight (no timm_qconv needed to run or load it)."""
        plain = self._float_class(**_float_kwargs_of(self), device="meta", dtype=self.weight.dtype)
        plain.weight = nn.Parameter(self.eval_quantized_weight(), requires_grad=self.weight.requires_grad)
        plain.bias = self.bias
        plain.train(self.training)
        return plain

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        method: Any = "hash",
        n_bits: int | None = None,
        n_functions: int | None = None,
        mode: str = "ste",
        **options: Any,
    ) -> "QuantMixin":
        """Quantized twin of a plain layer; it shares the layer's weight and bias parameters."""
        if not isinstance(module, cls._float_class):
            raise TypeError(f"module={type(module).__name__} cannot become {cls.__name__}; "
                            f"expected {cls._float_class.__name__}")
        layer = cls(**_float_kwargs_of(module), device="meta", dtype=module.weight.dtype,
                    method=method, n_bits=n_bits, n_functions=n_functions, mode=mode, **options)
        layer.weight = module.weight
        layer.bias = module.bias
        layer.reset_quantizer()
        layer.train(module.training)
        return layer

    def extra_repr_float(self) -> str:
        """The plain layer's ``extra_repr`` (its sizes), for messages."""
        return super().extra_repr()  # type: ignore[misc]

    def extra_repr(self) -> str:
        method = config_owner(self.quant_config).name
        return f"{super().extra_repr()}, method={method}, n_bits={self.quant_config.n_bits}, mode={self.mode}"


def _float_kwargs_of(module: nn.Module) -> dict[str, Any]:
    """Constructor arguments (without device and dtype) that rebuild ``module``'s plain layer."""
    if isinstance(module, nn.Conv2d):
        return dict(
            in_channels=module.in_channels, out_channels=module.out_channels, kernel_size=module.kernel_size,
            stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups,
            bias=module.bias is not None, padding_mode=module.padding_mode,
        )
    if isinstance(module, nn.Linear):
        return dict(in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None)
    raise TypeError(f"module={type(module).__name__} is not an nn.Conv2d or nn.Linear")


class QuantConv2d(QuantMixin, nn.Conv2d):
    """Drop-in ``nn.Conv2d`` whose weight is quantized to ``n_bits`` by ``method``.

    Takes ``nn.Conv2d``'s arguments plus:

    Args:
        method: method name (``"hash"``, ``"linear"``, ``"poly"``, ``"log"``, ``"kmeans"`` or a
            plugin's), a Quantizer class, or a config object.
        n_bits: bits per weight (1..8); ``None`` takes the method's default.
        n_functions: channel groups per layer: the output channels are split into this many groups,
            each with its own levels; ``None`` = the method's default.
        mode: ``"ste"`` or ``"float"`` (see the module docstring).
        **options: the method's own options (its config's fields).
    """

    _float_class = nn.Conv2d

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1, padding: Any = 0,
                 dilation: Any = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device: Any = None, dtype: Any = None, *, method: Any = "hash", n_bits: int | None = None,
                 n_functions: int | None = None, mode: str = "ste", **options: Any) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device=device, dtype=dtype)
        self._setup_quant(method, n_bits, n_functions, mode, options)

    def forward(self, input: Tensor) -> Tensor:
        weight = autocast_weight(self.forward_weight())
        with saved_as_codes(weight):
            return self._conv_forward(input, weight, self.bias)


class QuantLinear(QuantMixin, nn.Linear):
    """Drop-in ``nn.Linear`` whose weight is quantized; the extra arguments are :class:`QuantConv2d`'s."""

    _float_class = nn.Linear

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device: Any = None,
                 dtype: Any = None, *, method: Any = "hash", n_bits: int | None = None,
                 n_functions: int | None = None, mode: str = "ste", **options: Any) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup_quant(method, n_bits, n_functions, mode, options)

    def forward(self, input: Tensor) -> Tensor:
        weight = autocast_weight(self.forward_weight())
        with saved_as_codes(weight):
            return nn.functional.linear(input, weight, self.bias)


QUANT_LAYERS: dict[type[nn.Module], type[QuantMixin]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
