"""The plugin path: plugins registered inline, installed plugins found through entry points, the
``TIMM_QCONV_PLUGINS`` restriction, the first-party plugins under ``plugins/`` and every bad plugin.

The first-party plugins are reached through ``importlib.metadata.entry_points(group="timm_qconv")``
and the plugin manager, never imported by name: that is the path a third party's plugin takes.
``make dev`` installs them.
"""
import importlib.metadata
import importlib.util
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pluggy
import pytest
import torch
from torch import nn

from timm_qconv import (
    BitQuantizer,
    QuantConv2d,
    freeze_model,
    get_method,
    hookimpl,
    list_methods,
    make_config,
    quantize_model,
    quantized_layers,
)
from timm_qconv.methods import HashConfig, HashQuantizer
from timm_qconv.plugins import (
    BUILTIN,
    ENV_VAR,
    PluginError,
    call_hook,
    describe_plugins,
    get_plugin_manager,
    register_plugin,
    reset_plugin_manager,
    unregister_plugin,
)

BUILTIN_METHODS = ["hash", "kmeans", "linear", "log", "poly"]
FIRST_PARTY = {"apot": "timm_qconv_apot", "report": "timm_qconv_report"}  # entry point -> distribution


class PluginEnv:
    """Sets ``TIMM_QCONV_PLUGINS`` and installs fake distributions for one test; see :func:`env`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        self.monkeypatch, self.root, self.modules = monkeypatch, root, []

    def set(self, value: str | None) -> None:
        """Set the variable (``None``: unset) and rebuild the plugin manager."""
        if value is None:
            self.monkeypatch.delenv(ENV_VAR, raising=False)
        else:
            self.monkeypatch.setenv(ENV_VAR, value)
        reset_plugin_manager()

    def install(self, name: str, source: str) -> None:
        """A real installed distribution on ``sys.path`` whose ``timm_qconv`` entry point ``name`` is ``source``."""
        module = f"fake_timm_qconv_{name}"
        (self.root / f"{module}.py").write_text(textwrap.dedent(source))
        info = self.root / f"{module}-0.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.3\n")
        (info / "entry_points.txt").write_text(f"[timm_qconv]\n{name} = {module}\n")
        self.modules.append(module)
        self.monkeypatch.syspath_prepend(str(self.root))


@pytest.fixture
def env(monkeypatch, tmp_path):
    plugin_env = PluginEnv(monkeypatch, tmp_path)
    yield plugin_env
    monkeypatch.undo()
    for module in plugin_env.modules:
        sys.modules.pop(module, None)
    reset_plugin_manager()


def loaded_names() -> list[str]:
    return [row["name"] for row in describe_plugins()]


def entry_point(name: str) -> importlib.metadata.EntryPoint:
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group="timm_qconv")}
    assert name in found, f"no installed plugin {name!r} (entry points: {sorted(found)}); run `make dev`"
    return found[name]


# ----------------------------------------------------------------------------- inline plugins


@dataclass
class TwinConfig(HashConfig):
    """A config class of its own, so the registry can tell the twin from ``hash``."""


class TwinQuantizer(HashQuantizer):
    config_class = TwinConfig


class TwinPlugin:
    @hookimpl
    def register_methods(self, register):
        register("twin", TwinQuantizer)


def test_inline_plugin_adds_a_method_usable_everywhere_then_unregistered():
    assert "twin" not in list_methods()
    plugin = TwinPlugin()
    register_plugin(plugin, name="twin-plugin")
    try:
        assert "twin" in list_methods(), list_methods()
        model = quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 1)), method="twin", n_bits=2,
                               n_functions=2)
        assert all(isinstance(m.quantizer, TwinQuantizer) for _, m in quantized_layers(model))
        assert isinstance(QuantConv2d(3, 4, 3, method="twin").quantizer, TwinQuantizer)
        bq = BitQuantizer(nn.Sequential(nn.Conv2d(3, 4, 3)), n_fs=2, n_bits=2, method="twin").train_hash_functions(2)
        assert isinstance(bq.quantizers["0"], TwinQuantizer)
        row = next(r for r in describe_plugins() if r["name"] == "twin-plugin")
        assert row == {"name": "twin-plugin", "version": None, "hooks": ["register_methods"], "methods": ["twin"]}, row
    finally:
        unregister_plugin(plugin)
    assert "twin" not in list_methods(), "unregistering must remove the plugin's methods"
    with pytest.raises(ValueError, match="method='twin' is unknown"):
        get_method("twin")
    assert "twin-plugin" not in loaded_names()


@dataclass
class DecoratedConfig(HashConfig):
    """A config class of its own for the method registered with the decorator."""


def test_register_method_decorator_registers_the_class_and_returns_it():
    from timm_qconv import register_method
    from timm_qconv._registry import remove_method

    class Decorated(HashQuantizer):
        config_class = DecoratedConfig

    try:
        assert register_method("decorated")(Decorated) is Decorated, "the decorator must return the class unchanged"
        assert get_method("decorated") is Decorated and "decorated" in list_methods(), list_methods()
        assert isinstance(QuantConv2d(3, 4, 3, method="decorated", n_bits=2).quantizer, Decorated)
        assert register_method("decorated")(Decorated) is Decorated, "registering the same class again is allowed"
        with pytest.raises(ValueError, match="method name 'decorated' .* is already taken"):
            register_method("decorated")(type("Other", (HashQuantizer,), {}))
        with pytest.raises(TypeError, match="is not a Quantizer subclass"):
            register_method("not_a_quantizer")(dict)
        reset_plugin_manager()
        assert get_method("decorated") is Decorated, "a decorated method must survive a plugin manager reset"
    finally:
        remove_method("decorated")
    assert "decorated" not in list_methods()


def test_builtin_methods_register_through_the_plugin_hook():
    row = describe_plugins()[0]
    assert row["name"] == BUILTIN and row["hooks"] == ["register_methods"], row
    assert row["methods"] == BUILTIN_METHODS, row


# ----------------------------------------------------------------------------- entry points and the env var


def test_first_party_plugins_are_found_through_entry_points(env):
    env.set(None)  # unset: every installed plugin loads
    for name, dist in FIRST_PARTY.items():
        ep = entry_point(name)
        assert ep.dist is not None and ep.dist.metadata["Name"] == dist, f"{name}: from {ep.dist}"
        assert get_plugin_manager().get_plugin(name) is ep.load(), f"{name}: the manager did not load the entry point"
    rows = {row["name"]: row for row in describe_plugins()}
    assert rows["apot"]["version"] == entry_point("apot").dist.version and rows["apot"]["methods"] == ["apot"]
    assert rows["report"]["hooks"] == ["after_bit_quantizer", "training_event"], rows["report"]
    assert "apot" in list_methods()


@pytest.mark.parametrize("value, expected", [
    ("", []), ("0", []), ("apot", ["apot"]), ("report", ["report"]), (" apot , report ", ["apot", "report"]),
])
def test_env_var_restricts_which_plugins_load(env, value, expected):
    env.set(value)
    assert loaded_names() == [BUILTIN] + expected, f"{ENV_VAR}={value!r}: loaded {loaded_names()}"
    if "apot" in expected:
        assert "apot" in list_methods()
    else:
        with pytest.raises(ValueError, match="method='apot' is unknown"):
            quantize_model(nn.Sequential(nn.Conv2d(3, 4, 3)), method="apot")


def test_env_var_naming_no_installed_plugin_warns(env):
    env.set("apot,apto")
    with pytest.warns(UserWarning, match=r"names \['apto'\], which are not installed plugins"):
        assert loaded_names() == [BUILTIN, "apot"]


# ----------------------------------------------------------------------------- the apot plugin


def test_apot_is_usable_by_name_everywhere(env):
    env.set("apot")
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 4)), method="apot", n_bits=3,
                           n_functions=2, layers=("conv", "linear"))
    assert [type(m.quantizer).__name__ for _, m in quantized_layers(model)] == ["ApotQuantizer"] * 2
    layer = QuantConv2d(4, 8, 3, method="apot", n_bits=4, n_functions=2, base_bits=1).eval()
    assert layer.quant_config.base_bits == 1
    with torch.no_grad():
        q = layer.quantizer(layer.weight)
    for g in range(2):
        levels = torch.unique(q[4 * g: 4 * g + 4])
        assert levels.numel() <= 2**4, f"group {g}: {levels.numel()} levels for 4 bits"
    frozen = freeze_model(model)
    assert not quantized_layers(frozen)
    bq = BitQuantizer(nn.Sequential(nn.Conv2d(3, 8, 3)), n_fs=2, n_bits=3, method="apot").train_hash_functions(3)
    assert bq.report()[0].rel_error < 0.2, str(bq.report())


def test_apot_beats_log_at_4_bits(env):
    """With two additive terms, APoT's levels are denser near the largest weights than one power of two."""
    env.set("apot")
    model = nn.Sequential(nn.Conv2d(64, 64, 3))
    errors = {method: BitQuantizer(model, n_fs=4, n_bits=4, method=method).train_hash_functions(10).report().rel_error
              for method in ("apot", "log", "kmeans")}
    assert errors["kmeans"] <= errors["apot"] < 0.7 * errors["log"], errors


@pytest.mark.parametrize("options, error, words", [
    ({"base_bits": 0}, ValueError, "base_bits=0"),
    ({"base_bits": 8}, ValueError, "base_bits=8"),
    ({"base_bits": "2"}, TypeError, "base_bits='2'"),
    ({"init_iters": -1}, ValueError, "init_iters=-1"),
])
def test_apot_rejects_bad_options(env, options, error, words):
    env.set("apot")
    with pytest.raises(error, match=words):
        make_config("apot", **options)


# ----------------------------------------------------------------------------- the report plugin


def png_written(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_plugin_records_every_epoch_and_plots_at_the_end(env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TIMM_QCONV_REPORT_DIR", str(tmp_path / "report"))
    monkeypatch.setenv("TIMM_QCONV_REPORT", "1")
    env.set("report")
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)), n_bits=2, n_functions=2)
    for event, epoch in [("on_train_begin", 0), ("on_epoch_end", 0), ("on_epoch_end", 1), ("on_train_end", 1)]:
        call_hook("training_event", event=event, state=SimpleNamespace(epoch=epoch, global_step=10 * epoch),
                  control=None, payload={"model": model})
    lines = (tmp_path / "report" / "records.csv").read_text().splitlines()
    assert lines[0] == "event,epoch,step,layer,n_bits,rel_error,n_levels", lines[0]
    rows = [line.split(",") for line in lines[1:]]
    assert [(r[0], r[1], r[3]) for r in rows] == [
        ("on_epoch_end", "0", "0"), ("on_epoch_end", "0", "1"), ("on_epoch_end", "1", "0"), ("on_epoch_end", "1", "1"),
        ("on_train_end", "1", "0"), ("on_train_end", "1", "1")], rows
    for row in rows:
        assert 0 < float(row[5]) < 1, f"relative error {row[5]}"
        assert 1 < int(row[6]) <= 2 * 2**2, f"{row[6]} distinct levels for 2 groups of 2 bits"
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    for name in ("histograms.png", "errors.png"):
        assert png_written(tmp_path / "report" / name) == has_matplotlib, f"{name} (matplotlib: {has_matplotlib})"
    leftovers = [p.name for p in (tmp_path / "report").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left: {leftovers}"
    err = capsys.readouterr().err
    assert str((tmp_path / "report" / "records.csv").resolve()) in err, f"where it wrote was not said: {err!r}"


@pytest.mark.parametrize("value", [None, "0"])
def test_installed_report_plugin_does_nothing_unless_switched_on(env, tmp_path, monkeypatch, capsys, value):
    monkeypatch.chdir(tmp_path)
    if value is None:
        monkeypatch.delenv("TIMM_QCONV_REPORT", raising=False)
    else:
        monkeypatch.setenv("TIMM_QCONV_REPORT", value)
    env.set("report")
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1))
    BitQuantizer(model, n_functions=2, n_bits=2).train_hash_functions(2)
    quantize_model(model, n_bits=2, n_functions=2)
    for event in ("on_train_begin", "on_epoch_end", "on_train_end"):
        call_hook("training_event", event=event, state=SimpleNamespace(epoch=0, global_step=0), control=None,
                  payload={"model": model})
    assert not list(tmp_path.iterdir()), f"the installed plugin wrote {list(tmp_path.iterdir())} without being asked"
    assert "timm_qconv_report" not in capsys.readouterr().err


def test_report_histogram_shows_one_group_levels_over_its_weights():
    from timm_qconv_report.snapshot import from_model

    model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3)), n_bits=2, n_functions=4)
    (snap,) = from_model(model)
    group = model[0].weight.detach()[model[0].quantizer.group_index == 0].flatten()
    assert snap.n_groups == 4 and 1 < snap.group_levels.numel() <= 2**2, (snap.n_groups, snap.group_levels)
    assert torch.equal(snap.weight_sample, group), "the histogram's weights are not the first group's"
    assert snap.n_levels > snap.group_levels.numel(), "the layer's levels should outnumber one group's"


def test_report_plugin_instance_records_bit_quantizer_passes_as_json(tmp_path):
    ReportPlugin = type(entry_point("report").load())
    plugin = ReportPlugin(out_dir=tmp_path, fmt="json", plots=False)
    register_plugin(plugin, name="json-report")
    try:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(8, 2))
        BitQuantizer(model, n_fs=2, n_bits=3, layers=("conv", "linear")).train_hash_functions(2)
    finally:
        unregister_plugin(plugin)
    rows = json.loads((tmp_path / "records.json").read_text())
    found = [(r["event"], r["layer"], r["n_bits"]) for r in rows]
    assert found == [("bit_quantizer", "0", 3), ("bit_quantizer", "1", 3)]


def test_report_plugin_writes_only_on_the_main_process(tmp_path):
    plugin = type(entry_point("report").load())(out_dir=tmp_path)
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3)), n_bits=2, n_functions=2)
    register_plugin(plugin, name="rank-1-report")
    try:
        for event in ("on_train_begin", "on_epoch_end", "on_train_end"):
            call_hook("training_event", event=event, state=SimpleNamespace(epoch=0, is_main_process=False),
                      control=None, payload={"model": model})
    finally:
        unregister_plugin(plugin)
    assert not list(tmp_path.iterdir()), f"a non-main process wrote {list(tmp_path.iterdir())}"


def test_report_plugin_rejects_bad_formats(tmp_path, monkeypatch):
    ReportPlugin = type(entry_point("report").load())
    with pytest.raises(ValueError, match=r"fmt='xml' is not allowed; expected one of \['csv', 'json'\]"):
        ReportPlugin(fmt="xml")
    monkeypatch.setenv("TIMM_QCONV_REPORT_FORMAT", "yaml")
    plugin = ReportPlugin(out_dir=tmp_path)
    model = quantize_model(nn.Sequential(nn.Conv2d(3, 8, 3)), n_bits=2, n_functions=2)
    with pytest.raises(ValueError, match="TIMM_QCONV_REPORT_FORMAT='yaml' is not allowed"):
        plugin.training_event(event="on_epoch_end", state=None, payload={"model": model})


# ----------------------------------------------------------------------------- bad plugins


class Registers:
    """Registers ``name`` as a method (a fresh class each time)."""

    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def register_methods(self, register):
        register(self.name, type("Clashing", (TwinQuantizer,), {}))


def test_method_name_clash_between_plugins_names_both():
    first = Registers("dup")
    register_plugin(first, name="first-plugin")
    try:
        with pytest.raises(PluginError) as info:
            register_plugin(Registers("dup"), name="second-plugin")
        message = str(info.value)
        assert "'second-plugin' failed in hook 'register_methods'" in message, message
        assert "already taken by first-plugin" in message, message
        assert "second-plugin" not in loaded_names(), "a plugin that failed to register must be removed"
        assert get_method("dup").__module__ == __name__
    finally:
        unregister_plugin(first)


def test_method_name_clash_with_a_builtin_names_both():
    with pytest.raises(PluginError, match="'hash' registered by impostor is already taken by timm_qconv.methods"):
        register_plugin(Registers("hash"), name="impostor")
    assert get_method("hash") is HashQuantizer


def test_wrong_hook_signature_is_rejected_with_the_plugin_name():
    class Wrong:
        @hookimpl
        def layer_quant_config(self, name, module, config, bits):
            return None

    with pytest.raises(pluggy.PluginValidationError) as info:
        register_plugin(Wrong(), name="wrong-signature")
    message = str(info.value)
    assert "'wrong-signature' for hook 'layer_quant_config'" in message and "{'bits'}" in message, message
    assert "wrong-signature" not in loaded_names()


def test_unknown_hook_is_rejected_with_a_suggestion():
    class Typo:
        @hookimpl
        def register_method(self, register):
            pass

    with pytest.raises(pluggy.PluginValidationError, match="'typo' implements 'register_method'.*register_methods"):
        register_plugin(Typo(), name="typo")
    assert "typo" not in loaded_names()


def test_unregistering_an_unknown_plugin_is_an_error():
    with pytest.raises(ValueError, match="plugin 'nobody' is not registered"):
        unregister_plugin("nobody")


REGISTERS_DUP = """
    from timm_qconv import hookimpl
    from timm_qconv.methods import LogQuantizer

    class Dup(LogQuantizer):
        pass

    @hookimpl
    def register_methods(register):
        register("dup", Dup)
"""


def test_installed_plugins_clashing_name_both(env):
    env.install("one", REGISTERS_DUP)
    env.install("two", REGISTERS_DUP)
    env.set("one,two")
    with pytest.raises(PluginError) as info:
        list_methods()
    message = str(info.value)
    assert "installed plugin 'two'" in message and "already taken by one" in message, message
    assert ENV_VAR in message, "the error should say how to skip the plugin"
    env.set("")
    assert list_methods() == BUILTIN_METHODS, "a failed load must leave the registry as it was"
    env.set("one")
    assert list_methods() == sorted(BUILTIN_METHODS + ["dup"])


@pytest.mark.parametrize("source, words", [
    ("from timm_qconv import hookimpl\n@hookimpl\ndef after_freeze(model, extra):\n    pass\n", "{'extra'}"),
    ("raise ImportError('needs a missing package')\n", "needs a missing package"),
])
def test_broken_installed_plugin_is_named(env, source, words):
    env.install("broken", source)
    env.set("broken")
    with pytest.raises(PluginError) as info:
        list_methods()
    assert "installed plugin 'broken'" in str(info.value) and words in str(info.value), str(info.value)


def test_builtin_method_lookup_does_not_load_installed_plugins(env):
    env.install("broken", "raise ImportError('needs a missing package')\n")
    env.set("broken")
    assert get_method("hash").name == "hash", "a built-in lookup must not need the installed plugins"
    assert isinstance(QuantConv2d(3, 4, 3, method="kmeans", n_bits=2).quantizer, get_method("kmeans"))
    with pytest.raises(PluginError, match="installed plugin 'broken'"):
        get_method("apot")  # unknown among the built-ins: the installed plugins load, and one fails
