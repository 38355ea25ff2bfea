"""``log``: logarithmic quantization, levels ``0`` and ``±s * 2**-k`` with a fitted scale per group.

With ``n_bits`` bits, one bit is the sign and the rest index ``2**(n_bits-1) - 1`` powers of two
below the scale ``s`` plus zero (``2**n_bits - 1`` levels). One bit means ``{-s, +s}``. Multiplying
by such a weight is a shift. The scale is fitted like a one-dimensional least-squares basis:
nearest-level assignment, then ``s = sum(c * w) / sum(c**2)`` over the codes ``c``, started from
several points of one octave because the error is not convex in ``s``.

Reference: "A Deep Look into Logarithmic Quantization of Model Parameters in Neural Networks",
IAIT 2018; D. Miyashita, E. Lee, B. Murmann, "Convolutional Neural Networks using Logarithmic
Data Representation", 2016.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._errors import check_int
from .._groups import SortedGroups
from ..config import QuantConfig
from .base import Quantizer


def log_shape(n_bits: int, device: torch.device | None = None) -> Tensor:
    """Sorted level shape for scale 1: ``[-1, 1]`` for one bit, else ``0`` and ``±2**-k``."""
    if n_bits == 1:
        return torch.tensor([-1.0, 1.0], device=device)
    mags = 2.0 ** -torch.arange(2 ** (n_bits - 1) - 1, device=device, dtype=torch.float32)
    return torch.cat([-mags, mags.new_zeros(1), mags.flip(0)])


def fit_scale(stats: SortedGroups, shape: Tensor, n_iter: int, starts: int = 8) -> Tensor:
    """Least-squares scale per group (G,) for levels ``s * shape``: the best of ``starts`` starts in one octave."""
    g = torch.arange(stats.n_groups, device=stats.sorted.device)
    peak = torch.maximum(stats.sorted[:, 0].abs(), stats.sorted[g, stats.counts - 1].abs()).double()
    peak = peak.clamp_min(torch.finfo(torch.float32).tiny)
    shape = shape.double()
    factors = 2.0 ** (-torch.arange(starts, dtype=torch.float64, device=peak.device) / starts)
    scale = peak[:, None] * factors  # (G, S): S candidate scales per group, fitted side by side
    for step in range(n_iter + 1):
        levels = scale[..., None] * shape  # (G, S, L)
        cells = stats.nearest_stats(levels)
        if step == n_iter:
            break
        n, s1, _ = cells
        new = (s1 * shape).sum(-1) / (n * shape * shape).sum(-1).clamp_min(1e-300)
        scale = torch.where(new > 0, new, scale)
    err = SortedGroups.cell_error(levels, cells)
    return scale.gather(1, err.argmin(1, keepdim=True)).squeeze(1).float()


@dataclass
class LogConfig(QuantConfig):
    """Options of ``log``.

    Args:
        init_iters: scale-fitting iterations when a layer is created.
    """

    init_iters: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("init_iters", self.init_iters, 0)


class ScaledShapeQuantizer(Quantizer):
    """Levels are a fixed sorted shape times a learnable scale per group (fitted by :func:`fit_scale`).

    Subclasses give the shape through :meth:`level_shape`; their config needs ``init_iters``.
    """

    def level_shape(self, config: QuantConfig, device: torch.device) -> Tensor:
        """The sorted levels for scale 1, ``(L,)`` with ``L <= 2**n_bits``."""
        raise NotImplementedError

    def __init__(self, weight: Tensor, config: QuantConfig, stats: SortedGroups | None = None) -> None:
        super().__init__(weight, config, stats)
        self.register_buffer("shape", self.level_shape(config, weight.device), persistent=False)
        stats = self.weight_stats(weight, stats)
        # Learn the scale in the log domain so that it stays positive.
        self.log_scale = nn.Parameter(fit_scale(stats, self.shape, config.init_iters).log())

    def levels(self) -> Tensor:
        return self.log_scale.exp()[:, None] * self.shape

    @torch.no_grad()
    def fit_(self, stats: SortedGroups, n_iter: int, rows: Tensor | None = None) -> None:
        self.log_scale.copy_(fit_scale(stats, self.shape, n_iter).log())


class LogQuantizer(ScaledShapeQuantizer):
    """Sign times power-of-two levels plus zero, with a learnable scale per group."""

    config_class = LogConfig

    def level_shape(self, config: LogConfig, device: torch.device) -> Tensor:
        return log_shape(config.n_bits, device)
