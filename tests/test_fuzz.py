"""Fuzzing the loaders and the argument checks (hypothesis), and killing saves halfway.

Every damaged or crafted input must end in a clean ``ValueError`` (``TypeError`` for arguments of
the wrong type), never another exception, a hang, or a changed model; every ``SIGKILL`` of a
process in the middle of ``save_quantized`` must leave an export that loads, old or new.
Example counts are small so that the file runs in well under a minute on one core.
"""
from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from export_helpers import resign
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from timm_qconv import (
    BitQuantizer,
    QuantMixin,
    atomic,
    freeze_model,
    load_quantized,
    quantize_model,
    quantized_layers,
    save_quantized,
)
from timm_qconv.callbacks import CallbackHandler, HashLossCallback
from timm_qconv.export import CONFIG_FILE, WEIGHTS_FILE

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
                database=None)  # reproducible, and nothing written into the checkout

# ---------------------------------------------------------------------------------- one valid export
_ROOT = Path(tempfile.mkdtemp(prefix="timm_qconv_fuzz_"))


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=3)


_BQ = BitQuantizer(_tiny(), 4, 2).train_hash_functions(1)
_EXPORT = save_quantized(_BQ, _ROOT / "valid")
_FILES = {name: (_EXPORT / name).read_bytes() for name in (WEIGHTS_FILE, CONFIG_FILE)}
_WANT = {k: v.clone() for k, v in load_quantized(_EXPORT).state_dict().items()}


def _fresh_copy() -> Path:
    folder = Path(tempfile.mkdtemp(dir=_ROOT)) / "q"
    folder.mkdir()
    for name, data in _FILES.items():
        (folder / name).write_bytes(data)
    return folder


def _load_is_clean(folder: Path) -> str:
    """Load; the outcome must be a ValueError or exactly the saved model. Returns which."""
    try:
        model = load_quantized(folder)
    except ValueError:
        return "refused"
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    got = model.state_dict()
    assert got.keys() == _WANT.keys() and all(torch.equal(got[k], _WANT[k]) for k in _WANT), \
        "a load that succeeds must give exactly the saved model"
    return "identical"


@FUZZ
@given(which=st.sampled_from([WEIGHTS_FILE, CONFIG_FILE]), cut=st.floats(0, 1, exclude_max=True))
def test_truncated_files_are_refused(which: str, cut: float) -> None:
    folder = _fresh_copy()
    data = _FILES[which]
    (folder / which).write_bytes(data[: int(len(data) * cut)])
    outcome = _load_is_clean(folder)
    if which == WEIGHTS_FILE or int(len(data) * cut) < len(data.rstrip()):  # the config may lose its final newline
        assert outcome == "refused", f"{which} cut to {cut:.0%} was accepted"


@FUZZ
@given(which=st.sampled_from([WEIGHTS_FILE, CONFIG_FILE]), data=st.data())
def test_flipped_bytes_are_refused_or_harmless(which: str, data: st.DataObject) -> None:
    folder = _fresh_copy()
    content = bytearray(_FILES[which])
    for _ in range(data.draw(st.integers(1, 4), label="flips")):
        position = data.draw(st.integers(0, len(content) - 1), label="position")
        content[position] ^= data.draw(st.integers(1, 255), label="mask")
    (folder / which).write_bytes(bytes(content))
    _load_is_clean(folder)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)
_INTERESTING = st.sampled_from([0, -1, 1, 2, 3, 10**8, 2**40, "", "float32", "bool", "hf-hub:x/y", "resnet18",
                                "test_resnet", [], {}, [1], [0, 3], [10**6, 10**6], None, True, 1.5])


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to an entry of a JSON object, to pick one to edit."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, prefix + (index,))
    return found


def _set_path(config: Any, path: tuple, value: Any, delete: bool) -> None:
    target = config
    for key in path[:-1]:
        target = target[key]
    if delete and isinstance(target, dict):
        del target[path[-1]]
    else:
        target[path[-1]] = value


@FUZZ
@given(data=st.data(), consistent=st.booleans())
def test_json_edits_are_refused_or_harmless(data: st.DataObject, consistent: bool) -> None:
    config = json.loads(_FILES[CONFIG_FILE])
    path = data.draw(st.sampled_from(_paths(config)), label="path")
    value = data.draw(_INTERESTING | _JSON, label="value")
    delete = data.draw(st.booleans(), label="delete")
    folder = _fresh_copy()
    if consistent:  # a crafted export: checksum and config digest match the edited config
        resign(folder, lambda c: _set_path(c, path, value, delete))
    else:
        _set_path(config, path, value, delete)
        (folder / CONFIG_FILE).write_text(json.dumps(config))
    _load_is_clean(folder)


# ---------------------------------------------------------------------------------- callbacks' state
def _handler() -> CallbackHandler:
    handler = CallbackHandler([HashLossCallback(n_bits=2, n_functions=2)])
    torch.manual_seed(0)
    handler.on_init(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    return handler


_GOOD_STATE = json.loads(json.dumps(_handler().state_dict()))


@FUZZ
@given(data=st.data())
def test_callback_state_edits_are_refused_whole_or_applied(data: st.DataObject) -> None:
    state = copy.deepcopy(_GOOD_STATE)
    if data.draw(st.booleans(), label="replace whole"):
        state = data.draw(_JSON.filter(lambda v: v is not None), label="state")  # None means "no state"
    else:
        path = data.draw(st.sampled_from(_paths(state)), label="path")
        _set_path(state, path, data.draw(_INTERESTING | _JSON, label="value"), data.draw(st.booleans(), label="del"))
    handler = _handler()
    before = handler.state_dict()
    layers = [type(m) for m in handler.model.modules()]
    try:
        handler.on_load(state_dict=state)
    except ValueError:
        assert handler.state_dict() == before, "a refused state must change nothing"
        assert [type(m) for m in handler.model.modules()] == layers, "a refused state must not freeze the model"
        return
    assert handler.state_dict() == json.loads(json.dumps(state)), "an accepted state is applied as given"


# ---------------------------------------------------------------------------------- arguments
_ARGUMENT = st.none() | st.booleans() | st.integers(-3, 40) | st.floats(allow_nan=True) | st.text(max_size=8) \
    | st.sampled_from(["hash", "kmeans", "log", "linear", "poly", "conv", "linear", "0", "*", "ste", "float"]) \
    | st.lists(st.sampled_from(["0", "2", "conv", "linear", "*", 3]), max_size=3)


def _small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


@FUZZ
@given(kwargs=st.fixed_dictionaries({}, optional={
    "method": _ARGUMENT, "n_bits": _ARGUMENT, "n_functions": _ARGUMENT, "layers": _ARGUMENT, "avoid": _ARGUMENT,
    "skip_first_last": _ARGUMENT, "mode": _ARGUMENT}))
def test_quantize_model_arguments_are_checked(kwargs: dict[str, Any]) -> None:
    model = _small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        quantize_model(model, **kwargs)
    except (TypeError, ValueError):
        assert not quantized_layers(model), f"a refused call must convert nothing: {kwargs}"
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "weights must be unchanged"


@FUZZ
@given(args=st.fixed_dictionaries({"n_fs": _ARGUMENT, "n_bits": _ARGUMENT}, optional={
    "avoid": _ARGUMENT, "layers": _ARGUMENT, "method": _ARGUMENT, "device": _ARGUMENT}), n_iter=_ARGUMENT)
def test_bit_quantizer_arguments_are_checked(args: dict[str, Any], n_iter: Any) -> None:
    model = _small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        BitQuantizer(model, **args).train_hash_functions(n_iter)
    except (TypeError, ValueError):
        pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "BitQuantizer never changes the model"


# ---------------------------------------------------------------------------------- SIGKILL halfway
def _qat_model(n_bits: int) -> nn.Module:
    return quantize_model(_small(), n_bits=n_bits, n_functions=2, layers=("conv", "linear"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_sigkill_during_save_always_leaves_a_loadable_export(exchange: bool, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    if not exchange:
        monkeypatch.setattr(atomic, "_EXCHANGE", None)
    models = [_qat_model(2), _qat_model(3)]  # the old export and the new one differ in every layer
    wanted = [freeze_model(copy.deepcopy(m)).state_dict() for m in models]
    out = tmp_path / "export"
    started = time.perf_counter()
    save_quantized(models[0], out)
    seconds = time.perf_counter() - started  # how long one save takes here, to aim the kills inside saves
    rng = random.Random(0)
    outcomes = {0: 0, 1: 0}
    for kill in range(24):
        done_r, done_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child saves the two models in turn, until it is killed; one byte per finished save
            try:
                os.close(done_r)
                for i in range(10**6):
                    save_quantized(models[(i + 1) % 2], out)
                    os.write(done_w, b".")
            finally:
                os._exit(0)
        os.close(done_w)
        for _ in range(rng.randrange(3)):  # let 0..2 saves finish, then kill at a random point of the next
            os.read(done_r, 1)
        time.sleep(rng.uniform(0.0, 1.5 * seconds))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(done_r)
        loaded = load_quantized(out, model=_small())  # raises if the export is not loadable
        state = loaded.state_dict()
        which = [i for i, want in enumerate(wanted) if all(torch.equal(state[k], want[k]) for k in want)]
        assert len(which) == 1, f"kill {kill}: the export is neither the old nor the new model"
        outcomes[which[0]] += 1
    assert min(outcomes.values()) > 0, f"the kills should land at both stages (old, new): {outcomes}"
    assert not any(isinstance(m, QuantMixin) for m in loaded.modules())
    save_quantized(models[0], out)  # the next save cleans up what the killed ones left
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "export"]
    assert leftovers == [], f"leftovers of killed saves remain after the next save: {leftovers}"
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE], "only the export's files"
