"""Validated option dataclasses for the quantization methods.

Each method has one ``@dataclass`` subclassing :class:`QuantConfig`. ``__post_init__`` rejects bad
values with a message naming the argument, the value and what is allowed, so a typo fails at
configuration time and not halfway through converting a model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ._errors import check_int

#: The widest quantized weight, in bits: configs, export and bit packing all stop here.
MAX_BITS = 8


@dataclass
class QuantConfig:
    """Options shared by every method.

    Args:
        n_bits: bits per weight; a group has at most ``2**n_bits`` quantization levels (1..8).
        n_functions: channel groups per layer: the output channels are split into this many
            contiguous groups, each with its own levels (the prototype's "hash functions").
            Clamped to the layer's number of output channels; the split may be uneven.
    """

    n_bits: int = 4
    n_functions: int = 32

    def __post_init__(self) -> None:
        check_int("n_bits", self.n_bits, 1, MAX_BITS)
        check_int("n_functions", self.n_functions, 1)

    @property
    def n_levels(self) -> int:
        return 2**self.n_bits

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "QuantConfig":
        """Build the config, turning an unknown keyword into a ``TypeError`` that lists the known ones."""
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise TypeError(
                f"unknown option(s) {unknown} for {cls.__name__}; allowed: {cls.field_names()}"
            )
        return cls(**kwargs)
