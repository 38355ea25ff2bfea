"""``kmeans``: unconstrained levels per group, fitted by Lloyd's algorithm (1-D k-means, Lloyd-Max).

This is the optimal scalar quantizer family: any ``2**n_bits`` values per group. Lloyd's
iterations alternate nearest-level assignment and centroid updates; on sorted weights with prefix
sums (:class:`~timm_qconv._groups.SortedGroups`) each iteration costs ``O(G * L * log N)``.

The start matters at high bit widths, where Lloyd moves slowly: levels start at the quantiles of
the density ``p(w)**(1/3)``, the asymptotically optimal level density (Panter & Dite, 1951).

References: S. P. Lloyd, "Least squares quantization in PCM", 1982; J. Max, "Quantizing for
minimum distortion", 1960.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._errors import check_int
from .._groups import SortedGroups
from ..config import QuantConfig
from .base import Quantizer


def density_init(stats: SortedGroups, n_levels: int, bins: int | None = None) -> Tensor:
    """Sorted starting levels ``(G, L)`` at the quantiles of ``p(w)**(1/3)``, from a histogram."""
    bins = bins or max(4 * n_levels, 64)
    g = torch.arange(stats.n_groups, device=stats.sorted.device)
    lo = stats.sorted[:, 0].double()
    hi = stats.sorted[g, stats.counts - 1].double()
    frac = torch.linspace(0, 1, bins + 1, device=lo.device, dtype=torch.float64)
    edges = lo[:, None] + (hi - lo)[:, None] * frac  # (G, bins + 1)
    n, _, _ = stats.cell_stats(edges[:, 1:-1])  # weights per bin, (G, bins)
    mass = n.clamp_min(0).pow(1.0 / 3.0)
    cum = torch.cat([mass.new_zeros(stats.n_groups, 1), mass.cumsum(1)], 1)  # (G, bins + 1)
    target = (torch.arange(n_levels, device=lo.device, dtype=torch.float64) + 0.5) / n_levels
    target = target[None, :] * cum[:, -1:]
    j = torch.searchsorted(cum.contiguous(), target.contiguous()).clamp(1, bins)  # bin of each target
    c0, c1 = cum.gather(1, j - 1), cum.gather(1, j)
    e0, e1 = edges.gather(1, j - 1), edges.gather(1, j)
    t = torch.where(c1 > c0, (target - c0) / (c1 - c0).clamp_min(1e-300), torch.zeros_like(c0))
    return (e0 + t * (e1 - e0)).float()


def lloyd(stats: SortedGroups, levels: Tensor, n_iter: int) -> Tensor:
    """``n_iter`` Lloyd iterations from sorted ``levels`` (G, L); empty cells keep their level."""
    levels = levels.double()
    for _ in range(n_iter):
        n, s1, _ = stats.nearest_stats(levels)
        levels = torch.where(n > 0, s1 / n.clamp_min(1), levels)
    return levels.float()


def exact_levels(values: Tensor, n_levels: int) -> Tensor:
    """Optimal levels ``(L,)`` for the sorted 1-D ``values`` by dynamic programming, O(L * n**2).

    ``best[e]`` is the least error of splitting ``values[:e]`` into the clusters placed so far; a
    cluster over ``values[j:e]`` costs its squared deviation from its mean, from prefix sums.
    """
    x = values.double()
    n = x.numel()
    c1 = torch.cat([x.new_zeros(1), x.cumsum(0)])
    c2 = torch.cat([x.new_zeros(1), (x * x).cumsum(0)])
    idx = torch.arange(n + 1, device=x.device)
    j, e = idx[:, None], idx[None, :]
    cost = (c2[e] - c2[j]) - (c1[e] - c1[j]) ** 2 / (e - j).clamp_min(1)
    cost = torch.where(e > j, cost.clamp_min(0), torch.full_like(cost, float("inf")))
    best, starts = cost[0], []
    for _ in range(min(n_levels, n) - 1):
        total = best[:, None] + cost  # (j, e): clusters so far end at j, the next covers [j, e)
        value, arg = total.min(0)
        keep = best <= value  # one cluster fewer is already as good
        starts.append(torch.where(keep, torch.full_like(arg, -1), arg))
        best = torch.where(keep, best, value)
    bounds, end = [n], n
    for arg in reversed(starts):  # backtrack the cluster starts
        if int(arg[end]) >= 0:
            end = int(arg[end])
            bounds.append(end)
    bounds = torch.tensor([0, *reversed(bounds)], device=x.device).unique_consecutive()
    sums, counts = c1[bounds[1:]] - c1[bounds[:-1]], (bounds[1:] - bounds[:-1]).double()
    levels = sums / counts
    pad = levels[-1:].expand(n_levels - levels.numel())  # fewer distinct values than levels
    return torch.cat([levels, pad]).float()


def refine_small_groups(stats: SortedGroups, levels: Tensor, budget: int = 2**22) -> Tensor:
    """Replace Lloyd's levels by the exact optimum in groups small enough for :func:`exact_levels`.

    Lloyd's fixed points on a few hundred weights can be 20% worse than the optimum; on large
    groups they are close to it, and the exact solution would cost too much.
    """
    n_levels = levels.shape[1]
    out = levels.clone()
    for g in range(stats.n_groups):
        n = int(stats.counts[g])
        if n * n * n_levels <= budget:
            out[g] = exact_levels(stats.sorted[g, :n], n_levels)
    return out


@dataclass
class KMeansConfig(QuantConfig):
    """Options of ``kmeans``.

    Args:
        init_iters: Lloyd iterations when a layer is created (levels start from its weights).
    """

    init_iters: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("init_iters", self.init_iters, 0)


class KMeansQuantizer(Quantizer):
    """Free, learnable levels per group; each weight takes its nearest level."""

    config_class = KMeansConfig

    def __init__(self, weight: Tensor, config: KMeansConfig, stats: SortedGroups | None = None) -> None:
        super().__init__(weight, config, stats)
        stats = self.weight_stats(weight, stats)
        self.table = nn.Parameter(torch.empty(self.n_groups, config.n_levels, device=weight.device))
        self.fit_(stats, config.init_iters)

    def levels(self) -> Tensor:
        return torch.sort(self.table, dim=1).values

    @torch.no_grad()
    def fit_(self, stats: SortedGroups, n_iter: int, rows: Tensor | None = None) -> None:
        levels = lloyd(stats, density_init(stats, self.config.n_levels), n_iter)
        self.table.copy_(refine_small_groups(stats, levels))
