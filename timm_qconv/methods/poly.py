"""``poly``: polynomial hashing, the prototype's second alternative to the hash.

Each group has ``2**n_bits`` buckets with fixed values (Lloyd-Max levels of the initial weights).
Every bucket also has a learnable second-degree polynomial ``a*u**2 + b*u + c`` of the normalised
weight ``u = w / rms``; a softmax over the polynomials' values divided by a temperature assigns each
weight to a bucket. Training uses the soft assignment (a weighted mean of the bucket values), so
the polynomials learn from the task loss; eval takes the argmax. Lower the temperature over
training (:meth:`PolyQuantizer.set_temperature`) to close the gap between the two.

The polynomials start as ``2*u*v - v**2`` for bucket value ``v``, whose argmax is the nearest
bucket. The soft assignment costs ``O(N * 2**n_bits)`` memory while training, so it suits few bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._errors import check_float, check_int
from .._groups import SortedGroups
from ..config import QuantConfig
from .base import Quantizer
from .lloyd import density_init, lloyd


@dataclass
class PolyConfig(QuantConfig):
    """Options of ``poly``.

    Args:
        temperature: softmax temperature of the soft assignment while training (> 0).
        init_iters: Lloyd iterations that place the fixed bucket values.
    """

    temperature: float = 0.05
    init_iters: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_float("temperature", self.temperature)
        check_int("init_iters", self.init_iters, 0)


class PolyQuantizer(Quantizer):
    """Fixed bucket values; learnable quadratic scores decide each weight's bucket."""

    config_class = PolyConfig
    nearest = False
    thresholded = False

    def __init__(self, weight: Tensor, config: PolyConfig, stats: SortedGroups | None = None) -> None:
        super().__init__(weight, config, stats)
        g, n_levels = self.n_groups, config.n_levels
        self.register_buffer("values", weight.new_zeros(g, n_levels, dtype=torch.float32))
        self.register_buffer("scale", weight.new_ones(g, dtype=torch.float32))
        self.register_buffer("temperature", torch.tensor(float(config.temperature), device=weight.device))
        self.coef = nn.Parameter(weight.new_zeros(g, n_levels, 3, dtype=torch.float32))
        self.fit_(self.weight_stats(weight, stats), config.init_iters)

    def set_temperature(self, temperature: float) -> None:
        """Change the training softmax temperature (for annealing)."""
        self.temperature.fill_(check_float("temperature", temperature))

    def levels(self) -> Tensor:
        return self.values

    def scores(self, rows: Tensor) -> Tensor:
        """Polynomial value of every bucket at every weight, ``(C, K, L)``."""
        u = (rows.detach().float() / self.scale[self.group_index, None])[..., None]
        a, b, c = self.coef[self.group_index].unbind(-1)  # each (C, L)
        return (a[:, None] * u + b[:, None]) * u + c[:, None]

    def encode(self, rows: Tensor) -> Tensor:
        return self.scores(rows).argmax(-1)

    def quantize_rows(self, rows: Tensor) -> Tensor:
        if not self.training:
            return super().quantize_rows(rows)
        weights = torch.softmax(self.scores(rows) / self.temperature, dim=-1)
        return (weights * self.values[self.group_index, None]).sum(-1)

    @torch.no_grad()
    def fit_(self, stats: SortedGroups, n_iter: int, rows: Tensor | None = None) -> None:
        """Bucket values at the Lloyd-Max levels; polynomials reset to nearest-bucket scores."""
        values = lloyd(stats, density_init(stats, self.config.n_levels), n_iter)
        scale = stats.rms().clamp_min(torch.finfo(torch.float32).tiny)
        v = values / scale[:, None]
        self.values.copy_(values)
        self.scale.copy_(scale)
        self.coef.copy_(torch.stack([torch.zeros_like(v), 2 * v, -v * v], -1))

    def level_design(self) -> Tensor:
        return self.free_level_design(self.values)

    @torch.no_grad()
    def set_level_params_(self, params: Tensor) -> Tensor:
        """New bucket values, and polynomials reset to nearest-bucket scores for them."""
        self.values.copy_(params)
        v = params.float() / self.scale[:, None]
        self.coef.copy_(torch.stack([torch.zeros_like(v), 2 * v, -v * v], -1))
        return torch.arange(params.shape[1], device=params.device).expand_as(params).clone()
