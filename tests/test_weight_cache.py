"""The eval-time cache of quantized weights: reused while nothing changed, never stale."""
import copy
import io

import pytest
import torch
from torch import nn

from timm_qconv import QuantConv2d, list_methods, quantize_model

METHODS = list_methods()


def layer_of(method: str) -> QuantConv2d:
    layer = QuantConv2d(4, 8, 3, method=method, n_bits=2, n_functions=2)
    return layer.eval()


def fresh(layer: QuantConv2d) -> torch.Tensor:
    """The quantized weight computed from scratch, bypassing the cache."""
    with torch.no_grad():
        return layer.quantizer(layer.weight, ste=True)


def first_param(layer: QuantConv2d) -> nn.Parameter:
    return next(p for p in layer.quantizer.parameters())


@pytest.mark.parametrize("method", METHODS)
def test_eval_without_grad_reuses_the_quantized_weight(method):
    layer = layer_of(method)
    with torch.no_grad():
        a, b = layer.quantized_weight(), layer.quantized_weight()
    assert a is b, f"{method}: a second no-grad forward in eval recomputed an unchanged weight"
    assert torch.equal(a, fresh(layer)), f"{method}: the cached weight differs from the computed one"


def edit_weight(layer):
    with torch.no_grad():
        layer.weight.mul_(1.5)


def edit_levels(layer):
    with torch.no_grad():
        first_param(layer).mul_(0.5)


def optimizer_step(layer):
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    layer(torch.randn(2, 4, 6, 6)).square().sum().backward()
    optimizer.step()
    layer.eval()


def load_state(layer):
    other = QuantConv2d(4, 8, 3, method=layer.quant_config, n_bits=2, n_functions=2)
    layer.load_state_dict(other.state_dict())


def to_float64(layer):
    layer.double()


def replace_data(layer):
    layer.weight.data = layer.weight.data * 2


def reset_quantizer(layer):
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))  # bumps the version too; reset on new weights
    layer.reset_quantizer()


CHANGES = {"weight edited in place": edit_weight, "levels edited in place": edit_levels,
           "optimizer step": optimizer_step, "load_state_dict": load_state, "to(float64)": to_float64,
           "weight.data replaced": replace_data, "reset_quantizer": reset_quantizer}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("method", METHODS)
def test_every_change_invalidates_the_cached_weight(method, change):
    layer = layer_of(method)
    with torch.no_grad():
        before = layer.quantized_weight()
    CHANGES[change](layer)
    with torch.no_grad():
        after = layer.quantized_weight()
    expected = fresh(layer)
    assert after is not before, f"{method}: the cached weight survived {change}"
    assert after.dtype == layer.weight.dtype, f"{method}: {after.dtype} after {change}, weight {layer.weight.dtype}"
    assert torch.equal(after, expected), f"{method}: the weight after {change} differs from a fresh computation"


def test_moving_to_another_device_invalidates_the_cached_weight():
    layer = layer_of("hash")
    with torch.no_grad():
        layer.quantized_weight()
        layer.to("meta")
        moved = layer.quantized_weight()
    assert moved.device.type == "meta", f"a layer moved to meta returned a weight on {moved.device}"


@pytest.mark.parametrize("method", METHODS)
def test_training_with_grad_never_uses_or_keeps_the_cache(method):
    layer = layer_of(method)
    with torch.no_grad():
        cached = layer.quantized_weight()
    layer.train()
    assert layer.weight_cache.value is None, "switching to train mode kept the cached weight"
    with torch.no_grad():
        layer.quantized_weight()  # a no-grad forward in train mode may cache ...
    q = layer.quantized_weight()
    assert q is not cached and q.requires_grad, f"{method}: a training forward used a weight without a graph"
    assert layer.weight_cache.value is None, f"{method}: a training forward kept a cached weight alive"
    q.sum().backward()
    assert layer.weight.grad is not None, f"{method}: no straight-through gradient in training"


def test_eval_with_grad_computes_a_differentiable_weight():
    layer = layer_of("kmeans")
    q = layer.quantized_weight()
    assert q.requires_grad and q is not layer.quantized_weight(), "eval with grad enabled reused a weight without graph"
    q.sum().backward()
    assert first_param(layer).grad is not None, "eval with grad enabled gave the levels no gradient"


def test_eval_called_again_keeps_the_cache():
    layer = layer_of("hash")
    with torch.no_grad():
        before = layer.quantized_weight()
        layer.eval()
        assert layer.quantized_weight() is before, "eval() on an eval layer dropped the cached weight"


def test_edits_through_data_are_dropped_by_a_mode_switch():
    layer = layer_of("hash")
    with torch.no_grad():
        before = layer.quantized_weight()
    layer.weight.data.mul_(3.0)  # invisible to the version counter
    layer.train()
    layer.eval()
    with torch.no_grad():
        after = layer.quantized_weight()
    assert after is not before and torch.equal(after, fresh(layer)), "a mode switch did not drop the cache"


def test_inference_mode_weight_is_not_reused_outside_inference_mode():
    layer = layer_of("hash")
    with torch.inference_mode():
        inside = layer.quantized_weight()
    with torch.no_grad():
        outside = layer.quantized_weight()
    assert outside is not inside and not outside.is_inference(), "an inference tensor leaked out of inference_mode"


def test_copies_and_pickles_do_not_carry_the_cache():
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)), n_bits=2, n_functions=2).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 8, 8))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for name, other in (("deepcopy", copy.deepcopy(model)), ("pickle", torch.load(buffer, weights_only=False))):
        layers = [m for m in other if isinstance(m, QuantConv2d)]
        assert all(m.weight_cache.value is None for m in layers), f"{name} copied the cache"
        with torch.no_grad():
            assert torch.equal(other(torch.ones(1, 3, 8, 8)), model(torch.ones(1, 3, 8, 8))), f"{name}: outputs differ"


def test_cached_model_output_equals_an_uncached_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    model = quantize_model(model, n_bits=3, n_functions=4).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        first, second = model(x), model(x)
    expected = model(x)  # grad enabled: computed without the cache
    assert torch.equal(first, second) and torch.equal(second, expected.detach()), "the cached forward differs"
