"""Odd layers and arguments get errors naming the argument and what is allowed."""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

from timm_qconv import BitQuantizer, QuantConv2d, QuantLinear, quantize_model

ZERO_SIZE = {
    "conv no outputs": lambda: nn.Conv2d(3, 0, 3),
    "conv no inputs": lambda: nn.Conv2d(0, 4, 3),
    "linear no inputs": lambda: nn.Linear(0, 4),
    "linear no outputs": lambda: nn.Linear(4, 0),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("name", list(ZERO_SIZE))
@pytest.mark.parametrize("convert", [
    lambda m: quantize_model(m, n_bits=2, n_functions=2, layers=("conv", "linear")),
    lambda m: BitQuantizer(m, 2, 2, layers=("conv", "linear")),
], ids=["quantize_model", "BitQuantizer"])
def test_zero_size_layers_are_named(name: str, convert: Callable[[nn.Module], Any]) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), ZERO_SIZE[name]())
    with pytest.raises(ValueError, match=r"layer '1' .* has no weights .*avoid=\['1'\]"):
        convert(model)
    assert type(model[0]) is nn.Conv2d, "nothing may be converted when a layer is refused"


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("make", [lambda: QuantConv2d(3, 0, 3, n_bits=2), lambda: QuantLinear(0, 3, n_bits=2)],
                         ids=["QuantConv2d", "QuantLinear"])
def test_zero_size_quant_layers_are_refused(make: Callable[[], nn.Module]) -> None:
    with pytest.raises(ValueError, match="has no weights"):
        make()


@pytest.mark.parametrize("device,error,match", [
    ("bogus", ValueError, "device='bogus' is not a device"),
    (3.5, TypeError, "device=3.5 has type float"),
] + ([] if torch.cuda.is_available() else [("cuda", ValueError, "device='cuda' is not available")]))
def test_bit_quantizer_names_a_bad_device(device: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        BitQuantizer(nn.Sequential(nn.Conv2d(3, 4, 1)), 2, 2, device=device)
