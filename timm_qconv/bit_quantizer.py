"""Post-training quantization: fit every layer's levels to its trained weights, no data needed.

Each layer's weights are sorted once per group; the method then fits its levels with prefix-sum
iterations (least squares for ``hash``, Lloyd-Max for ``kmeans``) whose cost does not grow with the
number of weights, and a final binary-search pass writes every weight's code. The whole pass
costs about one sort of the weights.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._errors import check_device, check_int, check_module
from ._groups import SortedGroups, as_rows, row_chunks
from ._registry import config_owner, make_config
from .config import QuantConfig
from .convert import check_finite, layer_configs
from .methods.base import Quantizer
from .plugins import call_hook
from .report import LayerReport, QuantReport
from .selection import FilterFn, LayerSelection


class BitQuantizer:
    """Fit few-bit levels to a trained model's Conv2d (and, when asked, Linear) weights.

    Args:
        model: the trained model; it is never modified.
        n_functions: channel groups per layer: the output channels are split into this many
            groups, each with its own levels (the prototype's "hash functions", ``n_fs``;
            ``None``: the method's default, 32).
        n_bits: bits per weight, 1..8.
        avoid: module names or glob patterns to leave in float.
        layers: layer kinds to quantize, ``"conv"`` and/or ``"linear"`` (``None``: convs only;
            see :class:`~timm_qconv.selection.LayerSelection`).
        method: ``"hash"`` (LQ-Nets basis), ``"kmeans"`` (free levels), or any registered method.
        device: where to fit (``None``: each layer's own device). CPU and CUDA both work.
        verbose: show a progress bar over the layers.
        skip_first_last: leave the stem conv and the classifier in float.
        filter_fn: ``filter_fn(module, name) -> bool``; only layers it accepts are quantized.
        n_fs: the prototype's name for ``n_functions`` (give one of the two).
        **options: the method's own options.

    Plugins may keep a layer in float or change its options (hook ``layer_quant_config``,
    decided here, in the constructor; ``configs`` holds each layer's), and receive every pass's
    report (hook ``after_bit_quantizer``).

    Example::

        bq = BitQuantizer(model, 32, 4, avoid=["fc"])
        bq.train_hash_functions(n_iter=50)
        hashed = bq.get_hashed_model()
        print(bq.report())
    """

    def __init__(
        self,
        model: nn.Module,
        n_functions: int | None = None,
        n_bits: int = 4,
        avoid: Iterable[str] | str = (),
        layers: Any = None,
        method: Any = "hash",
        device: str | torch.device | None = None,
        verbose: bool = False,
        *,
        skip_first_last: bool = False,
        filter_fn: FilterFn | None = None,
        n_fs: int | None = None,
        **options: Any,
    ) -> None:
        device = check_device("device", device)
        if n_fs is not None and n_functions is not None:
            raise TypeError(f"n_functions={n_functions!r} and n_fs={n_fs!r}: give one (n_fs is its old name)")
        n_functions = n_fs if n_fs is not None else n_functions
        self.config = make_config(method, n_bits=n_bits, n_functions=n_functions, **options)
        self.method = config_owner(self.config)
        self.model = model
        self.selection = LayerSelection(layers, avoid, skip_first_last, filter_fn)
        self.configs: dict[str, QuantConfig] = layer_configs(model, self.selection.select(check_module("model", model)),
                                                             self.config)
        self.layer_names = list(self.configs)
        modules = dict(model.named_modules())
        self.modules: dict[str, nn.Module] = {name: modules[name] for name in self.layer_names}
        check_finite(self.modules, self.layer_names)
        self.device = device
        self.verbose = bool(verbose)
        self.quantizers: dict[str, Quantizer] = {}
        #: uint8 (C, K) codes that nearest-level encoding would not give (calibration's); every
        #: other layer's are recomputed when asked (:meth:`layer_codes`): kept for every layer,
        #: they would cost a quarter of the model's float32 size
        self.codes: dict[str, Tensor] = {}
        self._fitted: dict[str, tuple[int, int]] = {}  # each weight's (version, data pointer) when fitted
        #: state-dict tensors other than the quantized weights that calibration changed (biases, BatchNorm statistics)
        self.overrides: dict[str, Tensor] = {}
        self._report: QuantReport | None = None

    def _rows(self, module: nn.Module) -> Tensor:
        weight = module.weight.detach()
        return as_rows(weight.to(self.device or weight.device, torch.float32))

    @torch.no_grad()
    def train_hash_functions(self, n_iter: int = 50) -> "BitQuantizer":
        """Fit every layer's levels with ``n_iter`` iterations, then encode its weights."""
        check_int("n_iter", n_iter, 1)
        check_finite(self.modules, self.layer_names)  # again: the weights may have changed since __init__
        quantizers, reports = {}, []
        items = tqdm(self.modules.items(), desc=f"{self.method.name} {self.config.n_bits}-bit",
                     unit="layer", disable=not self.verbose)
        for name, module in items:
            config = self.configs[name]
            rows = self._rows(module)
            stats = SortedGroups(rows, min(config.n_functions, rows.shape[0]))  # the one sort
            if "init_iters" in config.field_names():  # the constructor's own fit is the fit
                quantizer = config_owner(config)(rows, dataclasses.replace(config, init_iters=n_iter), stats=stats)
            else:
                quantizer = config_owner(config)(rows, config, stats=stats)
                quantizer.fit_(stats, n_iter, rows=rows)
            del stats  # before encoding: the layer's sorted copy is the largest temporary of the fit
            quantizer.eval()
            quantizers[name] = quantizer
            sq_error, sq_norm = _squared_error(quantizer, rows, quantizer.encode_uint8(rows))
            reports.append(LayerReport(name, tuple(module.weight.shape), config.n_bits, quantizer.n_groups,
                                       sq_error, sq_norm))
        self.quantizers, self.codes, self._report = quantizers, {}, QuantReport(reports)
        self._fitted = {name: _identity(module.weight) for name, module in self.modules.items()}
        self.overrides = {}
        call_hook("after_bit_quantizer", quantizer=self, report=self._report)
        return self

    def calibrate(self, loader: Iterable, n_samples: int = 512, **options: Any) -> "BitQuantizer":
        """Refine the fitted layers with calibration inputs, to minimise each layer's output error.

        Layer by layer, on the inputs of the already quantized earlier layers: GPTQ-style assignment
        of the weights to the group's levels, least-squares refit of the levels within the method's
        family, bias correction, then BatchNorm re-estimation (:mod:`timm_qconv.calibrate`).
        The model is not modified; on any error this quantizer is left as it was.

        Args:
            loader: an iterable of batches: a tensor, or a tuple/list whose first item is the input
                (a ``DataLoader`` of ``(images, labels)`` works as it is). Labels are not used.
            n_samples: how many inputs to use, >= 1 (the first ones).
            **options: fields of :class:`~timm_qconv.calibrate.CalibrationConfig` (``rounds``,
                ``bias_correction``, ``bn_reestimate``...).
        """
        from .calibrate import CalibrationConfig, calibrate

        self._require_fit()
        config = CalibrationConfig(n_samples=n_samples, **options)
        quantizers, codes, overrides, report = calibrate(self, loader, config)
        self.quantizers, self.codes, self.overrides, self._report = quantizers, codes, overrides, report
        call_hook("after_bit_quantizer", quantizer=self, report=self._report)
        return self

    def _require_fit(self) -> None:
        if not self.quantizers:
            raise RuntimeError("call train_hash_functions() first")

    @torch.no_grad()
    def layer_codes(self, name: str) -> Tensor:
        """Layer ``name``'s uint8 ``(C, K)`` codes: calibration's, else its weights' nearest levels.

        Raises ``RuntimeError`` when the layer's weight changed since it was fitted: its codes
        would no longer be those of the fit (fit again).
        """
        self._require_fit()
        if name in self.codes:
            return self.codes[name]
        weight = self.modules[name].weight
        if _identity(weight) != self._fitted[name]:
            raise RuntimeError(f"layer {name!r}'s weight changed after train_hash_functions(); "
                               "call train_hash_functions() again to quantize the new weights")
        return self.quantizers[name].encode_uint8(self._rows(self.modules[name]))

    @torch.no_grad()
    def quantized_weight(self, name: str) -> Tensor:
        """Layer ``name``'s quantized weight, in the layer's own shape, dtype and device."""
        weight = self.modules[name].weight
        q = self.quantizers[name].decode(self.layer_codes(name).long())
        return q.view(weight.shape).to(weight.device, weight.dtype)

    def get_hashed_model(self) -> nn.Module:
        """A copy of the model whose quantized layers hold their quantized weights (plain layers)."""
        self._require_fit()
        hashed = copy.deepcopy(self.model)
        modules = dict(hashed.named_modules())
        for name in self.layer_names:
            modules[name].weight.data = self.quantized_weight(name)
        tensors = dict(hashed.named_parameters()) | dict(hashed.named_buffers())
        for key, value in self.overrides.items():
            tensors[key].data = value.to(tensors[key].device, tensors[key].dtype).clone()
        return hashed

    def report(self) -> QuantReport:
        """Per-layer relative error and SQNR of the last fit (prints as a table)."""
        self._require_fit()
        return self._report


def _identity(weight: Tensor) -> tuple[int, int]:
    """What changes when a weight is edited in place (its version) or replaced (its storage)."""
    return weight._version, weight.data_ptr()


def _squared_error(quantizer: Quantizer, rows: Tensor, codes: Tensor,
                   chunk_numel: int = 1 << 16) -> tuple[float, float]:
    """``sum((q - w)**2)`` and ``sum(w**2)`` in float64 (squares of weights near 1e20 and above
    overflow float32), a few rows at a time: no (C, K) float64 temporary."""
    error = norm = 0.0
    for part in row_chunks(*rows.shape, chunk_numel):
        exact = rows[part].double()
        q = quantizer.decode(codes[part].long(), part).double()
        error += float((q - exact).square().sum())
        norm += float(exact.square().sum())
    return error, norm
