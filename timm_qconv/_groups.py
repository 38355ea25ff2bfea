"""Groups of output channels, and the sorted-weight statistics that make fitting levels cheap.

A layer's weight is viewed as a ``(C, K)`` matrix: one row per output channel. The rows are split
into ``G`` contiguous groups (:func:`group_index`), each with its own quantization levels.

:class:`SortedGroups` sorts each group's weights once and keeps prefix sums of ``w`` and ``w**2``.
After that, the count, sum and sum of squares of the weights falling between any two thresholds
come from two binary searches (and a few weights of one block), so one fitting iteration costs
``O(G * L * log N)`` instead of ``O(N * L)``. This is what makes the post-training fit cost about
one sort.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor


def group_index(n_channels: int, n_groups: int, device: torch.device | None = None) -> Tensor:
    """Group of each output channel: ``n_groups`` contiguous, near-equal runs (sizes differ by at most one)."""
    return torch.arange(n_channels, device=device) * n_groups // n_channels


def as_rows(weight: Tensor) -> Tensor:
    """The weight as a ``(C, K)`` matrix, one row per output channel (a view when possible)."""
    return weight.reshape(weight.shape[0], -1)


def row_chunks(n_rows: int, row_numel: int, chunk_numel: int) -> Iterator[slice]:
    """Slices of consecutive rows of about ``chunk_numel`` elements each (at least one row): what
    large layers are processed in, so that no temporary covers the whole layer."""
    step = max(1, chunk_numel // max(1, row_numel))
    return (slice(start, start + step) for start in range(0, n_rows, step))


def midpoints(levels: Tensor) -> Tensor:
    """Decision thresholds of a nearest-level quantizer with sorted ``levels`` (..., L) -> (..., L-1)."""
    return (levels[..., 1:] + levels[..., :-1]) * 0.5


class SortedGroups:
    """One layer's weights, sorted per group, with float64 prefix sums every :data:`BLOCK` weights.

    Memory is what bounds post-training quantization of the largest models, so the only full-size
    tensor kept is the sorted float32 copy: the float64 sums of ``w`` and ``w**2`` are stored at
    block boundaries (a quarter of the sorted copy's size) and completed within a block from the
    sorted weights themselves when asked (:meth:`prefix_sums`), the same float64 sums as a full
    prefix array. Groups are sorted a few at a time, so the sort's indices never cover the layer.

    Args:
        rows: the ``(C, K)`` weight matrix (any float dtype; statistics are taken in float64).
        n_groups: number of contiguous channel groups.
    """

    BLOCK = 16
    #: Weights read at a time to complete prefix sums (:meth:`prefix_sums`): half a MiB of float64.
    PREFIX_CHUNK = 1 << 16

    def __init__(self, rows: Tensor, n_groups: int) -> None:
        rows = rows.detach()
        n_channels, k = rows.shape
        self.n_groups = n_groups
        channels = torch.bincount(group_index(n_channels, n_groups, rows.device), minlength=n_groups)
        self.counts = channels * k  # weights per group, (G,)
        width = -(-int(self.counts.max()) // self.BLOCK) * self.BLOCK
        # +inf pads each group to a whole number of blocks: it sorts last and is never counted.
        self.sorted = rows.new_full((n_groups, width), float("inf"), dtype=torch.float32)
        firsts, sizes = (torch.cumsum(channels, 0) - channels).tolist(), channels.tolist()
        step = max(1, n_groups // 16)  # groups sorted together: a sixteenth of the layer's indices at once
        g = 0
        while g < n_groups:  # runs of consecutive groups of one size, as (groups, weights) views
            end = g + 1
            while end < min(g + step, n_groups) and sizes[end] == sizes[g]:
                end += 1
            part = rows[firsts[g]:firsts[end - 1] + sizes[end - 1]].reshape(end - g, -1)
            self.sorted[g:end, :part.shape[1]] = torch.sort(part.float(), dim=1).values
            g = end
        n_blocks = width // self.BLOCK
        self.block1 = self.sorted.new_zeros(n_groups, n_blocks + 1, dtype=torch.float64)
        self.block2 = torch.zeros_like(self.block1)
        for g in range(n_groups):  # one group at a time: its float64 copies are the only temporaries
            blocks = self.sorted[g].view(n_blocks, self.BLOCK).double()
            blocks = torch.where(torch.isinf(blocks), 0.0, blocks)
            torch.cumsum(blocks.sum(-1), 0, out=self.block1[g, 1:])
            torch.cumsum(blocks.square_().sum(-1), 0, out=self.block2[g, 1:])

    def prefix_sums(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """Sums of the first ``positions[g, j]`` sorted weights of group ``g`` and of their squares,
        float64, for integer ``positions`` ``(G, Q)`` in ``0..counts[g]``.

        Completing a sum reads the ``BLOCK`` weights of its block, so the positions are taken
        :data:`PREFIX_CHUNK` weights at a time: a fit that scores many candidate levels at once
        (``hash``'s starts: ``Q`` in the hundreds) would otherwise add several megabytes of float64
        temporaries beside the sorted copy, whatever the layer's size."""
        step = max(1, self.PREFIX_CHUNK // (self.n_groups * self.BLOCK))
        if positions.shape[1] <= step:
            return self._prefix_sums(positions)
        sums = positions.new_empty((2, *positions.shape), dtype=torch.float64)
        for start in range(0, positions.shape[1], step):
            part = slice(start, start + step)
            sums[0, :, part], sums[1, :, part] = self._prefix_sums(positions[:, part])
        return sums[0], sums[1]

    def _prefix_sums(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        block, offset = positions.div(self.BLOCK, rounding_mode="floor"), positions.remainder(self.BLOCK)
        within = torch.arange(self.BLOCK, device=positions.device)
        index = (block * self.BLOCK)[..., None] + within  # (G, Q, B): the block's weights
        index = index.clamp_max(self.sorted.shape[1] - 1).reshape(self.n_groups, -1)
        values = self.sorted.gather(1, index).view(*positions.shape, self.BLOCK).double()
        values = torch.where(within < offset[..., None], values, 0.0)  # only those before the position
        return (self.block1.gather(1, block) + values.sum(-1),
                self.block2.gather(1, block) + values.square().sum(-1))

    @property
    def total_sq(self) -> Tensor:
        """Sum of squared weights per group, (G,)."""
        return self.prefix_sums(self.counts[:, None])[1][:, 0]

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
        s1, s2 = (s.view(edges.shape) for s in self.prefix_sums(edges.reshape(self.n_groups, -1)))
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
