"""``apot``: additive powers-of-two levels, ``±s * (p_0 + ... + p_{n-1})`` with a fitted scale per group.

One bit is the sign; the other ``m = n_bits - 1`` bits are split into ``n`` terms of at most
``base_bits`` bits each. Term ``i`` with ``k`` bits takes a value from
``{0, 2**-i, 2**-(i+n), ..., 2**-(i+(2**k-2)*n)}``; the exponents of different terms never meet,
so the ``2**m`` sums are distinct. The sums are normalised to a maximum of 1 and scaled by the
group's scale ``s`` (the paper's clipping threshold), which gives ``2**n_bits - 1`` levels.
Compared with ``log`` (one power of two per level), the levels are denser near the largest
weights; a multiplication is still ``n`` shifts and adds.

The scale is fitted like ``log``'s: nearest-level assignment, then the least-squares scale, from
several starts (:func:`timm_qconv.plugin_api.fit_scale`). It is learnable in the log domain.

Reference: Y. Li, X. Dong, W. Wang, "Additive Powers-of-Two Quantization: An Efficient
Non-uniform Discretization for Neural Networks", ICLR 2020.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from timm_qconv.plugin_api import MAX_BITS, QuantConfig, ScaledShapeQuantizer, check_int


def apot_shape(n_bits: int, base_bits: int = 2, device: torch.device | None = None) -> Tensor:
    """Sorted levels for scale 1, ``(2**n_bits - 1,)``: ``[-1, 1]`` for one bit, else ``0`` and ``±`` sums.

    Args:
        n_bits: bits per weight, sign included.
        base_bits: bits per additive term (the paper's ``k``); the last term takes what is left.
    """
    if n_bits == 1:
        return torch.tensor([-1.0, 1.0], device=device)
    magnitude_bits = n_bits - 1
    widths = [base_bits] * (magnitude_bits // base_bits)
    if magnitude_bits % base_bits:
        widths.append(magnitude_bits % base_bits)
    n_terms = len(widths)
    sums = torch.zeros(1, dtype=torch.float64)
    for i, k in enumerate(widths):
        term = torch.tensor([0.0] + [2.0 ** -(i + j * n_terms) for j in range(2**k - 1)], dtype=torch.float64)
        sums = (sums[:, None] + term).flatten()  # every sum so far, plus each value of this term
    mags = torch.sort(sums).values / sums.max()
    return torch.cat([-mags[1:].flip(0), mags]).float().to(device)


@dataclass
class ApotConfig(QuantConfig):
    """Options of ``apot``.

    Args:
        base_bits: bits per additive term (the paper's ``k``), 1..7; 2 as in the paper.
        init_iters: scale-fitting iterations when a layer is created.
    """

    base_bits: int = 2
    init_iters: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("base_bits", self.base_bits, 1, MAX_BITS - 1)
        check_int("init_iters", self.init_iters, 0)


class ApotQuantizer(ScaledShapeQuantizer):
    """Signed additive powers-of-two levels with a learnable scale per group."""

    config_class = ApotConfig

    def level_shape(self, config: ApotConfig, device: torch.device) -> Tensor:
        return apot_shape(config.n_bits, config.base_bits, device)
