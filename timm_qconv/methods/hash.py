"""``hash``: the learned-basis quantizer of LQ-Nets (the default method).

Each group of output channels has a basis ``v`` of ``n_bits`` real numbers; its ``2**n_bits``
levels are all the sums ``sum_j s_j * v_j`` with signs ``s_j = ±1``. A weight's code is the sign
pattern of its nearest level, found by binary search among the sorted levels' midpoints.

The basis is fitted by LQ-Nets' alternating "quantization error minimisation": assign each weight
to its nearest level, then solve the ``n_bits x n_bits`` least-squares problem for the basis. On
sorted weights both steps need only per-level counts and sums, which come from prefix sums.

Reference: D. Zhang, J. Yang, D. Ye, G. Hua, "LQ-Nets: Learned Quantization for Highly Accurate
and Compact Deep Neural Networks", ECCV 2018.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._errors import check_int
from .._groups import SortedGroups
from ..config import QuantConfig
from .base import Quantizer
from .kmeans import density_init, lloyd

# Step of the MSE-optimal uniform quantizer for a unit Gaussian, by number of levels (J. Max, 1960).
_GAUSS_UNIFORM_STEP = {2: 1.596, 4: 0.9957, 8: 0.5860, 16: 0.3352, 32: 0.1881, 64: 0.1041, 128: 0.0569, 256: 0.0308}


def sign_patterns(n_bits: int, device: torch.device | None = None) -> Tensor:
    """All ``2**n_bits`` sign vectors ``(L, n_bits)`` in binary counting order (bit j of l -> s_j)."""
    codes = torch.arange(2**n_bits, device=device)[:, None]
    bits = (codes >> torch.arange(n_bits, device=device)) & 1
    return bits.float() * 2 - 1


def basis_from_levels(levels: Tensor, weight: Tensor, signs: Tensor) -> Tensor:
    """Weighted least-squares basis ``(G, n)`` whose pattern ``p`` best matches ``levels[:, p]``."""
    a = torch.einsum("gl,li,lj->gij", weight, signs, signs)
    b = torch.einsum("gl,gl,li->gi", weight, levels, signs)
    return (torch.linalg.pinv(a) @ b[..., None]).squeeze(-1)


def qem(stats: SortedGroups, basis: Tensor, signs: Tensor, n_iter: int) -> tuple[Tensor, Tensor]:
    """LQ-Nets' alternating fit from ``basis`` (G, n); returns the best basis seen and its error (G,)."""
    basis = basis.double()
    signs = signs.double()
    best, best_err = basis, torch.full((stats.n_groups,), float("inf"), dtype=torch.float64, device=basis.device)
    for step in range(n_iter + 1):
        raw = basis @ signs.T  # (G, L), level of each pattern
        levels, order = torch.sort(raw, dim=1)
        stats_l = stats.nearest_stats(levels)
        err = SortedGroups.cell_error(levels, stats_l)
        better = err < best_err
        best = torch.where(better[:, None], basis, best)
        best_err = torch.where(better, err, best_err)
        if step == n_iter:
            break
        n, s1, _ = stats_l
        # Back from sorted order to pattern order, then solve (S^T N S) v = S^T sums.
        n_p = torch.zeros_like(n).scatter_(1, order, n)
        s_p = torch.zeros_like(s1).scatter_(1, order, s1)
        a = torch.einsum("gl,li,lj->gij", n_p, signs, signs)
        b = s_p @ signs
        basis = (torch.linalg.pinv(a) @ b[..., None]).squeeze(-1)
    return best.float(), best_err


def fit_basis(stats: SortedGroups, n_bits: int, n_iter: int) -> Tensor:
    """Fit a basis ``(G, n_bits)`` to sorted weights, from two starts, keeping each group's better one.

    Start 1 is the Gaussian-optimal uniform grid scaled to the group's RMS (basis ``a * 2**j``).
    Start 2 projects the Lloyd-Max levels (the unconstrained optimum) onto the ±basis family.
    """
    signs = sign_patterns(n_bits, stats.sorted.device)
    n_levels = 2**n_bits
    half_step = 0.5 * _GAUSS_UNIFORM_STEP[n_levels] * stats.rms()
    uniform = half_step[:, None] * (2.0 ** torch.arange(n_bits, device=half_step.device)).float()
    free = lloyd(stats, density_init(stats, n_levels), max(n_iter, 10))
    n, _, _ = stats.nearest_stats(free)
    projected = basis_from_levels(free.double(), n.clamp_min(1), signs.double()).float()
    basis_u, err_u = qem(stats, uniform, signs, n_iter)
    basis_p, err_p = qem(stats, projected, signs, n_iter)
    return torch.where((err_p < err_u)[:, None], basis_p, basis_u)


@dataclass
class HashConfig(QuantConfig):
    """Options of ``hash``.

    Args:
        init_iters: basis-fitting iterations when a layer is created (from its own weights).
    """

    init_iters: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("init_iters", self.init_iters, 0)


class HashQuantizer(Quantizer):
    """LQ-Nets learned basis: levels are the ±combinations of ``n_bits`` learnable numbers per group."""

    config_class = HashConfig

    def __init__(self, weight: Tensor, config: HashConfig, stats: SortedGroups | None = None) -> None:
        super().__init__(weight, config, stats)
        self.register_buffer("signs", sign_patterns(config.n_bits, weight.device), persistent=False)
        stats = self.weight_stats(weight, stats)
        self.basis = nn.Parameter(fit_basis(stats, config.n_bits, config.init_iters))

    def levels(self) -> Tensor:
        return torch.sort(self.basis @ self.signs.T, dim=1).values

    @torch.no_grad()
    def fit_(self, stats: SortedGroups, n_iter: int, rows: Tensor | None = None) -> None:
        self.basis.copy_(fit_basis(stats, self.config.n_bits, n_iter))
