"""Whole-model conversion: quantize_model, the prototype's decorator, layer selection, freezing."""
import copy
import io
from collections import OrderedDict

import pytest
import timm
import torch
from torch import nn

from timm_qconv import (
    QuantConv2d,
    QuantLinear,
    QuantMixin,
    freeze_model,
    hash_loss,
    list_methods,
    plan_quantization,
    quantize_model,
    quantized_layers,
    quantizeModel,
)

METHODS = list_methods()


def block() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(8, 8, 3, padding=1), bn=nn.BatchNorm2d(8), act=nn.ReLU(),
        conv2=nn.Conv2d(8, 8, 3, padding=1, groups=8),
    ))


def resnet_like() -> nn.Sequential:
    """A resnet-like naming: stem, layer1 (two blocks), layer2 (one block), head."""
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, padding=1),
        layer1=nn.Sequential(block(), block()),
        layer2=nn.Sequential(block()),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        head=nn.Linear(8, 10),
    ))


CONVS = ["stem", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2", "layer2.0.conv1",
         "layer2.0.conv2"]


def quantized_names(model: nn.Module) -> list[str]:
    return [name for name, _ in quantized_layers(model)]


def x_small() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8)


# ----------------------------------------------------------------------------- quantize_model


@pytest.mark.parametrize("method", METHODS)
def test_quantize_model_converts_convs_in_place(method):
    model = resnet_like()
    head = model.head
    out = quantize_model(model, method=method, n_bits=2, n_functions=4)
    assert out is model, f"{method}: quantize_model returned a new object instead of the model"
    assert quantized_names(model) == CONVS, f"{method}: quantized {quantized_names(model)}, expected {CONVS}"
    assert all(isinstance(m, QuantConv2d) for n, m in quantized_layers(model)), f"{method}: not QuantConv2d"
    assert model.head is head and type(head) is nn.Linear, f"{method}: the Linear head was converted by default"
    y = model(x_small())
    assert y.shape == (2, 10), f"{method}: output shape {tuple(y.shape)}"


def test_quantize_model_twice_raises_nothing_to_quantize():
    model = quantize_model(resnet_like(), n_bits=2)
    with pytest.raises(ValueError, match="no layer"):
        quantize_model(model, n_bits=2)


def test_plan_quantization_lists_without_changing():
    model = resnet_like()
    types = [type(m) for m in model.modules()]
    assert plan_quantization(model) == CONVS, f"plan: {plan_quantization(model)}"
    assert [type(m) for m in model.modules()] == types, "plan_quantization changed the model"


def mean_squared_error_to_levels(model: nn.Module) -> torch.Tensor:
    """The hash loss computed here from its definition, in eval mode: per layer, the mean squared
    distance of each weight to its nearest level of its channel group (by brute force), summed."""
    total = torch.zeros((), dtype=torch.float64)
    for _, layer in quantized_layers(model):
        rows = layer.weight.detach().flatten(1).double()
        quantizer = layer.quantizer
        with torch.no_grad():
            if quantizer.nearest:
                table = quantizer.levels().double()[quantizer.group_index]  # (C, L)
                nearest = (rows[:, :, None] - table[:, None, :]).abs().argmin(-1)
                q = table.gather(1, nearest)
            else:  # the method picks the level itself: its code for the weight
                q = quantizer.decode(quantizer.encode(rows.float())).double()
        total += (q - rows).square().mean()
    return total


def test_prototype_readme_snippet():
    # The prototype README's snippet, verbatim apart from the import.
    from timm_qconv import QuantConv2d, quantizeModel

    @quantizeModel(n_functions = 4,n_bits=2)
    class MyModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, )
            self.encoder = nn.Sequential(
                nn.Conv2d(64, 64, kernel_size=3, ),
                nn.Conv2d(64, 64, kernel_size=3, )
            )

    model = MyModel()
    assert isinstance(model.encoder[0],QuantConv2d) is True, "README snippet: encoder[0] is not a QuantConv2d"
    assert isinstance(model.conv1, QuantConv2d), "README snippet: conv1 is not a QuantConv2d"
    layer = model.encoder[1]
    assert layer.quant_config.n_bits == 2 and layer.quantizer.n_groups == 4, (
        f"README snippet: n_bits={layer.quant_config.n_bits}, groups={layer.quantizer.n_groups}, expected 2 and 4"
    )
    model.eval()
    loss = model.get_hash_loss()
    reference = mean_squared_error_to_levels(model)
    assert reference > 0, "the weights should not sit exactly on their levels"
    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=0,
                               msg=lambda m: f"get_hash_loss() is not the summed squared error to the levels: {m}")
    second = MyModel()
    assert isinstance(second.conv1, QuantConv2d), "a second instance of the decorated class is not quantized"


def test_decorator_on_instance():
    model = resnet_like()
    out = quantizeModel(n_functions=4, n_bits=2)(model)
    assert out is model, "quantizeModel(...)(model) returned a different object"
    assert quantized_names(model) == CONVS, f"quantizeModel(...)(model) quantized {quantized_names(model)}"
    assert model.layer1[0].conv1.quant_config.n_bits == 2, "n_bits not passed through the decorator"
    loss = model.eval().get_hash_loss()
    torch.testing.assert_close(loss.double(), mean_squared_error_to_levels(model), rtol=1e-5, atol=0,
                               msg=lambda m: f"get_hash_loss() is not the summed squared error to the levels: {m}")
    loss.backward()
    assert all(p.grad is not None for _, m in quantized_layers(model) for p in m.quantizer.parameters()), \
        "get_hash_loss() does not reach every quantizer's parameters"


def test_decorator_passes_conversion_options():
    decorate = quantizeModel(n_functions=2, n_bits=2, method="log", layers=("conv", "linear"), avoid=["layer2"])
    model = decorate(resnet_like())
    names = quantized_names(model)
    assert "head" in names and not any(n.startswith("layer2") for n in names), f"decorator options ignored: {names}"
    assert all(m.quantizer.name == "log" for _, m in quantized_layers(model)), "method= not passed by the decorator"


@pytest.mark.parametrize("method", METHODS)
def test_hash_loss_is_the_summed_squared_error_to_the_levels(method):
    model = quantize_model(resnet_like(), method=method, n_bits=2, n_functions=4, layers=("conv", "linear")).eval()
    layers = quantized_layers(model)
    assert len(layers) == len(CONVS) + 1, f"{method}: {len(layers)} quantized layers"
    expected = mean_squared_error_to_levels(model)
    total = hash_loss(model)
    torch.testing.assert_close(total.double(), expected, rtol=1e-5, atol=0,
                               msg=lambda m: f"{method}: hash_loss(model) != summed squared error to the levels: {m}")


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "avoid,kept",
    [
        ("layer1", ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]),
        (["layer1.*"], ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]),
        (("*.conv2",), ["layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2"]),
        (["stem", "layer2.0.conv1"], ["stem", "layer2.0.conv1"]),
        (["layer1.?.conv1", "layer2"], ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1", "layer2.0.conv2"]),
    ],
    ids=["name", "glob-children", "glob-suffix", "exact-names", "mixed"],
)
def test_avoid_names_and_globs(avoid, kept):
    model = quantize_model(resnet_like(), n_bits=2, n_functions=2, avoid=avoid)
    modules = dict(model.named_modules())
    for name in CONVS:
        if name in kept:
            assert type(modules[name]) is nn.Conv2d, f"avoid={avoid!r}: {name} was quantized"
        else:
            assert isinstance(modules[name], QuantConv2d), f"avoid={avoid!r}: {name} was left in float"


def test_filter_fn_selects_layers():
    model = quantize_model(resnet_like(), n_bits=2, filter_fn=lambda module, name: module.groups == 1)
    names = quantized_names(model)
    assert names == ["stem", "layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"], f"filter_fn selected {names}"


def test_skip_first_last_plain_model_uses_first_and_last_layer():
    model = quantize_model(resnet_like(), n_bits=2, layers=(nn.Conv2d, nn.Linear), skip_first_last=True)
    names = quantized_names(model)
    assert names == CONVS[1:], f"skip_first_last on a plain model quantized {names}; expected all but stem and head"
    model = quantize_model(resnet_like(), n_bits=2, skip_first_last=True)
    names = quantized_names(model)
    assert names == CONVS[1:-1], \
        f"skip_first_last with convs only quantized {names}; expected all but the first and last conv"


def test_skip_first_last_timm_uses_pretrained_cfg():
    # resnet10t has a deep stem: first_conv is "conv1.0", a conv inside a Sequential.
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    assert (model.pretrained_cfg["first_conv"], model.pretrained_cfg["classifier"]) == ("conv1.0", "fc")
    quantize_model(model, n_bits=2, n_functions=2, layers=(nn.Conv2d, nn.Linear), skip_first_last=True)
    assert type(model.conv1[0]) is nn.Conv2d, "resnet10t: first_conv conv1.0 was quantized"
    assert type(model.fc) is nn.Linear, "resnet10t: classifier fc was quantized"
    assert isinstance(model.conv1[3], QuantConv2d), "resnet10t: the stem's second conv was left in float"
    assert isinstance(model.layer1[0].conv1, QuantConv2d), "resnet10t: an inner conv was left in float"
    assert isinstance(model.layer4[0].conv2, QuantConv2d), "resnet10t: the last conv was left in float"


def test_skip_first_last_timm_keeps_last_conv_when_classifier_is_linear():
    # mobilenetv3's last conv is conv_head, but its classifier is a Linear: with convs only, the
    # pretrained_cfg rule skips conv_stem and nothing else (the first/last fallback would skip conv_head).
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    assert model.pretrained_cfg["first_conv"] == "conv_stem" and model.pretrained_cfg["classifier"] == "classifier"
    quantize_model(model, n_bits=2, n_functions=2, skip_first_last=True)
    assert type(model.conv_stem) is nn.Conv2d, "mobilenetv3: conv_stem was quantized"
    assert isinstance(model.conv_head, QuantConv2d), \
        "mobilenetv3: conv_head was skipped although it is not the classifier"


@pytest.mark.parametrize("layers", [(nn.Linear,), ("linear",), nn.Linear, "linear"],
                         ids=["class", "name", "bare-class", "bare-name"])
def test_layers_linear_only(layers):
    model = quantize_model(resnet_like(), n_bits=2, layers=layers)
    assert quantized_names(model) == ["head"], f"layers={layers!r} quantized {quantized_names(model)}"
    assert isinstance(model.head, QuantLinear), f"layers={layers!r}: head is {type(model.head).__name__}"


@pytest.mark.parametrize("layers", [("conv", "linear"), (nn.Conv2d, nn.Linear), ("Conv2d", "Linear")])
def test_layers_conv_and_linear(layers):
    model = quantize_model(resnet_like(), n_bits=2, layers=layers)
    assert quantized_names(model) == CONVS + ["head"], f"layers={layers!r} quantized {quantized_names(model)}"
    assert model(x_small()).shape == (2, 10), f"layers={layers!r}: bad output shape"


def test_subclasses_of_conv_are_not_swapped():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 4, 3), MyConv(4, 4, 3))
    quantize_model(model, n_bits=2)
    assert isinstance(model[0], QuantConv2d) and type(model[1]) is MyConv, (
        f"expected only the plain conv swapped, got {[type(m).__name__ for m in model]}"
    )


def test_shared_modules_are_replaced_everywhere():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Conv2d(4, 4, 3, padding=1)
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 1), self.shared, nn.ReLU())
            self.tail = nn.Sequential(OrderedDict(again=self.shared))

        def forward(self, x):
            return self.tail(self.shared(self.seq(x)))

    model = Tied()
    weight = model.shared.weight
    quantize_model(model, n_bits=2, n_functions=2)
    holders = [model.shared, model.seq[1], model.tail.again]
    assert all(h is holders[0] for h in holders), "the shared conv became several different modules"
    assert isinstance(holders[0], QuantConv2d), f"the shared conv is {type(holders[0]).__name__}"
    assert holders[0].weight is weight, "the shared conv's weight parameter was replaced"
    left = [n for n, m in model.named_modules(remove_duplicate=False) if type(m) is nn.Conv2d]
    assert not left, f"plain convs left under some parent: {left}"
    assert model(torch.randn(1, 3, 6, 6)).shape == (1, 4, 6, 6)
    freeze_model(model)
    assert model.shared is model.seq[1] is model.tail.again, "freezing untied the shared conv"
    assert type(model.shared) is nn.Conv2d, f"frozen shared conv is {type(model.shared).__name__}"


def test_module_shared_within_one_parent_is_replaced_in_every_slot():
    conv = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(conv, nn.ReLU(), conv)
    quantize_model(model, n_bits=2, n_functions=2)
    kinds = [type(m).__name__ for m in model]
    assert model[0] is model[2] and isinstance(model[0], QuantConv2d), f"tied conv slots after quantize_model: {kinds}"


# ----------------------------------------------------------------------------- freezing


@pytest.mark.parametrize("method", METHODS)
def test_freeze_model_leaves_only_plain_layers(method):
    model = quantize_model(resnet_like(), method=method, n_bits=2, n_functions=4, layers=("conv", "linear"))
    model.train()
    model(x_small())  # one training forward, so stateful quantizers have moved
    model.eval()
    x = x_small()
    with torch.no_grad():
        expected = model(x)
    frozen = freeze_model(model)
    assert frozen is model, f"{method}: freeze_model returned a different object"
    leftovers = [n for n, m in frozen.named_modules() if isinstance(m, QuantMixin)]
    assert not leftovers, f"{method}: quantized layers left after freezing: {leftovers}"
    foreign = [f"{n}: {type(m).__module__}" for n, m in frozen.named_modules()
               if type(m).__module__.startswith("timm_qconv")]
    assert not foreign, f"{method}: timm_qconv classes left after freezing: {foreign}"
    assert not any("quantizer" in k for k in frozen.state_dict()), \
        f"{method}: quantizer state left in the frozen state dict"
    with torch.no_grad():
        assert torch.equal(frozen(x), expected), f"{method}: frozen output differs from the quantized eval output"

    plain = resnet_like()  # a plain copy of the original architecture, other random weights
    plain.load_state_dict(frozen.state_dict(), strict=True)
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x), expected), \
            f"{method}: the frozen state dict loaded into a plain model gives other outputs"


def test_frozen_model_pickles_without_timm_qconv():
    model = quantize_model(resnet_like(), n_bits=2, layers=("conv", "linear"))
    buffer = io.BytesIO()
    torch.save(freeze_model(model), buffer)
    assert b"timm_qconv" not in buffer.getvalue(), "the pickled frozen model refers to timm_qconv"


def test_freeze_model_on_single_layer_and_frozen_weights_are_quantized():
    layer = QuantConv2d(3, 6, 3, n_bits=2, n_functions=3)
    frozen = freeze_model(copy.deepcopy(layer))
    assert type(frozen) is nn.Conv2d, f"freeze_model(layer) gave {type(frozen).__name__}"
    assert torch.equal(frozen.weight, layer.eval_quantized_weight()), "frozen weight is not the quantized weight"
    assert frozen.bias is not None and torch.equal(frozen.bias, layer.bias), "frozen bias differs"


def test_decorated_class_subclass_layers_are_converted():
    @quantizeModel(n_functions=2, n_bits=2)
    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

    class Child(Base):
        def __init__(self):
            super().__init__()
            self.extra = nn.Conv2d(4, 4, 3)  # added after the decorated __init__ returned

    child = Child()
    assert isinstance(child.conv, QuantConv2d) and isinstance(child.extra, QuantConv2d), (
        f"subclass layers: conv={type(child.conv).__name__}, extra={type(child.extra).__name__}"
    )
    assert child.extra.quant_config.n_bits == 2, "subclass layer did not get the decorator's settings"
