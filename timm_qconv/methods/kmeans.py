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
from .lloyd import density_init, lloyd


def _dp_levels(counts: Tensor, sums: Tensor, squares: Tensor, n_levels: int) -> Tensor:
    """Optimal levels ``(B, L)`` for B rows of m sorted weighted points, by dynamic programming.

    Each point has a count, a sum and a sum of squares ``(B, m)``. ``best[:, e]`` is the least error
    of splitting the first ``e`` points into the clusters placed so far; a cluster over points
    ``j..e-1`` costs its squared deviation from its mean. O(L * m**2) per row, rows batched.
    """
    rows, m = counts.shape
    zero = counts.new_zeros(rows, 1, dtype=torch.float64)
    c0, c1, c2 = (torch.cat([zero, t.double().cumsum(1)], 1) for t in (counts, sums, squares))
    j = torch.arange(m + 1, device=counts.device)
    size = c0[:, None, :] - c0[:, :, None]  # (B, j, e)
    cost = (c2[:, None, :] - c2[:, :, None]) - (c1[:, None, :] - c1[:, :, None]) ** 2 / size.clamp_min(1e-300)
    cost = torch.where((j[None, :, None] < j[None, None, :]) & (size > 0), cost.clamp_min(0), torch.inf)
    best, starts = cost[:, 0], []
    for _ in range(min(n_levels, m) - 1):
        value, arg = (best[:, :, None] + cost).min(1)  # the next cluster is [j, e)
        keep = best <= value  # one cluster fewer is already as good
        starts.append(torch.where(keep, -1, arg))
        best = torch.where(keep, best, value)
    end = torch.full((rows,), m, device=counts.device)
    bounds = [end]
    for arg in reversed(starts):  # backtrack the cluster starts; -1: no new cluster here
        start = arg.gather(1, end[:, None]).squeeze(1)
        end = torch.where(start >= 0, start, end)
        bounds.append(end)
    bounds.append(torch.zeros_like(end))
    edges = torch.stack(bounds[::-1], 1)  # (B, k + 1), ascending; repeated edges = empty clusters
    n = c0.gather(1, edges).diff(dim=1)
    levels = torch.where(n > 0, c1.gather(1, edges).diff(dim=1) / n.clamp_min(1e-300), torch.inf)
    levels = torch.sort(levels, dim=1).values
    top = torch.where(torch.isinf(levels), -torch.inf, levels).amax(1, keepdim=True)
    levels = torch.where(torch.isinf(levels), top, levels)  # empty clusters repeat the top level
    pad = top.expand(rows, n_levels - levels.shape[1])  # fewer points than levels
    return torch.cat([levels, pad], 1).float()


def exact_levels(values: Tensor, n_levels: int) -> Tensor:
    """The exact 1-D k-means levels ``(L,)`` of the sorted ``values``, by dynamic programming."""
    x = values.double()[None]
    return _dp_levels(torch.ones_like(x), x, x * x, n_levels)[0]


def coarse_exact_init(stats: SortedGroups, n_levels: int, bins: int) -> Tensor:
    """Start levels ``(G, L)``: the exact optimum of each group summarised as ``bins`` runs of
    equally many sorted weights. Lloyd from there avoids the local optima that a density-based
    start falls into on groups of a few thousand weights."""
    frac = torch.linspace(0, 1, bins + 1, device=stats.sorted.device, dtype=torch.float64)
    edges = (frac[None, :] * stats.counts[:, None]).round().long()  # (G, bins + 1)
    n, s1, s2 = (t.diff(dim=1) for t in (edges.double(), *stats.prefix_sums(edges)))
    return _dp_levels(n, s1, s2, n_levels)


def refine_small_groups(stats: SortedGroups, levels: Tensor, budget: int = 2**22) -> Tensor:
    """Replace Lloyd's levels by the exact optimum in groups small enough for the exact program.

    Lloyd's fixed points on a few hundred weights can be 20% worse than the optimum; on large
    groups they are close to it, and the exact solution would cost too much.
    """
    n_levels = levels.shape[1]
    out = levels.clone()
    for n in stats.counts.unique().tolist():  # groups of one size are solved together
        if n * n * n_levels > budget:
            continue
        rows = (stats.counts == n).nonzero().squeeze(1)
        chunk = max(1, 2**23 // (n + 1) ** 2)  # bounds the (rows, n+1, n+1) cost tensor to 64 MB
        for part in rows.split(chunk):
            x = stats.sorted[part, :n].double()
            out[part] = _dp_levels(torch.ones_like(x), x, x * x, n_levels)
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
        n_levels = self.config.n_levels
        levels = lloyd(stats, density_init(stats, n_levels), n_iter)
        if n_levels <= 16:  # where Lloyd's local optima cost the most, and the coarse program is cheap
            other = lloyd(stats, coarse_exact_init(stats, n_levels, 8 * n_levels), n_iter)
            better = stats.nearest_error(other) < stats.nearest_error(levels)
            levels = torch.where(better[:, None], other, levels)
        self.table.copy_(refine_small_groups(stats, levels))

    def level_design(self) -> Tensor:
        return self.free_level_design(self.table)

    @torch.no_grad()
    def set_level_params_(self, params: Tensor) -> Tensor:
        values, order = torch.sort(params.float(), dim=1)
        self.table.copy_(values)
        return torch.argsort(order, dim=1)
