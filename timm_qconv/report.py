"""Per-layer quantization error: what a post-training pass or a training run reports."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Iterator

from ._table import render_table


@dataclass(frozen=True)
class LayerReport:
    """Quantization error of one layer.

    ``rel_error`` is ``sum((q - w)**2) / sum(w**2)``; ``sqnr_db`` is ``-10 * log10(rel_error)``.
    After calibration with data (:meth:`~timm_qconv.BitQuantizer.calibrate`), ``data_free_sq_error``
    is the weight error before it, and ``out_error``/``data_free_out_error`` the layer's relative
    output error on the calibration inputs after/before it: ``sum |(W - Q) x|^2 / sum |W x|^2``
    (``None`` for a layer the calibration inputs never reached).
    """

    name: str
    shape: tuple[int, ...]
    n_bits: int
    groups: int
    sq_error: float
    sq_weight: float
    data_free_sq_error: float | None = None
    out_error: float | None = None
    data_free_out_error: float | None = None

    @property
    def rel_error(self) -> float:
        return self.sq_error / self.sq_weight if self.sq_weight > 0 else 0.0

    @property
    def sqnr_db(self) -> float:
        return -10 * math.log10(self.rel_error) if self.rel_error > 0 else math.inf

    @property
    def data_free_rel_error(self) -> float | None:
        """``rel_error`` before calibration (``None`` if not calibrated)."""
        if self.data_free_sq_error is None:
            return None
        return self.data_free_sq_error / self.sq_weight if self.sq_weight > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "rel_error": self.rel_error, "sqnr_db": self.sqnr_db,
                "data_free_rel_error": self.data_free_rel_error}


class QuantReport:
    """The layers' reports; iterates like a list and prints as a table with a total row."""

    def __init__(self, layers: list[LayerReport]) -> None:
        self.layers = list(layers)

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> LayerReport:
        return self.layers[index]

    @property
    def rel_error(self) -> float:
        """Relative error over all layers together."""
        total = sum(r.sq_weight for r in self.layers)
        return sum(r.sq_error for r in self.layers) / total if total > 0 else 0.0

    @property
    def sqnr_db(self) -> float:
        return -10 * math.log10(self.rel_error) if self.rel_error > 0 else math.inf

    def to_dicts(self) -> list[dict]:
        return [r.to_dict() for r in self.layers]

    @property
    def calibrated(self) -> bool:
        """Whether the report comes from a calibration with data (it then has output errors)."""
        return any(r.data_free_sq_error is not None for r in self.layers)

    def __str__(self) -> str:
        header = ("layer", "shape", "bits", "groups", "rel. error", "SQNR dB")
        rows = [(r.name, "x".join(map(str, r.shape)), str(r.n_bits), str(r.groups), f"{r.rel_error:.5f}",
                 f"{r.sqnr_db:.2f}")
                for r in self.layers]
        rows.append(("total", "", "", "", f"{self.rel_error:.5f}", f"{self.sqnr_db:.2f}"))
        align = "llrrrr"
        if self.calibrated:  # weight and output errors before (data-free) and after calibration
            header += ("w. error data-free", "out. error data-free", "out. error")
            rows = [row + (_fmt(r.data_free_rel_error), _fmt(r.data_free_out_error), _fmt(r.out_error))
                    for row, r in zip(rows, self.layers)] + [rows[-1] + ("", "", "")]
            align += "rrr"
        return render_table(rows, header, align=align, rule_before=[len(rows) - 1])

    __repr__ = __str__


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.5f}"
