"""Conversion, forward, backward and freezing of timm models from several families.

Models are built with ``pretrained=False`` at a small input size; n_functions is small so that
fitting the quantizers stays cheap on a CPU.
"""
import pytest
import timm
import torch
from torch import nn

from timm_qconv import QuantConv2d, QuantMixin, freeze_model, hash_loss, list_methods, quantize_model, quantized_layers

# name -> (create_model kwargs, layer kinds to quantize, has depthwise/grouped convs)
ARCHS = {
    "resnet18": ({}, (nn.Conv2d,), False),
    "mobilenetv3_small_050": ({}, (nn.Conv2d,), True),
    "efficientnet_b0": ({}, (nn.Conv2d,), True),
    "convnext_atto": ({}, (nn.Conv2d,), True),
    "regnetx_002": ({}, (nn.Conv2d,), True),
    "vit_tiny_patch16_224": ({"img_size": 32}, (nn.Conv2d, nn.Linear), False),
}


def create(name: str) -> nn.Module:
    kwargs, _, _ = ARCHS[name]
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


def plain_layers(model: nn.Module, kinds: tuple) -> list[str]:
    """Names of the exact-type plain layers of ``kinds`` (what quantize_model replaces)."""
    return [n for n, m in model.named_modules() if type(m) in kinds]


@pytest.mark.parametrize("name", list(ARCHS))
def test_timm_model_converts_trains_and_freezes(name):
    _, kinds, grouped = ARCHS[name]
    model = create(name)
    expected = plain_layers(model, kinds)
    quantize_model(model, n_bits=2, n_functions=4, layers=kinds)
    converted = [n for n, _ in quantized_layers(model)]
    assert converted == expected, f"{name}: converted {len(converted)} layers, expected {len(expected)}"
    assert not plain_layers(model, kinds), f"{name}: plain layers left: {plain_layers(model, kinds)[:5]}"
    n_grouped = sum(1 for _, m in quantized_layers(model) if isinstance(m, QuantConv2d) and m.groups > 1)
    if grouped:
        assert n_grouped > 0, f"{name}: no depthwise/grouped conv was quantized"
    if nn.Linear in kinds:
        assert any(isinstance(m, nn.Linear) for _, m in quantized_layers(model)), f"{name}: no Linear was quantized"

    model.train()
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10), f"{name}: output shape {tuple(out.shape)}"
    loss = out.square().mean() + hash_loss(model)
    assert torch.isfinite(loss), f"{name}: loss {loss}"
    loss.backward()
    no_grad = [n for n, m in quantized_layers(model) if m.weight.grad is None]
    assert not no_grad, f"{name}: no gradient on the weight of {no_grad[:5]}"
    quantizer_params = [(n, p) for n, p in model.named_parameters() if ".quantizer." in n]
    assert quantizer_params, f"{name}: no quantizer parameter"
    no_grad = [n for n, p in quantizer_params if p.grad is None]
    assert not no_grad, f"{name}: no gradient on {no_grad[:5]}"

    model.eval()
    with torch.no_grad():
        quantized_out = model(x)
        freeze_model(model)
        frozen_out = model(x)
    assert not any(isinstance(m, QuantMixin) for m in model.modules()), f"{name}: quantized layers left after freezing"
    assert torch.equal(quantized_out, frozen_out), (
        f"{name}: eval output differs from the frozen model by {float((quantized_out - frozen_out).abs().max()):g}"
    )


@pytest.mark.parametrize("method", list_methods())
def test_every_method_on_depthwise_timm_model(method):
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    quantize_model(model, method=method, n_bits=2, n_functions=4, layers=("conv", "linear"))
    x = torch.randn(2, 3, 32, 32)
    model.train()
    (model(x).square().mean() + hash_loss(model)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{method}: parameters without gradient: {missing[:5]}"
    model.eval()
    with torch.no_grad():
        quantized_out = model(x)
        frozen_out = freeze_model(model)(x)
    assert torch.equal(quantized_out, frozen_out), f"{method}: eval output differs from the frozen model"
