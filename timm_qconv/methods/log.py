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
from torch import Tensor

from .._errors import check_int
from ..config import QuantConfig
from .scaled_shape import ScaledShapeQuantizer, fit_scale  # noqa: F401  (fit_scale: its old home)


def log_shape(n_bits: int, device: torch.device | None = None) -> Tensor:
    """Sorted level shape for scale 1: ``[-1, 1]`` for one bit, else ``0`` and ``±2**-k``."""
    if n_bits == 1:
        return torch.tensor([-1.0, 1.0], device=device)
    mags = 2.0 ** -torch.arange(2 ** (n_bits - 1) - 1, device=device, dtype=torch.float32)
    return torch.cat([-mags, mags.new_zeros(1), mags.flip(0)])


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


class LogQuantizer(ScaledShapeQuantizer):
    """Sign times power-of-two levels plus zero, with a learnable scale per group."""

    config_class = LogConfig

    def level_shape(self, config: LogConfig, device: torch.device) -> Tensor:
        return log_shape(config.n_bits, device)
