"""What the report keeps of one quantized layer: its error, its distinct levels, and one channel
group's weights with that group's levels (what the histogram plot shows)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from timm_qconv.plugin_api import quantized_layers

SAMPLE = 20_000  # weights kept per layer for the histogram


@dataclass(frozen=True)
class LayerSnapshot:
    """One layer's quantization at one moment.

    Args:
        name: the layer's name in the model.
        n_bits: its bits per weight.
        rel_error: ``sum((q - w)**2) / sum(w**2)`` over the layer.
        levels: its distinct quantized values over all groups, sorted (on the CPU).
        weight_sample: up to :data:`SAMPLE` of the float weights of its first channel group,
            evenly strided (on the CPU).
        group_levels: the distinct quantized values of that group, at most ``2**n_bits``.
        n_groups: its number of channel groups.
    """

    name: str
    n_bits: int
    rel_error: float
    levels: Tensor
    weight_sample: Tensor
    group_levels: Tensor
    n_groups: int = 1

    @property
    def n_levels(self) -> int:
        return self.levels.numel()

    @classmethod
    def of(cls, name: str, n_bits: int, weight: Tensor, quantized: Tensor, group_index: Tensor) -> "LayerSnapshot":
        """Snapshot a layer from its float and its quantized weight (any device) and the group of
        each output channel."""
        with torch.no_grad():
            w = weight.detach().flatten(1).float()
            q = quantized.detach().flatten(1).float()
            total = float(w.double().pow(2).sum())  # float64: squares of large weights overflow float32
            rel_error = float((q.double() - w.double()).pow(2).sum()) / total if total > 0 else 0.0
            first = (group_index == 0).to(w.device)
            group_w, group_q = w[first].flatten(), q[first].flatten()
            sample = group_w[:: max(1, group_w.numel() // SAMPLE)]
            return cls(name, n_bits, rel_error, torch.unique(q).cpu(), sample.cpu(), torch.unique(group_q).cpu(),
                       int(group_index.max()) + 1)


def from_model(model: nn.Module) -> list[LayerSnapshot]:
    """Every quantized layer of ``model`` (the callback handler's payload holds it already unwrapped)."""
    return [LayerSnapshot.of(name, layer.quant_config.n_bits, layer.weight, layer.eval_quantized_weight(),
                             layer.quantizer.group_index)
            for name, layer in quantized_layers(model)]


def from_bit_quantizer(quantizer: Any) -> list[LayerSnapshot]:
    """Every layer of a fitted :class:`timm_qconv.BitQuantizer`."""
    return [LayerSnapshot.of(name, quantizer.configs[name].n_bits, quantizer.modules[name].weight,
                             quantizer.quantized_weight(name), quantizer.quantizers[name].group_index)
            for name in quantizer.layer_names]
