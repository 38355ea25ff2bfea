"""The hooks the library fires: per-layer decisions, before/after quantize and freeze, BitQuantizer
passes, training events, and errors raised inside a plugin.

Each test registers a plugin object inline and unregisters it in ``finally``.
"""
from collections import OrderedDict
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import timm
import torch
from torch import nn

from timm_qconv import BitQuantizer, LogConfig, QuantMixin, freeze_model, hookimpl, quantize_model, quantized_layers
from timm_qconv.plugins import PluginError, call_hook, register_plugin, unregister_plugin

from conftest import assert_unchanged, snapshot


@contextmanager
def registered(plugin: Any, name: str) -> Iterator[Any]:
    register_plugin(plugin, name=name)
    try:
        yield plugin
    finally:
        unregister_plugin(plugin)


def model_with_downsample() -> nn.Sequential:
    """stem, body and down convs and a linear head."""
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, padding=1), act=nn.ReLU(),
        body=nn.Conv2d(8, 8, 3, padding=1), down=nn.Conv2d(8, 8, 1, stride=2),
        pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), head=nn.Linear(8, 4),
    ))


class Decide:
    """A ``layer_quant_config`` plugin answering ``decisions[name]`` (``None`` for unlisted layers)."""

    def __init__(self, decisions: dict[str, Any]) -> None:
        self.decisions = decisions

    @hookimpl
    def layer_quant_config(self, name, module, config):
        return self.decisions.get(name)


# ----------------------------------------------------------------------------- layer_quant_config


def test_first_result_hook_gives_downsample_convs_8_bits():
    class EightBitDownsample:
        @hookimpl
        def layer_quant_config(self, name, module, config):
            return {"n_bits": 8} if "downsample" in name else None

    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    # Not layer2-4's 3x3 convs: fitting them costs seconds and shows nothing more.
    some = lambda module, name: "downsample" in name or name.startswith(("conv1", "layer1"))  # noqa: E731
    with registered(EightBitDownsample(), "eight-bit-downsample"):
        quantize_model(model, method="linear", n_bits=4, n_functions=4, filter_fn=some)
    bits = {name: layer.quant_config.n_bits for name, layer in quantized_layers(model)}
    downsample = [n for n in bits if "downsample" in n]
    assert downsample == ["layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"], downsample
    assert len(bits) == 1 + 4 + 3, f"expected conv1, layer1's four convs and three downsample convs: {list(bits)}"
    for name, n_bits in bits.items():
        expected = 8 if name in downsample else 4
        assert n_bits == expected, f"{name}: n_bits {n_bits}, expected {expected}"
    assert all(layer.quant_config.n_functions == 4 for _, layer in quantized_layers(model)), \
        "a dict override must keep the fields it does not name"


def test_first_result_hook_sets_bit_quantizer_bits():
    model = model_with_downsample()
    with registered(Decide({"down": {"n_bits": 8}, "head": False}), "decide"):
        bq = BitQuantizer(model, n_fs=2, n_bits=3, layers=("conv", "linear")).train_hash_functions(n_iter=2)
    assert bq.layer_names == ["stem", "body", "down"], f"head was kept in float by the plugin: {bq.layer_names}"
    bits = {r.name: r.n_bits for r in bq.report()}
    assert bits == {"stem": 3, "body": 3, "down": 8}, bits
    assert len(torch.unique(bq.quantized_weight("down"))) > 2 * 2**3, "the 8-bit layer should have more levels"


def test_hook_keeps_layer_float_or_replaces_its_config():
    model = model_with_downsample()
    with registered(Decide({"stem": False, "down": LogConfig(n_bits=2, n_functions=1)}), "decide"):
        quantize_model(model, n_bits=3, n_functions=2)
    assert type(model.stem) is nn.Conv2d, "False must keep the layer in float"
    assert isinstance(model.body, QuantMixin) and model.body.quant_config.n_bits == 3
    assert model.down.quant_config == LogConfig(n_bits=2, n_functions=1), f"got {model.down.quant_config}"
    assert type(model.down.quantizer).__name__ == "LogQuantizer"


def test_hook_keeping_every_layer_float_is_an_error():
    model = model_with_downsample()
    before = snapshot(model)
    with registered(Decide({"stem": False, "body": False, "down": False}), "all-float"):
        with pytest.raises(ValueError, match="kept every selected layer"):
            quantize_model(model)
    assert_unchanged(model, before, "a failed quantize_model")


@pytest.mark.parametrize("decision, error, words", [
    ("8 bits", TypeError, ["'body'", "'8 bits'", "None, False, a QuantConfig or a dict"]),
    ({"bits": 8}, TypeError, ["'body'", "bits", "allowed"]),
    ({"n_bits": 9}, ValueError, ["'body'", "n_bits=9"]),
])
def test_bad_hook_decision_names_the_layer_and_changes_nothing(decision, error, words):
    model = model_with_downsample()
    before = snapshot(model)
    with registered(Decide({"body": decision}), "bad-decision"):
        with pytest.raises(error) as info:
            quantize_model(model, layers=("conv", "linear"))
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"
    assert_unchanged(model, before, "a failed quantize_model")


# ----------------------------------------------------------------------------- before / after


class Recorder:
    """Records every hook call with its arguments."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    @hookimpl
    def before_quantize(self, model, config):
        self.calls.append(("before_quantize", {"model": model, "config": config,
                                               "quantized": len(quantized_layers(model))}))

    @hookimpl
    def after_quantize(self, model, layers):
        self.calls.append(("after_quantize", {"model": model, "layers": layers,
                                              "quantized": len(quantized_layers(model))}))

    @hookimpl
    def before_freeze(self, model):
        self.calls.append(("before_freeze", {"model": model, "quantized": len(quantized_layers(model))}))

    @hookimpl
    def after_freeze(self, model):
        self.calls.append(("after_freeze", {"model": model, "quantized": len(quantized_layers(model))}))

    @hookimpl
    def after_bit_quantizer(self, quantizer, report):
        self.calls.append(("after_bit_quantizer", {"quantizer": quantizer, "report": report}))

    @hookimpl
    def training_event(self, event, state, control, payload):
        self.calls.append(("training_event", {"event": event, "state": state, "control": control, "payload": payload}))


def test_quantize_and_freeze_hooks_fire_in_order_with_their_arguments():
    model = model_with_downsample()
    with registered(Recorder(), "recorder") as recorder:
        quantize_model(model, n_bits=2, n_functions=2, avoid=["down"])
        freeze_model(model)
    events = [name for name, _ in recorder.calls]
    assert events == ["before_quantize", "after_quantize", "before_freeze", "after_freeze"], events
    calls = dict(recorder.calls)
    assert all(call["model"] is model for call in calls.values()), "every hook must get the model itself"
    assert calls["before_quantize"]["config"].n_bits == 2, calls["before_quantize"]["config"]
    assert calls["before_quantize"]["quantized"] == 0, "before_quantize must run before any swap"
    assert calls["after_quantize"]["layers"] == ["stem", "body"], calls["after_quantize"]["layers"]
    assert calls["after_quantize"]["quantized"] == 2
    assert calls["before_freeze"]["quantized"] == 2 and calls["after_freeze"]["quantized"] == 0


def test_freeze_hooks_get_the_plain_layer_when_freezing_a_single_layer():
    layer = quantize_model(nn.Sequential(nn.Conv2d(3, 4, 1)), n_bits=2, n_functions=1)[0]
    with registered(Recorder(), "recorder") as recorder:
        plain = freeze_model(layer)
    calls = dict(recorder.calls)
    assert calls["before_freeze"]["model"] is layer and calls["after_freeze"]["model"] is plain


def test_after_bit_quantizer_receives_the_report():
    model = model_with_downsample()
    with registered(Recorder(), "recorder") as recorder:
        bq = BitQuantizer(model, n_fs=2, n_bits=2, layers=("conv", "linear")).train_hash_functions(n_iter=2)
    assert [name for name, _ in recorder.calls] == ["after_bit_quantizer"], recorder.calls
    call = recorder.calls[0][1]
    assert call["quantizer"] is bq and call["report"] is bq.report()
    assert [r.name for r in call["report"]] == ["stem", "body", "down", "head"]


def test_call_hook_forwards_training_events():
    state, control = SimpleNamespace(epoch=1, step=10), SimpleNamespace(should_stop=False)
    with registered(Recorder(), "recorder") as recorder:
        results = call_hook("training_event", event="on_step_end", state=state, control=control, payload={"loss": 1.0})
    assert results == [], "implementations returning None contribute nothing"
    assert recorder.calls == [("training_event", {"event": "on_step_end", "state": state, "control": control,
                                                  "payload": {"loss": 1.0}})]


def test_call_hook_rejects_unknown_hooks_and_arguments():
    with pytest.raises(ValueError, match="'on_step_end' is not a timm_qconv hook.*training_event"):
        call_hook("on_step_end", event="x")
    with pytest.raises(TypeError, match="takes the arguments \\['event', 'state', 'control', 'payload'\\]"):
        call_hook("training_event", event="on_step_end", state=None)


# ----------------------------------------------------------------------------- a plugin that raises


class Raises:
    """Raises inside the hook named ``hook``."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    def _maybe_raise(self, hook: str) -> None:
        if hook == self.hook:
            raise KeyError(f"broken in {hook}")

    @hookimpl
    def layer_quant_config(self, name, module, config):
        self._maybe_raise("layer_quant_config")

    @hookimpl
    def before_quantize(self, model, config):
        self._maybe_raise("before_quantize")

    @hookimpl
    def after_freeze(self, model):
        self._maybe_raise("after_freeze")

    @hookimpl
    def after_bit_quantizer(self, quantizer, report):
        self._maybe_raise("after_bit_quantizer")

    @hookimpl
    def training_event(self, event, state, control, payload):
        self._maybe_raise("training_event")


@pytest.mark.parametrize("hook", ["layer_quant_config", "before_quantize", "after_freeze", "after_bit_quantizer",
                                  "training_event"])
def test_plugin_raising_in_a_hook_is_named(hook):
    model = model_with_downsample()
    before = snapshot(model)
    with registered(Raises(hook), "fragile"), registered(Recorder(), "bystander"):
        with pytest.raises(PluginError) as info:
            if hook in ("layer_quant_config", "before_quantize"):
                quantize_model(model, n_bits=2, n_functions=1)
            elif hook == "after_freeze":
                freeze_model(quantize_model(model, n_bits=2, n_functions=1))
            elif hook == "after_bit_quantizer":
                BitQuantizer(model, n_fs=1, n_bits=2).train_hash_functions(n_iter=1)
            else:
                call_hook("training_event", event="on_epoch_end", state=None, control=None, payload={})
    message = str(info.value)
    assert message.startswith(f"plugin 'fragile' failed in hook '{hook}': KeyError"), message
    assert isinstance(info.value.__cause__, KeyError), "the plugin's own exception must be the cause"
    if hook in ("layer_quant_config", "before_quantize"):
        assert_unchanged(model, before, "a failed quantize_model")
