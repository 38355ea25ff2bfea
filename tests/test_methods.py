"""Every registered method on every layer kind: shapes, levels, gradients, modes and freezing.

Parametrized over :func:`timm_qconv.list_methods`, so a newly registered method is tested here
without touching this file.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm_qconv import QuantConv2d, QuantLinear, freeze_model, get_method, list_methods
from timm_qconv._groups import SortedGroups, group_index

METHODS = list_methods()
NEAREST_METHODS = [m for m in METHODS if get_method(m).nearest]
LAYER_KINDS = ["conv", "depthwise", "linear"]


def make_float(kind: str, channels: int = 8, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A plain layer of ``kind`` with ``channels`` output channels."""
    if kind == "conv":
        return nn.Conv2d(4, channels, 3, padding=1, dtype=dtype)
    if kind == "depthwise":
        return nn.Conv2d(channels, channels, 3, padding=1, groups=channels, dtype=dtype)
    if kind == "linear":
        return nn.Linear(12, channels, dtype=dtype)
    raise ValueError(kind)


def quantize_layer(float_layer: nn.Module, method: str, **kwargs) -> nn.Module:
    cls = QuantConv2d if isinstance(float_layer, nn.Conv2d) else QuantLinear
    kwargs = {"n_bits": 2, "n_functions": 4, **kwargs}
    return cls.from_float(float_layer, method=method, **kwargs)


def make_quant(kind: str, method: str, channels: int = 8, **kwargs) -> nn.Module:
    return quantize_layer(make_float(kind, channels), method, **kwargs)


def make_input(layer: nn.Module, batch: int = 2) -> torch.Tensor:
    if isinstance(layer, nn.Conv2d):
        return torch.randn(batch, layer.in_channels, 6, 6, dtype=layer.weight.dtype)
    return torch.randn(batch, layer.in_features, dtype=layer.weight.dtype)


def eval_weight(layer: nn.Module) -> torch.Tensor:
    """The quantized weight as eval mode computes it, as ``(C, K)`` rows."""
    layer.eval()
    with torch.no_grad():
        q = layer.quantizer(layer.weight)
    return q.reshape(q.shape[0], -1)


def perturb(quantizer: nn.Module) -> None:
    """Move the quantizer away from its fitted optimum, so that there is something to learn."""
    with torch.no_grad():
        for p in quantizer.parameters():
            p.mul_(1.5)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_output_shape_matches_float_layer(method, kind):
    float_layer = make_float(kind)
    x = make_input(float_layer)
    expected = float_layer(x).shape
    layer = quantize_layer(copy.deepcopy(float_layer), method)
    for training in (True, False):
        layer.train(training)
        out = layer(x)
        assert out.shape == expected, \
            f"{method}/{kind} training={training}: shape {tuple(out.shape)} != {tuple(expected)}"
        assert torch.isfinite(out).all(), f"{method}/{kind} training={training}: non-finite output"


@pytest.mark.parametrize("method", METHODS)
def test_constructors_are_drop_in(method):
    conv = QuantConv2d(3, 6, 3, stride=2, padding=1, method=method, n_bits=2, n_functions=2)
    out = conv(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 6, 4, 4), f"{method}: QuantConv2d output shape {tuple(out.shape)}"
    linear = QuantLinear(5, 7, bias=False, method=method, n_bits=3)
    out = linear(torch.randn(4, 5))
    assert out.shape == (4, 7), f"{method}: QuantLinear output shape {tuple(out.shape)}"
    assert linear.bias is None, f"{method}: QuantLinear(bias=False) has a bias"


# ----------------------------------------------------------------------------- levels


@pytest.mark.parametrize("channels,n_functions", [(8, 4), (10, 4), (3, 8)], ids=["even", "uneven", "clamped"])
@pytest.mark.parametrize("n_bits", [1, 3])
@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_frozen_weights_have_at_most_2_pow_bits_values_per_group(method, kind, n_bits, channels, n_functions):
    layer = make_quant(kind, method, channels=channels, n_bits=n_bits, n_functions=n_functions)
    layer.train()
    layer(make_input(layer))  # a training step may move state (linear re-reads the range)
    frozen = freeze_model(layer)
    assert type(frozen) in (nn.Conv2d, nn.Linear), f"{method}/{kind}: freeze_model gave {type(frozen).__name__}"
    rows = frozen.weight.detach().reshape(channels, -1)
    n_groups = min(n_functions, channels)
    groups = group_index(channels, n_groups)
    assert groups.unique().numel() == n_groups, f"{method}/{kind}: expected {n_groups} non-empty groups"
    for g in range(n_groups):
        values = rows[groups == g].unique()
        assert values.numel() <= 2**n_bits, (
            f"{method}/{kind} n_bits={n_bits} C={channels} G={n_groups}: group {g} has {values.numel()} "
            f"distinct values {values.tolist()}"
        )


@pytest.mark.parametrize("channels,n_functions", [(10, 4), (3, 8), (8, 1)], ids=["uneven", "clamped", "one"])
@pytest.mark.parametrize("method", METHODS)
def test_group_count_follows_channels(method, channels, n_functions):
    layer = make_quant("conv", method, channels=channels, n_functions=n_functions)
    expected = min(n_functions, channels)
    assert layer.quantizer.n_groups == expected, (
        f"{method}: C={channels}, n_functions={n_functions} gave {layer.quantizer.n_groups} groups, expected {expected}"
    )
    levels = layer.quantizer.levels()
    assert levels.shape[0] == expected, f"{method}: levels() has {levels.shape[0]} rows, expected {expected}"
    assert torch.equal(layer.quantizer.group_index, group_index(channels, expected)), f"{method}: wrong group_index"


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_eval_weights_are_levels_of_their_group(method, kind):
    layer = make_quant(kind, method, channels=10, n_bits=2, n_functions=4)
    q = eval_weight(layer)
    levels = layer.quantizer.levels().detach()[layer.quantizer.group_index]  # (C, L)
    hit = (q[:, :, None] == levels[:, None, :]).any(-1)
    assert hit.all(), f"{method}/{kind}: {int((~hit).sum())} quantized weights are not a level of their group"


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_quantizing_twice_changes_nothing(method, kind):
    layer = make_quant(kind, method, channels=10, n_bits=2, n_functions=4)
    layer.train()
    layer(make_input(layer))
    layer.eval()
    with torch.no_grad():
        q = layer.quantizer(layer.weight)
        q2 = layer.quantizer(q)
    changed = int((q2 != q).sum())
    assert changed == 0, f"{method}/{kind}: re-quantizing a quantized weight changed {changed} of {q.numel()} values"


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("method", NEAREST_METHODS)
def test_nearest_methods_pick_the_nearest_level(method, kind, training):
    layer = make_quant(kind, method, channels=10, n_bits=3, n_functions=4)
    quantizer = layer.quantizer.train(training)
    with torch.no_grad():
        q = quantizer(layer.weight).reshape(10, -1)
        levels = quantizer.levels()
    rows = layer.weight.detach().reshape(10, -1)
    groups = group_index(10, quantizer.n_groups)
    # Brute force: the distance from every weight to every level of its group.
    distances = (rows[:, :, None] - levels[groups][:, None, :]).abs()
    best = distances.min(-1).values
    error = (q - rows).abs()
    worst = float((error - best).max())
    assert worst <= 1e-6 * float(rows.abs().max()), (
        f"{method}/{kind} training={training}: a weight is {worst:g} farther from its level than from the nearest one"
    )


# ----------------------------------------------------------------------------- gradients and modes


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_ste_gradient_reaches_weight_and_quantizer(method, kind):
    layer = make_quant(kind, method)
    layer.train()
    x = make_input(layer)
    out = layer(x)
    out.square().sum().backward()
    assert layer.weight.grad is not None, f"{method}/{kind}: no gradient on the float weight in ste mode"
    assert layer.weight.grad.abs().sum() > 0, f"{method}/{kind}: zero gradient on the float weight"
    params = dict(layer.quantizer.named_parameters())
    assert params, f"{method}: the quantizer has no learnable parameter"
    for name, p in params.items():
        assert p.grad is not None, f"{method}/{kind}: task loss gives no gradient to quantizer.{name}"
        assert torch.isfinite(p.grad).all(), f"{method}/{kind}: non-finite gradient on quantizer.{name}"
        assert p.grad.abs().sum() > 0, f"{method}/{kind}: task loss gives a zero gradient to quantizer.{name}"


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_ste_weight_gradient_is_straight_through(method, kind):
    """The float weight gets exactly the gradient that the quantized weight gets."""
    layer = make_quant(kind, method)
    layer.train()
    x = make_input(layer)
    layer(x).square().sum().backward()
    q = layer.forward_weight().detach().requires_grad_()
    if isinstance(layer, nn.Conv2d):
        ref = layer._conv_forward(x, q, layer.bias)
    else:
        ref = F.linear(x, q, layer.bias)
    (grad,) = torch.autograd.grad(ref.square().sum(), q)
    torch.testing.assert_close(layer.weight.grad, grad,
                               msg=lambda m: f"{method}/{kind}: weight grad is not straight-through: {m}")


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_hash_loss_gradient_reaches_quantizer(method, kind):
    layer = make_quant(kind, method)
    layer.train()  # poly's hash loss is differentiable through its soft (training) assignment
    perturb(layer.quantizer)
    loss = layer.hash_loss()
    assert loss.ndim == 0 and loss >= 0, f"{method}/{kind}: hash loss {loss} is not a non-negative scalar"
    loss.backward()
    assert layer.weight.grad is None, f"{method}/{kind}: hash_loss() (wrt_weights=False) sent a gradient to the weight"
    for name, p in layer.quantizer.named_parameters():
        assert p.grad is not None, f"{method}/{kind}: hash loss gives no gradient to quantizer.{name}"
        assert p.grad.abs().sum() > 0, f"{method}/{kind}: hash loss gives a zero gradient to quantizer.{name}"
    layer.hash_loss(wrt_weights=True).backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, (
        f"{method}/{kind}: hash_loss(wrt_weights=True) sent no gradient to the weight"
    )


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_hash_loss_goes_down_when_optimizing_quantizer(method, kind):
    layer = make_quant(kind, method, channels=8, n_bits=2, n_functions=4)
    layer.train()
    perturb(layer.quantizer)
    weight_before = layer.weight.detach().clone()
    optimizer = torch.optim.Adam(layer.quantizer.parameters(), lr=1e-2)
    start = layer.hash_loss().detach().item()
    for _ in range(30):
        optimizer.zero_grad()
        layer.hash_loss().backward()
        optimizer.step()
    end = layer.hash_loss().detach().item()
    assert end < start, f"{method}/{kind}: hash loss went from {start:.3g} to {end:.3g} in 30 Adam steps"
    assert torch.equal(layer.weight, weight_before), f"{method}/{kind}: optimizing the quantizer changed the weight"


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_float_mode_trains_on_float_weights(method, kind):
    float_layer = make_float(kind)
    x = make_input(float_layer)
    expected = float_layer(x)
    layer = quantize_layer(float_layer, method, mode="float")
    layer.train()
    assert torch.equal(layer(x), expected), f"{method}/{kind}: float-mode training forward differs from the float layer"
    layer.eval()
    frozen = freeze_model(copy.deepcopy(layer))
    assert torch.equal(layer(x), frozen(x)), \
        f"{method}/{kind}: float-mode eval forward does not use the quantized weight"


@pytest.mark.parametrize("mode", ["ste", "float"])
@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_eval_equals_frozen_twin(method, kind, mode):
    layer = make_quant(kind, method, channels=10, n_bits=3, n_functions=4, mode=mode)
    x = make_input(layer)
    layer.train()
    layer(x)
    layer.eval()
    frozen = freeze_model(copy.deepcopy(layer))
    assert type(frozen) in (nn.Conv2d, nn.Linear), f"{method}/{kind}: frozen layer is {type(frozen).__name__}"
    with torch.no_grad():
        out, frozen_out = layer(x), frozen(x)
    assert torch.equal(out, frozen_out), (
        f"{method}/{kind}/{mode}: eval output differs from the frozen twin by {float((out - frozen_out).abs().max()):g}"
    )


# ----------------------------------------------------------------------------- from_float


CONV_VARIANTS = {
    "strided": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=(1, 2), bias=True),
    "dilated-grouped": dict(in_channels=4, out_channels=8, kernel_size=(3, 1), dilation=2, groups=2, bias=False),
    "depthwise-reflect": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6,
                              padding_mode="reflect"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
@pytest.mark.parametrize("method", METHODS)
def test_conv_from_float_keeps_layer(method, variant, dtype):
    conv = nn.Conv2d(**CONV_VARIANTS[variant], dtype=dtype)
    weight, bias = conv.weight.detach().clone(), None if conv.bias is None else conv.bias.detach().clone()
    layer = QuantConv2d.from_float(conv, method=method, n_bits=2, n_functions=4)
    assert isinstance(layer, QuantConv2d), f"{method}: from_float gave {type(layer).__name__}"
    attrs = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode")
    for attr in attrs:
        assert getattr(layer, attr) == getattr(conv, attr), \
            f"{method}/{variant}: {attr} {getattr(layer, attr)} != {getattr(conv, attr)}"
    assert layer.weight.dtype == dtype, f"{method}/{variant}: weight dtype {layer.weight.dtype} != {dtype}"
    assert layer.weight.device == conv.weight.device, f"{method}/{variant}: weight moved to {layer.weight.device}"
    assert torch.equal(layer.weight, weight), f"{method}/{variant}: from_float changed the weight"
    if bias is None:
        assert layer.bias is None, f"{method}/{variant}: from_float added a bias"
    else:
        assert torch.equal(layer.bias, bias), f"{method}/{variant}: from_float changed the bias"
    x = torch.randn(2, conv.in_channels, 7, 7, dtype=dtype)
    layer.eval()
    out = layer(x)
    assert out.dtype == dtype, f"{method}/{variant}: output dtype {out.dtype} != {dtype}"
    assert out.shape == conv(x).shape, f"{method}/{variant}: output shape {tuple(out.shape)} != {tuple(conv(x).shape)}"
    frozen = freeze_model(copy.deepcopy(layer))
    assert frozen.padding_mode == conv.padding_mode and frozen.groups == conv.groups, \
        f"{method}/{variant}: freezing lost conv options"
    assert frozen.weight.dtype == dtype, f"{method}/{variant}: frozen weight dtype {frozen.weight.dtype}"
    assert torch.equal(frozen(x), out), f"{method}/{variant}: frozen output differs from eval output"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_linear_from_float_keeps_layer(method, dtype, bias):
    linear = nn.Linear(9, 5, bias=bias, dtype=dtype)
    weight = linear.weight.detach().clone()
    layer = QuantLinear.from_float(linear, method=method, n_bits=2, n_functions=4)
    assert isinstance(layer, QuantLinear), f"{method}: from_float gave {type(layer).__name__}"
    assert (layer.in_features, layer.out_features) == (9, 5), \
        f"{method}: features {(layer.in_features, layer.out_features)}"
    assert (layer.bias is not None) == bias, f"{method}: bias={bias} not kept"
    assert layer.weight.dtype == dtype, f"{method}: weight dtype {layer.weight.dtype} != {dtype}"
    assert torch.equal(layer.weight, weight), f"{method}: from_float changed the weight"
    out = layer.eval()(torch.randn(3, 9, dtype=dtype))
    assert out.shape == (3, 5) and out.dtype == dtype, f"{method}: output {tuple(out.shape)} {out.dtype}"


@pytest.mark.parametrize("method", METHODS)
def test_from_float_keeps_training_flag(method):
    conv = nn.Conv2d(3, 4, 3).eval()
    layer = QuantConv2d.from_float(conv, method=method, n_bits=2)
    assert not layer.training and not layer.quantizer.training, \
        f"{method}: from_float of an eval conv is in training mode"


@pytest.mark.parametrize("method", METHODS)
def test_task_gradient_to_quantizer_is_scaled_by_group_size(method):
    """In "ste" mode a level's gradient is the sum over the many weights sharing it, scaled by
    1/sqrt(weights per group) as in LSQ, so that levels do not outrun the weights."""
    layer = QuantConv2d(8, 16, 3, n_bits=2, n_functions=4, method=method)
    weight = layer.weight.detach()
    grad_out = torch.randn_like(weight)
    quantizer = layer.quantizer
    params = [p for p in quantizer.parameters() if p.requires_grad]
    (quantizer(weight.clone().requires_grad_(), ste=True) * grad_out).sum().backward()
    scaled = [p.grad.clone() for p in params]
    quantizer.zero_grad()
    (quantizer(weight) * grad_out).sum().backward()
    factor = (quantizer.n_groups / weight.numel()) ** 0.5
    for p, g in zip(params, scaled):
        torch.testing.assert_close(g, p.grad * factor,
                                   msg=lambda m: f"{method}: task gradient not scaled by {factor:.4f}: {m}")


@pytest.mark.parametrize("n_positions", [7, 5000])  # one pass; three chunks of 2048 positions (2 groups)
def test_prefix_sums_equal_cumulative_sums_of_the_sorted_weights(n_positions):
    generator = torch.Generator().manual_seed(n_positions)
    rows = torch.randn(6, 999, generator=generator)  # groups of 2997 weights: not whole blocks
    stats = SortedGroups(rows, 2)
    positions = torch.randint(0, 2998, (2, n_positions), generator=generator)
    positions[:, :3] = torch.tensor([0, 2997, 16])  # empty, whole group, one block exactly
    s1, s2 = stats.prefix_sums(positions)
    for g in range(2):
        ordered = rows[3 * g : 3 * g + 3].flatten().double().sort().values
        zero = ordered.new_zeros(1)
        cum1, cum2 = torch.cat([zero, ordered.cumsum(0)]), torch.cat([zero, ordered.square().cumsum(0)])
        assert torch.allclose(s1[g], cum1[positions[g]], rtol=0, atol=1e-9), f"group {g}: sums differ"
        assert torch.allclose(s2[g], cum2[positions[g]], rtol=0, atol=1e-9), f"group {g}: sums of squares differ"


@pytest.mark.parametrize("method", list_methods())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_layer_moved_to_another_dtype_trains_and_evaluates(method, dtype):
    # .to(dtype) also casts the quantizer's float32 state: every method must still take a step
    layer = QuantLinear(12, 8, method=method, n_bits=2).to(dtype).train()
    x = torch.randn(3, 12, dtype=dtype)
    (layer(x).float().sum() + layer.hash_loss()).backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all(), f"{method} {dtype}"
    layer.eval()
    with torch.no_grad():
        out = layer(x)
    assert out.dtype == dtype and torch.isfinite(out).all(), f"{method} {dtype}: eval output"
