"""State-dict round trips: a quantized model's state loads strictly into a fresh quantized twin."""
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from timm_qconv import list_methods, quantize_model

METHODS = list_methods()


def depthwise_model() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, padding=1), bn=nn.BatchNorm2d(8), act=nn.ReLU(),
        dw=nn.Conv2d(8, 8, 3, padding=1, groups=8),
        pw=nn.Conv2d(8, 10, 1),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(),
        head=nn.Linear(10, 5),
    ))


def quantized(method: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return quantize_model(depthwise_model(), method=method, n_bits=2, n_functions=3, layers=("conv", "linear"))


def trained(method: str) -> nn.Module:
    """A quantized model after a few training steps, so that its state is not the initial one."""
    model = quantized(method, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()
        optimizer.step()
    return model.eval()


def save_torch(state: dict, path) -> dict:
    torch.save(state, path)
    return torch.load(path, weights_only=True)


def save_safetensors(state: dict, path) -> dict:
    save_file(state, str(path))
    return load_file(str(path))


@pytest.mark.parametrize("save_load", [save_torch, save_safetensors], ids=["torch", "safetensors"])
@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip(method, save_load, tmp_path):
    model = trained(method)
    state = model.state_dict()
    quantizer_keys = [k for k in state if ".quantizer." in k]
    assert quantizer_keys, f"{method}: no quantizer state in the state dict"
    loaded = save_load(state, tmp_path / "model.bin")
    assert loaded.keys() == state.keys(), f"{method}: keys changed by saving: {set(loaded) ^ set(state)}"

    fresh = quantized(method, seed=1).eval()  # same architecture, other random weights
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert not torch.equal(fresh(x), expected), \
            f"{method}: the fresh model already matches; the test proves nothing"
    fresh.load_state_dict(loaded, strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), f"{method}: {key} differs after loading"
    with torch.no_grad():
        out = fresh(x)
    assert torch.equal(out, expected), \
        f"{method}: eval output differs after the round trip by {float((out - expected).abs().max()):g}"


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_survives_training_after_load(method, tmp_path):
    """Loading restores the state that later training steps start from (train-mode forward too)."""
    model = trained(method)
    fresh = quantized(method, seed=1)
    fresh.load_state_dict(save_torch(model.state_dict(), tmp_path / "m.pt"), strict=True)
    x = torch.randn(3, 3, 8, 8)
    model.train()
    fresh.train()
    assert torch.equal(fresh(x), model(x)), f"{method}: train-mode outputs differ after loading"
