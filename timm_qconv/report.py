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
    """

    name: str
    shape: tuple[int, ...]
    n_bits: int
    groups: int
    sq_error: float
    sq_weight: float

    @property
    def rel_error(self) -> float:
        return self.sq_error / self.sq_weight if self.sq_weight > 0 else 0.0

    @property
    def sqnr_db(self) -> float:
        return -10 * math.log10(self.rel_error) if self.rel_error > 0 else math.inf

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape), "rel_error": self.rel_error, "sqnr_db": self.sqnr_db}


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

    def __str__(self) -> str:
        header = ("layer", "shape", "bits", "groups", "rel. error", "SQNR dB")
        rows = [(r.name, "x".join(map(str, r.shape)), str(r.n_bits), str(r.groups), f"{r.rel_error:.5f}",
                 f"{r.sqnr_db:.2f}")
                for r in self.layers]
        rows.append(("total", "", "", "", f"{self.rel_error:.5f}", f"{self.sqnr_db:.2f}"))
        return render_table(rows, header, align="llrrrr", rule_before=[len(rows) - 1])

    __repr__ = __str__
