"""Groups of output channels, and the sorted-weight statistics that make fitting levels cheap.

A layer's weight is viewed as a ``(C, K)`` matrix: one row per output channel. The rows are split
into ``G`` contiguous groups (:func:`group_index`), each with its own quantization levels.

:class:`SortedGroups` sorts each group's weights once and keeps prefix sums of ``w`` and ``w**2``.
After that, the count, sum and sum of squares of the weights falling between any two thresholds
come from two binary searches, so one fitting iteration costs ``O(G * L * log N)`` instead of
``O(N * L)``. This is what makes the post-training fit cost about one sort.
"""
from __future__ import annotations

import torch
from torch import Tensor


def group_index(n_channels: int, n_groups: int, device: torch.device | None = None) -> Tensor:
    """Group of each output channel: ``n_groups`` contiguous, near-equal runs (sizes differ by at most one)."""
    return torch.arange(n_channels, device=device) * n_groups // n_channels


def as_rows(weight: Tensor) -> Tensor:
    """The weight as a ``(C, K)`` matrix, one row per output channel (a view when possible)."""
    return weight.reshape(weight.shape[0], -1)


def midpoints(levels: Tensor) -> Tensor:
    """Decision thresholds of a nearest-level quantizer with sorted ``levels`` (..., L) -> (..., L-1)."""
    return (levels[..., 1:] + levels[..., :-1]) * 0.5


class SortedGroups:
    """One layer's weights, sorted per group, with float64 prefix sums.

    Args:
        rows: the ``(C, K)`` weight matrix (any float dtype; statistics are taken in float64).
        n_groups: number of contiguous channel groups.
    """

    def __init__(self, rows: Tensor, n_groups: int) -> None:
        rows = rows.detach().float()
        n_channels, k = rows.shape
        self.n_groups = n_groups
        gidx = group_index(n_channels, n_groups, rows.device)
        channels = torch.bincount(gidx, minlength=n_groups)
        self.counts = channels * k  # weights per group, (G,)
        if n_channels % n_groups == 0:
            padded = rows.reshape(n_groups, -1)
        else:  # uneven split: pad each group's row with +inf; the padding sorts last and is never counted
            width = int(channels.max()) * k
            padded = rows.new_full((n_groups, width), float("inf"))
            first = torch.cumsum(channels, 0) - channels
            col = (torch.arange(n_channels, device=rows.device) - first[gidx]) * k
            cols = col[:, None] + torch.arange(k, device=rows.device)
            padded[gidx[:, None].expand(-1, k), cols] = rows
        self.sorted = torch.sort(padded, dim=1).values
        valid = self.sorted.double()
        if n_channels % n_groups != 0:
            valid = torch.where(torch.isinf(valid), torch.zeros_like(valid), valid)
        zero = valid.new_zeros(n_groups, 1)
        self.cum1 = torch.cat([zero, valid.cumsum(1)], 1)
        self.cum2 = torch.cat([zero, (valid * valid).cumsum(1)], 1)

    @property
    def total_sq(self) -> Tensor:
        """Sum of squared weights per group, (G,)."""
        return self.cum2[torch.arange(self.n_groups, device=self.cum2.device), self.counts]

    def rms(self) -> Tensor:
        """Root mean square of each group's weights, (G,)."""
        return (self.total_sq / self.counts.clamp_min(1)).sqrt().float()

    def cell_stats(self, thresholds: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Count, sum and sum of squares of the weights in each cell cut by sorted ``thresholds``.

        Args:
            thresholds: ``(G, ..., L-1)``, ascending along the last dimension; the middle
                dimensions evaluate several candidate threshold sets at once. Cell ``l`` holds the
                weights with ``thresholds[l-1] < w <= thresholds[l]``, the layers' tie rule.
        Returns:
            three ``(G, ..., L)`` float64 tensors.
        """
        shape = thresholds.shape
        flat = thresholds.reshape(self.n_groups, -1).float().contiguous()
        pos = torch.searchsorted(self.sorted, flat, right=True)
        pos = torch.minimum(pos, self.counts[:, None]).view(shape)
        ends = self.counts.view((-1,) + (1,) * (len(shape) - 1)).expand(*shape[:-1], 1)
        edges = torch.cat([torch.zeros_like(ends), pos, ends], -1)
        flat_edges = edges.reshape(self.n_groups, -1)
        s1 = self.cum1.gather(1, flat_edges).view(edges.shape)
        s2 = self.cum2.gather(1, flat_edges).view(edges.shape)
        return edges.diff(dim=-1).double(), s1.diff(dim=-1), s2.diff(dim=-1)

    def nearest_stats(self, levels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`cell_stats` for the nearest-level assignment to sorted ``levels`` (G, ..., L)."""
        return self.cell_stats(midpoints(levels))

    @staticmethod
    def cell_error(levels: Tensor, stats: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """Squared error when cell ``l`` is quantized to ``levels[..., l]`` -> ``levels.shape[:-1]``, float64."""
        n, s1, s2 = stats
        lv = levels.double()
        return (s2 - 2 * lv * s1 + lv * lv * n).sum(-1)

    def nearest_error(self, levels: Tensor) -> Tensor:
        """Squared error of rounding to the nearest of sorted ``levels`` (G, ..., L) -> (G, ...)."""
        return self.cell_error(levels, self.nearest_stats(levels))
