"""``linear``: linear thresholding, the prototype's first alternative to the hash.

Each group's range ``[min, max]`` is cut into ``2**n_bits`` equal buckets; every bucket's value is
a learnable parameter (started at the mean of the weights that fall in it). While training, the
range is re-read from the weights at every forward; in eval it is the last one seen, so a frozen
or exported layer keeps the thresholds it was trained with.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._groups import SortedGroups
from ..config import QuantConfig
from .base import Quantizer


@dataclass
class LinearConfig(QuantConfig):
    """Options of ``linear`` (only the shared ones)."""


class LinearQuantizer(Quantizer):
    """Learnable bucket values over linearly spaced thresholds from each group's min to max."""

    config_class = LinearConfig
    nearest = False

    def __init__(self, weight: Tensor, config: LinearConfig, stats: SortedGroups | None = None) -> None:
        super().__init__(weight, config, stats)
        g = self.n_groups
        self.register_buffer("low", weight.new_zeros(g, dtype=torch.float32))
        self.register_buffer("high", weight.new_zeros(g, dtype=torch.float32))
        fractions = torch.arange(1, config.n_levels, device=weight.device) / config.n_levels
        self.register_buffer("fractions", fractions, persistent=False)
        self.values = nn.Parameter(weight.new_zeros(g, config.n_levels, dtype=torch.float32))
        self.fit_(self.weight_stats(weight, stats), 1)

    def thresholds(self) -> Tensor:
        """Bucket edges ``(G, L-1)`` between each group's ``low`` and ``high``."""
        return self.low[:, None] + (self.high - self.low)[:, None] * self.fractions

    def levels(self) -> Tensor:
        return self.values

    @torch.no_grad()
    def observe(self, rows: Tensor) -> None:
        """Re-read each group's range from the ``(C, K)`` weights."""
        rows = rows.detach().float()
        lo, hi = rows.amin(1), rows.amax(1)  # two reductions: torch.aminmax(dim=1) is ~10x slower on a CPU
        self.low.fill_(float("inf")).scatter_reduce_(0, self.group_index, lo.to(self.low.dtype), "amin")
        self.high.fill_(float("-inf")).scatter_reduce_(0, self.group_index, hi.to(self.high.dtype), "amax")

    @torch.no_grad()
    def fit_(self, stats: SortedGroups, n_iter: int, rows: Tensor | None = None) -> None:
        """Range from the weights, then each bucket's value at its mean (centre if empty): one step is optimal."""
        g = torch.arange(stats.n_groups, device=stats.sorted.device)
        self.low.copy_(stats.sorted[:, 0])
        self.high.copy_(stats.sorted[g, stats.counts - 1])
        edges = self.thresholds()
        n, s1, _ = stats.cell_stats(edges)
        bounds = torch.cat([self.low[:, None], edges, self.high[:, None]], 1)
        centres = (bounds[:, 1:] + bounds[:, :-1]) * 0.5
        self.values.copy_(torch.where(n > 0, s1 / n.clamp_min(1), centres.double()).float())

    def level_design(self) -> Tensor:
        return self.free_level_design(self.values)

    @torch.no_grad()
    def set_level_params_(self, params: Tensor) -> Tensor:
        """New bucket values; the thresholds stay (they decide codes only when re-encoding)."""
        self.values.copy_(params)
        return torch.arange(params.shape[1], device=params.device).expand_as(params).clone()
