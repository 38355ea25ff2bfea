"""A config resolves to the method it was made for, by registered name (not the first class sharing its config)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from timm_qconv import BitQuantizer, KMeansConfig, QuantConfig, make_config, quantize_model, quantized_layers
from timm_qconv._registry import add_method, config_owner, remove_method
from timm_qconv.methods.kmeans import KMeansQuantizer
from timm_qconv.methods.linear import LinearQuantizer


class MineQuantizer(KMeansQuantizer):
    """A plugin's variant of kmeans, sharing its config class."""


class PlainA(LinearQuantizer):
    config_class = QuantConfig


class PlainB(LinearQuantizer):
    config_class = QuantConfig


@pytest.fixture
def registered():
    names = {"mine": MineQuantizer, "plain_a": PlainA, "plain_b": PlainB}
    for name, cls in names.items():
        add_method(name, cls, owner="test")
    try:
        yield names
    finally:
        for name in names:
            remove_method(name)


@pytest.mark.parametrize("name", ["mine", "plain_a", "plain_b", "kmeans"])
def test_config_owner_follows_the_registered_name(registered, name: str) -> None:
    expected = registered.get(name, KMeansQuantizer)
    config = make_config(name, n_bits=2, n_functions=2)
    assert config_owner(config) is expected, f"make_config({name!r}) resolved to {config_owner(config).__name__}"
    again = make_config(config, n_bits=3)  # options over a config keep its method
    assert config_owner(again) is expected, "a config rebuilt from a config must keep its method"


@pytest.mark.parametrize("name", ["mine", "plain_b"])
def test_public_functions_build_the_named_method(registered, name: str) -> None:
    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3)), method=name, n_bits=2, n_functions=2)
    quantizers = {type(layer.quantizer) for _, layer in quantized_layers(model)}
    assert quantizers == {registered[name]}, f"quantize_model(method={name!r}) built {quantizers}"
    bq = BitQuantizer(nn.Sequential(nn.Conv2d(3, 4, 3)), 2, 2, method=name)
    assert bq.method is registered[name], f"BitQuantizer(method={name!r}) uses {bq.method.__name__}"


def test_a_direct_config_prefers_the_class_that_declares_it(registered) -> None:
    assert config_owner(KMeansConfig(n_bits=2)) is KMeansQuantizer, "kmeans declares KMeansConfig; mine inherits it"
    with pytest.raises(ValueError, match=r"used by the methods \['plain_a', 'plain_b'\]"):
        config_owner(QuantConfig(n_bits=2))
