"""One layer's output-aware quantization: input statistics, GPTQ assignment, least-squares level refit.

A layer's output on input columns ``x`` is ``W x`` (im2col columns for a conv). Replacing ``W`` by
``Q`` costs ``sum_x |(W - Q) x|^2 = tr((W - Q) H (W - Q)^T)`` with ``H = sum_x x x^T``, so ``H``
(``K x K``, one per conv group) is all the data a layer needs; :class:`InputStats` accumulates it.

* :func:`gptq_codes` assigns every weight to one of its group's levels column by column, spreading
  each column's rounding error over the columns not yet quantized through ``H^-1`` (the Optimal
  Brain Quantizer update of Frantar & Alistarh, 2022, in the blocked Cholesky form of GPTQ,
  Frantar et al., ICLR 2023), instead of rounding each weight to its nearest level.
* :func:`refit_levels` then solves, for fixed codes, the least-squares problem for the levels in
  the method's own family (``Quantizer.level_design``): the output error is quadratic in the
  levels, and the levels are linear in the method's parameters (a basis for ``hash``, free values
  for ``kmeans``, a scale for ``log``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._groups import midpoints
from .methods.base import Quantizer


class InputStats:
    """Second moments of one layer's input columns ``x`` (quantized model) and ``f`` (float model).

    ``H = sum x x^T`` and ``C = sum f x^T``, ``(B, K, K)``; the means of both, ``(B, K)``; and
    ``sum |W f|^2`` for the float weight ``W``. ``B`` is the layer's number of conv groups (1 for
    Linear), ``K`` the inputs of one output. Without float inputs ``f = x``. Accumulated in float64
    from float32 products, one batch at a time.
    """

    def __init__(self, layer: nn.Module, rows: Tensor) -> None:
        self.layer = layer
        self.n_blocks = layer.groups if isinstance(layer, nn.Conv2d) else 1
        self.w = blocks(rows, self.n_blocks)
        k, device = rows.shape[1], rows.device
        self.h = torch.zeros(self.n_blocks, k, k, dtype=torch.float64, device=device)
        self.cross: Tensor | None = None
        self.sum = torch.zeros(self.n_blocks, k, dtype=torch.float64, device=device)
        self.sum_float = torch.zeros_like(self.sum)
        self.ref = 0.0
        self.count = 0
        #: moments about the means: the error left once a bias absorbs the mean shift (bias correction)
        self.centered = False
        self._cache: dict[tuple, Tensor | float] = {}  # derived matrices, valid until the next add()

    def _cached(self, key: str, compute: Any) -> Any:
        full_key = (key, self.centered, self.count)
        if full_key not in self._cache:
            self._cache[full_key] = compute()
        return self._cache[full_key]

    def columns(self, x: Tensor) -> Tensor:
        """The layer's input as ``(B, K, n)`` columns, float32."""
        layer = self.layer
        x = x.float()
        if isinstance(layer, nn.Conv2d):
            if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
                x = F.pad(x, layer._reversed_padding_repeated_twice, mode=mode)
                padding = 0
            else:
                padding = layer.padding
            cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
            n, bk, p = cols.shape
            k = bk // self.n_blocks
            return cols.view(n, self.n_blocks, k, p).permute(1, 2, 0, 3).reshape(self.n_blocks, k, n * p)
        return x.reshape(-1, x.shape[-1]).T[None]

    def add(self, x: Tensor, x_float: Tensor | None = None) -> None:
        """Add a batch of inputs ``x`` and, if given, the float model's inputs for the same samples."""
        cols = self.columns(x.to(self.h.device))
        self.h += torch.bmm(cols, cols.transpose(1, 2))  # float32 products added into float64
        self.sum += cols.sum(2)
        self.count += cols.shape[2]
        fcols = cols if x_float is None else self.columns(x_float.to(self.h.device))
        if x_float is not None:
            if self.cross is None:
                self.cross = torch.zeros_like(self.h)
            self.cross += torch.bmm(fcols, cols.transpose(1, 2))
        self.sum_float += fcols.sum(2)
        self.ref += float(torch.bmm(self.w, fcols).double().pow(2).sum())

    def mean(self) -> Tensor:
        return (self.sum / max(self.count, 1)).float()

    def mean_float(self) -> Tensor:
        return (self.sum_float / max(self.count, 1)).float()

    def _h(self) -> Tensor:
        return self._cached("h", self._compute_h)

    def _compute_h(self) -> Tensor:
        h = self.h / max(self.count, 1)
        if self.centered:
            mean = self.sum / max(self.count, 1)
            h = h - mean[:, :, None] * mean[:, None, :]
        return h

    def _cross(self) -> Tensor:
        if self.cross is None:
            return self._h()
        return self._cached("cross", self._compute_cross)

    def _compute_cross(self) -> Tensor:
        cross = self.cross / max(self.count, 1)
        if self.centered:
            n = max(self.count, 1)
            cross = cross - (self.sum_float / n)[:, :, None] * (self.sum / n)[:, None, :]
        return cross

    def gram(self) -> Tensor:
        """``H`` per column (about the mean if ``centered``), float32 ``(B, K, K)``."""
        return self._cached("gram", lambda: self._h().float())

    def reference(self) -> float:
        """``sum |W f|^2`` per column (about the mean if ``centered``): the float output's energy."""
        return self._cached("reference", self._compute_reference)

    def _compute_reference(self) -> float:
        ref = self.ref / max(self.count, 1)
        if self.centered:
            ref -= float(torch.bmm(self.w.double(), (self.sum_float / max(self.count, 1))[..., None]).pow(2).sum())
        return ref

    def target(self, damp: float) -> Tensor:
        """Weights ``(B, R, K)`` whose output on ``x`` best matches the float layer's on ``f``: ``W C H^-1``.

        Quantizing towards them with ``H`` minimises ``sum |W f - Q x|^2``, the error relative to the
        float model rather than to this layer alone, so a layer can undo part of the earlier
        layers' error (asymmetric calibration, as in GPTAQ, Li et al., 2025). ``W`` without float inputs.
        """
        if self.cross is None:
            return self.w
        # W C H^-1 = W + W (C - H) H^-1: damping the inverse shrinks the correction towards W itself.
        # H and C come from ``count`` columns; with few columns per input (a Linear layer sees one per
        # sample), their estimate is noisy, so the damping grows with K / count.
        h = self._h()
        chol = damped_cholesky(h, damp + h.shape[-1] / max(self.count, 1))
        w = self.w.float()
        rhs = ((self._cross() - h).transpose(1, 2).float() @ w.transpose(1, 2))  # (C - H)^T W^T, (B, K, R)
        return w + torch.cholesky_solve(rhs, chol).transpose(1, 2)

    def error(self, q: Tensor) -> float:
        """``sum |W f - Q x|^2`` per column for quantized weights ``q`` ``(B, R, K)``.

        Written around the float weights, ``|W f - Q x|^2 = const + tr((W - Q) H (W - Q)^T)
        + 2 <W (H - C), Q>``, so that the one product per call (``K^2`` per row) is of the small
        difference ``W - Q`` and float32 loses nothing that matters; the rest is computed once.
        """
        const, drift = self._cached("error_terms", self._error_terms)
        d = self.w.float() - q.float()
        quad = float((torch.bmm(d, self.gram()).double() * d.double()).sum())
        return const + quad + 2 * float((drift * q.double()).sum())

    def _error_terms(self) -> tuple[float, Tensor]:
        w = self.w.float()
        const = self.reference() - float((torch.bmm(w, self.gram()).double() * w.double()).sum())
        if self.cross is None:
            return const, torch.zeros_like(self.w, dtype=torch.float64)
        # H - C is small (the float and quantized inputs are close): formed in float64 before the product
        return const, torch.bmm(w, (self._h() - self._cross()).float()).double()


def blocks(rows: Tensor, n_blocks: int) -> Tensor:
    """``(C, K)`` rows as ``(B, C / B, K)``: the output channels of each conv group."""
    return rows.reshape(n_blocks, rows.shape[0] // n_blocks, rows.shape[1])


def damped_cholesky(h: Tensor, damp: float) -> Tensor:
    """Lower Cholesky factor of ``H + damp * mean(diag H) * I`` per block ``(B, K, K)``, float32.

    Inputs that are always zero get a unit diagonal (their weights cannot change the output).
    Float32, as GPTQ: the ``K^3`` factorisations dominate the cost of large layers (``K = 4608``).
    """
    h = h.float().clone()
    diag = h.diagonal(dim1=1, dim2=2)
    dead = diag <= 0
    diag[dead] = 1.0
    diag += damp * diag.mean(1, keepdim=True)
    for extra in (0.0, 1e-4, 1e-2, 1.0):  # raise the damping if H is numerically not positive definite
        eye = torch.eye(h.shape[1], dtype=h.dtype, device=h.device)
        chol, info = torch.linalg.cholesky_ex(h + extra * diag.mean(1)[:, None, None] * eye)
        if not bool(info.any()):
            break
    else:
        raise RuntimeError("the layer's input second moments are not positive definite even with heavy damping")
    return chol


def inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1 = U^T U`` per block ``(B, K, K)``.

    With ``J`` the order reversal and ``J H J = M M^T`` (lower ``M``), ``H = R R^T`` for the upper
    ``R = J M J``, so ``H^-1 = R^-T R^-1`` and ``U = R^-1``: one Cholesky factorisation and one
    triangular inverse, where inverting ``H`` and factorising the inverse would take three such steps.
    """
    upper = damped_cholesky(h.flip(1, 2), damp).flip(1, 2)
    eye = torch.eye(h.shape[-1], dtype=upper.dtype, device=upper.device).expand_as(upper)
    return torch.linalg.solve_triangular(upper, eye, upper=True)


def gptq_factor(h: Tensor, act_order: bool, damp: float) -> tuple[Tensor | None, Tensor]:
    """The column order (``None``: as is) and the upper Cholesky factor of the damped ``H^-1`` in
    that order: what :func:`gptq_codes` needs, computed once per layer for all rounds."""
    perm = torch.argsort(h.diagonal(dim1=1, dim2=2), dim=1, descending=True) if act_order else None
    return perm, inverse_cholesky(permuted(h, perm), damp)


def row_tables(quantizer: Quantizer, n_blocks: int) -> tuple[Tensor, Tensor]:
    """Each output channel's levels sorted ``(B, R, L)`` and the code of each sorted level ``(B, R, L)``."""
    values, order = torch.sort(quantizer.levels().detach().float(), dim=1)
    idx = quantizer.group_index
    return blocks(values[idx], n_blocks), blocks(order[idx], n_blocks)


def gptq_codes(w: Tensor, factor: tuple[Tensor | None, Tensor], tables: Tensor, codes_of: Tensor,
               block: int = 128) -> Tensor:
    """Codes ``(B, R, K)`` from GPTQ's column-by-column rounding with error feedback.

    Args:
        w: weights ``(B, R, K)``.
        factor: from :func:`gptq_factor`: the column order (GPTQ's ``act_order``: the largest
            inputs first) and the Cholesky factor of the damped ``H^-1`` (``percdamp``).
        tables: each row's sorted levels ``(B, R, L)``; ``codes_of`` maps a sorted level to its code.
        block: columns per lazy batch update.
    """
    n_blocks, n_rows, k = w.shape
    perm, u = factor
    w = w.float().clone()
    if perm is not None:
        w = w.gather(2, perm[:, None, :].expand_as(w))
    mids = midpoints(tables).contiguous()
    picked = torch.empty(w.shape, dtype=torch.long, device=w.device)
    inverse_diagonal = u.diagonal(dim1=1, dim2=2).reciprocal()[:, None, :]  # (B, 1, K)
    for start in range(0, k, block):
        stop = min(start + block, k)
        wb = w[..., start:stop].clone()
        errors = torch.empty_like(wb)
        ub = u[:, None, start:stop, start:stop]
        for j in range(stop - start):  # few ops per column: this loop runs once per weight column
            col = wb[..., j : j + 1].contiguous()
            c = torch.searchsorted(mids, col)
            err = torch.sub(col, tables.gather(2, c), out=errors[..., j : j + 1])
            err.mul_(inverse_diagonal[..., start + j : start + j + 1])
            wb[..., j + 1 :].addcmul_(err, ub[:, :, j, j + 1 :], value=-1)
            picked[..., start + j : start + j + 1] = c
        if stop < k:
            w[..., stop:] -= torch.bmm(errors, u[:, start:stop, stop:])
    if perm is not None:
        picked = torch.empty_like(picked).scatter_(2, perm[:, None, :].expand_as(picked), picked)
    return codes_of.gather(2, picked)


def permuted(h: Tensor, perm: Tensor | None) -> Tensor:
    """``h[b][perm[b]][:, perm[b]]`` for every block."""
    if perm is None:
        return h
    b = torch.arange(h.shape[0], device=h.device)[:, None, None]
    return h[b, perm[:, :, None], perm[:, None, :]]


def refit_levels(quantizer: Quantizer, w: Tensor, codes: Tensor, h: Tensor, ridge: float = 1e-6) -> Tensor | None:
    """Least-squares refit of the quantizer's level parameters for fixed ``codes`` (in place).

    Minimises ``sum_b tr((w_b - Q_b) h_b (w_b - Q_b)^T)`` with ``Q[r, k] = levels[g(r), codes[r, k]]``
    and ``levels[g] = D[g] @ params[g]`` (``Quantizer.level_design``); a small ridge towards the current
    levels keeps unused levels where they were. Returns the codes after the levels' reordering, or
    ``None`` if the method has no linear design (nothing changed).
    """
    design = quantizer.level_design()
    if design is None:
        return None
    n_blocks, n_rows, k = w.shape
    n_groups, n_levels, n_params = design.shape
    # The normal equations in the parameters: a = sum_r E_r^T H E_r and y = sum_r E_r^T H w_r, where
    # E_r = D[g(r)][codes[r]] (K x P) is the design row of each weight's level. Working with E
    # rather than the one-hot of the codes (K x L) costs C K^2 P, not C K^2 L: 2 vs 4 for a 2-bit
    # hash basis, 1 vs 2**n - 1 for log's scale.
    a = torch.zeros(n_groups, n_params, n_params, dtype=torch.float64, device=w.device)
    y = torch.zeros(n_groups, n_params, dtype=torch.float64, device=w.device)
    group = blocks(quantizer.group_index[:, None], n_blocks)[..., 0]  # (B, R)
    design32 = design.float()
    chunk = max(1, 2**22 // (k * n_params))  # bounds E and its product with H to 16 MB each
    for b in range(n_blocks):
        for rows in torch.arange(n_rows, device=w.device).split(chunk):
            r, g = rows.numel(), group[b, rows]
            e = design32[g].gather(1, codes[b, rows, :, None].expand(r, k, n_params))  # (r, K, P)
            # One (K, K) x (K, r*P) product: as r broadcast products with P columns each, it would
            # read H once per row, memory-bound and ~20x slower on a CPU for a 4608-input conv.
            he = (h[b] @ e.permute(1, 0, 2).reshape(k, r * n_params)).view(k, r, n_params).transpose(0, 1)
            a.index_add_(0, g, torch.matmul(e.transpose(1, 2), he).double())
            y.index_add_(0, g, torch.einsum("rkp,rk->rp", he, w[b, rows].float()).double())
    d = design.double()
    current = quantizer.levels().detach().double()
    dtd = d.transpose(1, 2) @ d
    lam = ridge * (a.diagonal(dim1=1, dim2=2).sum(1) / dtd.diagonal(dim1=1, dim2=2).sum(1)).clamp_min(1e-30)
    a = a + lam[:, None, None] * dtd
    y = y + lam[:, None] * (d.transpose(1, 2) @ current[..., None]).squeeze(-1)
    params = torch.linalg.solve(a, y[..., None]).squeeze(-1)
    remap = quantizer.set_level_params_(params.float())
    return remap[group[..., None].expand_as(codes), codes]
