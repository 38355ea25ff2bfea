"""Levels that are a fixed shape times a learnable scale per group: :class:`ScaledShapeQuantizer`.

The base of ``log`` and of plugins such as ``apot``: a subclass only says which sorted shape its
levels have for scale 1 (:meth:`ScaledShapeQuantizer.level_shape`); the scale of each group is
fitted by :func:`fit_scale` and learned in the log domain, so that it stays positive, and bounded
above (:func:`scale_bound`) so that one outlier weight cannot drive the levels to inf.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from .._groups import SortedGroups
from ..config import QuantConfig
from .base import Quantizer

SCALE_HEADROOM = 2.0**10
"""How far above a group's largest weight (when fitted) the scale may grow while training."""
_LOG_TINY = float(torch.log(torch.tensor(torch.finfo(torch.float32).tiny)))
_LOG_HALF_MAX = float(torch.log(torch.tensor(torch.finfo(torch.float32).max))) / 2


def scale_bound(stats: SortedGroups) -> Tensor:
    """Largest allowed log scale per group: ``log(SCALE_HEADROOM * max|w|)``, finite for any finite weights."""
    g = torch.arange(stats.n_groups, device=stats.sorted.device)
    peak = torch.maximum(stats.sorted[:, 0].abs(), stats.sorted[g, stats.counts - 1].abs()).double()
    bound = (peak.clamp_min(torch.finfo(torch.float32).tiny) * SCALE_HEADROOM).log()
    # Below float32's overflow even squared: levels are at most the scale, and the hash loss squares them.
    return bound.clamp_max(_LOG_HALF_MAX).float()


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
        # Learn the scale in the log domain so that it stays positive. Bounded (log_scale_max), so
        # that one outlier weight's huge gradient cannot push exp() to inf and the levels to NaN.
        self.register_buffer("log_scale_max", scale_bound(stats), persistent=False)
        self.log_scale = nn.Parameter(fit_scale(stats, self.shape, config.init_iters).log())

    def levels(self) -> Tensor:
        log_scale = torch.minimum(self.log_scale, self.log_scale_max).clamp_min(_LOG_TINY)
        return log_scale.exp()[:, None] * self.shape

    @torch.no_grad()
    def fit_(self, stats: SortedGroups, n_iter: int, rows: Tensor | None = None) -> None:
        self.log_scale_max.copy_(scale_bound(stats))
        self.log_scale.copy_(fit_scale(stats, self.shape, n_iter).log())

    def level_design(self) -> Tensor:
        return self.shape[None, :, None].expand(self.n_groups, -1, 1)

    #: Calibration also starts from the fitted scale times these, every eighth of an octave from a
    #: quarter below to a half above: one parameter per group makes the alternation of assignment
    #: and refit settle near its start, and the scale that minimises the weight error is not the
    #: one that minimises the output error (log, 2 bits, LeNet-5: starting a quarter octave higher
    #: lowered every layer's output error by 15-30%; eighths instead of quarters found lower ones
    #: still, and 91.80% instead of 91.42% on 5,000 other training images).
    CALIBRATION_SCALES = tuple(2 ** (eighths / 8) for eighths in (-2, -1, 1, 2, 3, 4))

    def calibration_starts(self) -> list[Quantizer]:
        starts = []
        for factor in self.CALIBRATION_SCALES:
            start = copy.deepcopy(self)
            with torch.no_grad():
                start.log_scale.add_(math.log(factor))
            starts.append(start)
        return starts

    @torch.no_grad()
    def set_level_params_(self, params: Tensor) -> Tensor:
        """New scales; a group whose solution is not positive keeps its scale (the shape's order needs s > 0)."""
        scale = params[:, 0].float()
        self.log_scale.copy_(torch.where(scale > 0, scale.clamp_min(1e-30).log(), self.log_scale))
        return torch.arange(self.shape.numel(), device=params.device).expand(params.shape[0], -1).clone()
