"""The hash loss of a model: the mean squared quantization error of each quantized layer, summed.

A layer's own term is :meth:`~timm_qconv.layers.QuantMixin.hash_loss`. For a model with the
batched path (:mod:`timm_qconv._batched`, compiled kernels), the layers it covers are summed from
per-level statistics gathered in one pass over their weights, which give the same value and
gradient in closed form (:func:`loss_from_level_stats`); the other layers are summed one by one.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._batched import batched_path
from .layers import QuantMixin


def loss_from_level_stats(levels: Tensor, stats: Tensor, inv_numel: Tensor) -> Tensor:
    """Sum over groups of the hash loss, from per-level statistics.

    Args:
        levels: the groups' levels ``(G, L)``, with their graph.
        stats: per group, each level's weight count ``(G, L)``, weight sum ``(G, L)`` and the
            group's squared error ``(G, 1)``, concatenated ``(G, 2L + 1)``, computed at ``levels``.
        inv_numel: per group, one over the number of weights of its layer (the loss is a mean).
    Returns:
        the value of the summed per-layer losses (weights held fixed), whose gradient in the
        levels is ``2 * (count * level - sum)`` per level, as the direct formula's.
    """
    frozen = levels.detach()
    n_levels = levels.shape[1]
    count, weight_sum, error = stats[:, :n_levels], stats[:, n_levels:-1], stats[:, -1]
    per_group = error + (2 * (count * frozen - weight_sum) * (levels - frozen)).sum(1)
    return (per_group * inv_numel).sum()


def hash_loss(model: nn.Module, wrt_weights: bool = False) -> Tensor:
    """Sum of the quantized layers' hash losses (mean squared quantization error of each).

    Args:
        model: a model with quantized layers (see :func:`~timm_qconv.quantize_model`).
        wrt_weights: also differentiate in the float weights, pulling each towards its level
            (always computed layer by layer).
    Raises:
        ValueError: the model has no quantized layer.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantMixin)]
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no quantized layer; call quantize_model first")
    path = None if wrt_weights else batched_path(model)
    batched = [] if path is None else path.level_stats(model)
    covered = {id(layer) for batch, _, _ in batched for layer in batch.layers}
    losses = [m.hash_loss(wrt_weights) for m in layers if id(m) not in covered]
    if batched:
        terms = [loss_from_level_stats(levels, stats, batch.inv_numel) for batch, levels, stats in batched]
        losses.append(sum(terms[1:], terms[0]))
    return torch.stack(losses).sum()
