"""Bad input: a ValueError/TypeError naming the argument and the value, and the model left untouched."""
import re

import pytest
import torch
from torch import nn

from timm_qconv import QuantConv2d, QuantLinear, freeze_model, hash_loss, list_methods, quantize_model, quantizeModel

from conftest import assert_unchanged, small_model, snapshot

BAD_ARGUMENTS = {
    "n_bits=0": (dict(n_bits=0), ValueError, r"n_bits=0\b.*1\.\.8"),
    "n_bits=9": (dict(n_bits=9), ValueError, r"n_bits=9\b.*1\.\.8"),
    "n_functions=0": (dict(n_functions=0), ValueError, r"n_functions=0\b.*>= 1"),
    "n_functions=-3": (dict(n_functions=-3), ValueError, r"n_functions=-3\b"),
    "unknown-method": (dict(method="nope"), ValueError, r"method='nope'.*" + ".*".join(list_methods())),
    "method-int": (dict(method=42), TypeError, r"method=42\b"),
    "avoid-no-match": (dict(avoid=["layer1.conv3"]), ValueError, r"avoid.*'layer1\.conv3'.*layer1\.conv1"),
    "avoid-glob-no-match": (dict(avoid="*.attn"), ValueError, r"avoid.*'\*\.attn'"),
    "n_bits-str": (dict(n_bits="2"), TypeError, r"n_bits='2'.*str"),
    "n_bits-float": (dict(n_bits=2.0), TypeError, r"n_bits=2\.0.*float"),
    "n_bits-bool": (dict(n_bits=True), TypeError, r"n_bits=True"),
    "n_functions-float": (dict(n_functions=4.0), TypeError, r"n_functions=4\.0"),
    "layers-int": (dict(layers=[42]), TypeError, r"layers.*\b42\b"),
    "layers-unknown-name": (dict(layers=("attention",)), ValueError, r"layers.*'attention'"),
    "layers-other-class": (dict(layers=(nn.BatchNorm2d,)), ValueError, r"layers.*BatchNorm2d"),
    "layers-empty": (dict(layers=()), TypeError, r"layers=\(\)"),
    "avoid-int": (dict(avoid=[3]), TypeError, r"avoid.*\b3\b"),
    "mode": (dict(mode="fast"), ValueError, r"mode='fast'.*ste.*float"),
    "unknown-option": (dict(frobnicate=1), TypeError, r"frobnicate"),
    "option-of-other-method": (dict(method="linear", temperature=1.0), TypeError, r"temperature"),
    "poly-temperature": (dict(method="poly", temperature=0), ValueError, r"temperature=0"),
    "init_iters": (dict(method="hash", init_iters=-1), ValueError, r"init_iters=-1\b"),
    "skip_first_last-str": (dict(skip_first_last="yes"), TypeError, r"skip_first_last='yes'"),
    "filter_fn-int": (dict(filter_fn=3), TypeError, r"filter_fn=3\b"),
}


@pytest.mark.parametrize("kwargs,error,pattern", list(BAD_ARGUMENTS.values()), ids=list(BAD_ARGUMENTS))
def test_bad_argument_raises_and_leaves_model(kwargs, error, pattern):
    model = small_model()
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        quantize_model(model, **kwargs)
    assert_unchanged(model, before, f"quantize_model(**{kwargs})")


@pytest.mark.parametrize("kwargs,error,pattern", list(BAD_ARGUMENTS.values()), ids=list(BAD_ARGUMENTS))
def test_bad_argument_raises_from_decorator(kwargs, error, pattern):
    """The decorator fails on a class or an instance the same way (config errors at decoration time)."""
    model = small_model()
    before = snapshot(model)
    with pytest.raises(error, match=pattern):
        quantizeModel(**kwargs)(model)
    assert_unchanged(model, before, f"quantizeModel(**{kwargs})(model)")


@pytest.mark.parametrize("kwargs,error,pattern", [
    (dict(n_bits=0), ValueError, r"n_bits=0\b"),
    (dict(n_bits=9), ValueError, r"n_bits=9\b"),
    (dict(n_functions=0), ValueError, r"n_functions=0\b"),
    (dict(method="nope"), ValueError, r"method='nope'.*hash"),
    (dict(n_bits="2"), TypeError, r"n_bits='2'"),
    (dict(mode="fast"), ValueError, r"mode='fast'"),
    (dict(frobnicate=1), TypeError, r"frobnicate"),
], ids=["n_bits=0", "n_bits=9", "n_functions=0", "method", "n_bits-str", "mode", "option"])
@pytest.mark.parametrize("cls", [QuantConv2d, QuantLinear])
def test_bad_argument_raises_from_layers(cls, kwargs, error, pattern):
    args = (3, 4, 3) if cls is QuantConv2d else (3, 4)
    with pytest.raises(error, match=pattern):
        cls(*args, **kwargs)
    float_layer = nn.Conv2d(3, 4, 3) if cls is QuantConv2d else nn.Linear(3, 4)
    weight = float_layer.weight.detach().clone()
    with pytest.raises(error, match=pattern):
        cls.from_float(float_layer, **kwargs)
    assert torch.equal(float_layer.weight, weight), f"{cls.__name__}.from_float(**{kwargs}) changed the float weight"


@pytest.mark.parametrize("model", [
    pytest.param("resnet", id="str"),
    pytest.param(42, id="int"),
])
def test_model_of_wrong_type(model):
    with pytest.raises(TypeError, match=rf"model.*{re.escape(repr(model))}"):
        quantize_model(model, n_bits=2)


@pytest.mark.parametrize("model", ["resnet", 42, None], ids=["str", "int", "None"])
def test_model_of_wrong_type_names_argument(model):
    with pytest.raises(TypeError, match=r"\bmodel\b.*nn\.Module"):
        quantize_model(model, n_bits=2)
    with pytest.raises(TypeError, match=r"\bmodel\b.*nn\.Module"):
        freeze_model(model)
    with pytest.raises(TypeError, match=re.escape(repr(model))):
        quantizeModel(n_bits=2)(model)


@pytest.mark.parametrize("model,kwargs", [
    (nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), {}),
    (nn.Sequential(nn.Conv2d(3, 4, 3)), dict(layers=(nn.Linear,))),
    (small_model(), dict(avoid=["stem", "layer1"])),
    (small_model(), dict(filter_fn=lambda module, name: False)),
], ids=["no-layers", "no-linear", "all-avoided", "filter-rejects-all"])
def test_nothing_to_quantize(model, kwargs):
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"no layer.*layers="):
        quantize_model(model, n_bits=2, **kwargs)
    assert_unchanged(model, before, f"quantize_model(**{kwargs}) with nothing to quantize")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", list_methods())
def test_non_finite_weight_names_the_layer(method, bad):
    model = small_model()
    with torch.no_grad():
        model.layer1.conv2.weight[1, 2, 0, 0] = bad
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer1\.conv2"):
        quantize_model(model, method=method, n_bits=2)
    assert_unchanged(model, before, f"{method}: quantize_model with a {bad} weight")
    # The same layer, avoided, is fine.
    quantize_model(model, method=method, n_bits=2, avoid=["layer1.conv2"])
    assert type(model.layer1.conv2) is nn.Conv2d, f"{method}: the avoided non-finite layer was quantized"


@pytest.mark.parametrize("cls", [QuantConv2d, QuantLinear])
def test_non_finite_weight_in_from_float(cls):
    float_layer = nn.Conv2d(3, 4, 3) if cls is QuantConv2d else nn.Linear(3, 4)
    with torch.no_grad():
        float_layer.weight.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        cls.from_float(float_layer, n_bits=2)


def test_from_float_of_wrong_layer_kind():
    with pytest.raises(TypeError, match=r"module=Linear.*QuantConv2d"):
        QuantConv2d.from_float(nn.Linear(3, 3))
    with pytest.raises(TypeError, match=r"module=Conv2d.*QuantLinear"):
        QuantLinear.from_float(nn.Conv2d(3, 3, 1))


def test_hash_loss_without_quantized_layers():
    with pytest.raises(ValueError, match="no quantized layer"):
        hash_loss(small_model())


def test_decorator_rejects_bad_config_at_decoration_time():
    with pytest.raises(ValueError, match=r"n_bits=0\b"):
        @quantizeModel(n_functions=4, n_bits=0)
        class Model(nn.Module):
            pass
