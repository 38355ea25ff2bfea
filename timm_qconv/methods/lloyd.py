"""Lloyd-Max helpers shared by the methods that place free levels (``kmeans``, ``hash``'s start, ``poly``).

Both work on weights sorted per group (:class:`~timm_qconv.plugin_api.SortedGroups`), so an iteration
costs ``O(G * L * log N)`` whatever the number of weights.

References: S. P. Lloyd, "Least squares quantization in PCM", 1982; J. Max, "Quantizing for
minimum distortion", 1960; P. F. Panter and W. Dite, "Quantization distortion in pulse-count
modulation with nonuniform spacing of levels", 1951 (the ``p(w)**(1/3)`` level density).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._groups import SortedGroups


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
