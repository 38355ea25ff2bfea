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
from .lloyd import density_init, lloyd

# Step of the MSE-optimal uniform quantizer for a unit Gaussian, by number of levels (J. Max, 1960).
_START_SCALES = (0.8, 1.0, 1.25)
_GAUSS_UNIFORM_STEP = {2: 1.596, 4: 0.9957, 8: 0.5860, 16: 0.3352, 32: 0.1881, 64: 0.1041, 128: 0.0569, 256: 0.0308}


def sign_patterns(n_bits: int, device: torch.device | None = None) -> Tensor:
    """All ``2**n_bits`` sign vectors ``(L, n_bits)`` in binary counting order (bit j of l -> s_j)."""
    codes = torch.arange(2**n_bits, device=device)[:, None]
    bits = (codes >> torch.arange(n_bits, device=device)) & 1
    return bits.float() * 2 - 1


def _solve(a: Tensor, b: Tensor) -> Tensor:
    """Solve the small symmetric systems ``a x = b`` (..., n, n), with a tiny ridge for empty patterns."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    ridge = 1e-9 * a.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)[..., None, None]
    return torch.linalg.solve(a + ridge * eye, b[..., None]).squeeze(-1)


def basis_from_levels(levels: Tensor, weight: Tensor, signs: Tensor) -> Tensor:
    """Weighted least-squares basis ``(..., n)`` whose pattern ``p`` best matches ``levels[..., p]``."""
    outer = (signs[:, :, None] * signs[:, None, :]).reshape(signs.shape[0], -1)
    a = (weight @ outer).view(*weight.shape[:-1], signs.shape[1], signs.shape[1])
    return _solve(a, (weight * levels) @ signs)


def qem(stats: SortedGroups, basis: Tensor, signs: Tensor, n_iter: int, prune_after: int = 4,
        tol: float = 1e-7) -> tuple[Tensor, Tensor]:
    """LQ-Nets' alternating fit from ``basis`` (G, S, n): S starts per group, fitted side by side.

    After ``prune_after`` iterations only each group's leading start goes on (the ranking rarely
    changes later), and the loop stops early once no group improves by more than ``tol`` (relative).
    Returns the best basis seen for each group (G, n) and its squared error (G,).
    """
    n_groups, n_starts, n_bits = basis.shape
    basis = basis.double().reshape(-1, n_bits)  # (G*S, n): 2-D products below are single GEMMs
    signs = signs.double()
    outer = (signs[:, :, None] * signs[:, None, :]).reshape(signs.shape[0], -1)  # (L, n*n)
    best = basis.view(n_groups, n_starts, n_bits)[:, 0]
    best_err = torch.full((n_groups,), float("inf"), dtype=torch.float64, device=basis.device)
    for step in range(n_iter + 1):
        levels, order = torch.sort(basis @ signs.T, dim=-1)  # (G*S, L) and each level's pattern
        levels = levels.view(n_groups, n_starts, -1)
        cells = stats.nearest_stats(levels)
        err, start = SortedGroups.cell_error(levels, cells).min(1)
        better = err < best_err
        pick = basis.view(n_groups, n_starts, n_bits)[torch.arange(n_groups, device=basis.device), start]
        best = torch.where(better[:, None], pick, best)
        converged = bool(((best_err - err) <= tol * err).all())
        best_err = torch.where(better, err, best_err)
        if step == n_iter or (converged and n_starts == 1):
            break
        if step == prune_after and n_starts > 1:
            levels, order, cells = _take_start(levels, order, cells, start)
            basis, n_starts = pick, 1
        n, s1, _ = (c.reshape(n_groups * n_starts, -1) for c in cells)
        # Back from sorted order to pattern order, then solve (S^T N S) v = S^T sums.
        n_p = torch.zeros_like(n).scatter_(-1, order, n)
        s_p = torch.zeros_like(s1).scatter_(-1, order, s1)
        basis = _solve((n_p @ outer).view(-1, n_bits, n_bits), s_p @ signs)
    return best.float(), best_err


def _take_start(levels: Tensor, order: Tensor, cells: tuple, start: Tensor) -> tuple:
    """Keep only start ``start[g]`` of each group in the per-start tensors of one QEM iteration."""
    n_groups, n_starts = levels.shape[:2]
    flat = torch.arange(n_groups, device=start.device) * n_starts + start
    rows = torch.arange(n_groups)
    return levels[rows, start][:, None], order[flat], tuple(c[rows, start][:, None] for c in cells)


def _start_shapes(n_bits: int, n_random: int = 8) -> Tensor:
    """Basis shapes to start from (S, n_bits), each scaled so that its largest level is 1.

    Powers of two give a uniform grid; Fibonacci numbers and random shapes give levels that are
    denser near zero, closer to the Lloyd-Max levels of bell-shaped weights. Fixed seed: the fit
    is deterministic.
    """
    powers = 2.0 ** torch.arange(n_bits, dtype=torch.float64)
    fib = [1.0, 2.0]
    while len(fib) < n_bits:
        fib.append(fib[-1] + fib[-2])
    random = torch.rand(n_random, n_bits, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shapes = torch.cat([powers[None], torch.tensor(fib[:n_bits], dtype=torch.float64)[None], random.sort(-1).values])
    return (shapes / shapes.sum(-1, keepdim=True)).float()


def fit_basis(stats: SortedGroups, n_bits: int, n_iter: int) -> Tensor:
    """Fit a basis ``(G, n_bits)`` to sorted weights from several starts, keeping each group's best.

    Alternating minimisation only finds a local optimum, and which start wins depends on the
    weights' distribution, so all starts are fitted side by side (batched, so they cost about the
    same number of operations as one): the shapes of :func:`_start_shapes` at a few sizes around
    the Gaussian-optimal uniform grid, and the Lloyd-Max levels projected onto the ±basis family.
    """
    signs = sign_patterns(n_bits, stats.sorted.device)
    n_levels = 2**n_bits
    top = 0.5 * _GAUSS_UNIFORM_STEP[n_levels] * (n_levels - 1) * stats.rms()  # uniform grid's top level
    shapes = _start_shapes(n_bits).to(top.device)
    scaled = [top[:, None, None] * shapes * f for f in _START_SCALES]
    free = lloyd(stats, density_init(stats, n_levels), max(n_iter, 10))
    n, _, _ = stats.nearest_stats(free)
    projected = basis_from_levels(free.double(), n.clamp_min(1), signs.double()).float()
    starts = torch.cat([*scaled, projected[:, None]], 1)  # (G, S, n)
    return qem(stats, starts, signs, n_iter)[0]


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

    @classmethod
    def batched_levels(cls, quantizers: list[Quantizer]) -> Tensor:
        basis = torch.cat([q.basis for q in quantizers])  # one product and one sort for all layers
        return torch.sort(basis @ quantizers[0].signs.T, dim=1).values

    @torch.no_grad()
    def fit_(self, stats: SortedGroups, n_iter: int, rows: Tensor | None = None) -> None:
        self.basis.copy_(fit_basis(stats, self.config.n_bits, n_iter))

    def _order(self) -> Tensor:
        """Sign pattern of each sorted level, ``(G, L)``."""
        return torch.sort(self.basis.detach() @ self.signs.T, dim=1).indices

    def level_design(self) -> Tensor:
        return self.signs[self._order()]  # sorted level l of group g is signs[pattern] @ basis[g]

    @torch.no_grad()
    def set_level_params_(self, params: Tensor) -> Tensor:
        old = self._order()
        self.basis.copy_(params)
        rank = torch.argsort(self._order(), dim=1)  # new sorted position of every pattern
        return rank.gather(1, old)
