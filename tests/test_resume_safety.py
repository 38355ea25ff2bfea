"""Resuming trusts no file: no pickle runs, the callbacks' state is checked whole before any of it
applies, and an event that raised leaves the handler as it was."""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from timm_qconv import QuantMixin, quantized_layers
from timm_qconv.callbacks import BitQuantizerCallback, CallbackHandler, HashLossCallback, QuantCallback
from timm_qconv.callbacks.handler import STATE_FILE

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def options(**extra: Any) -> dict[str, Any]:
    return {"n_bits": 2, "n_functions": 2, **extra}


def accelerate_run(folder: Path, resume: bool, steps: int = 2) -> CallbackHandler:
    """The README's short loop under Accelerate; saves at the end, or resumes from ``folder`` first."""
    accelerator = Accelerator(cpu=True)
    qat = CallbackHandler([HashLossCallback(**options())], accelerator)
    model = qat.on_init(tiny_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume:
        accelerator.load_state(folder)
    for _ in range(steps):
        loss = qat.on_loss(F.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1])))
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        qat.on_step_end()
    if not resume:
        accelerator.save_state(folder)
    return qat


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_pickle_in_the_checkpoint_runs_nothing(tmp_path: Path) -> None:
    folder, marker = tmp_path / "ckpt", tmp_path / "pwned"
    accelerate_run(folder, resume=False)
    assert not list(folder.glob("custom_checkpoint_*.pkl")), "the callbacks' state must not be pickled"
    torch.save(_Payload(marker), folder / "custom_checkpoint_0.pkl")  # where Accelerate unpickles registered objects
    AcceleratorState._reset_state(True)
    try:
        accelerate_run(folder, resume=True, steps=1)
    except RuntimeError as exc:  # Accelerate refuses a pickle that no registered object claims: fine
        assert "registered objects" in str(exc), f"unexpected error {exc}"
    assert not marker.exists(), "resuming unpickled a file from the checkpoint folder and ran its code"
    (folder / "custom_checkpoint_0.pkl").unlink()
    AcceleratorState._reset_state(True)
    resumed = accelerate_run(folder, resume=True, steps=1)
    assert resumed.state.global_step == 3, "the JSON state must be restored (2 saved steps + 1)"


def test_a_checkpoint_without_the_state_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    accelerate_run(folder, resume=False)
    (folder / STATE_FILE).unlink()
    AcceleratorState._reset_state(True)
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        accelerate_run(folder, resume=True, steps=0)


def fresh_handler() -> tuple[CallbackHandler, nn.Module]:
    handler = CallbackHandler([HashLossCallback(**options()), BitQuantizerCallback(n_bits=2, n_functions=2)])
    model = handler.on_init(tiny_model())
    return handler, model


def good_state() -> dict[str, Any]:
    handler, _ = fresh_handler()
    state = handler.state_dict()
    state["state"]["global_step"] = 7
    state["callbacks"]["HashLossCallback"].update(levels_frozen=True, model_frozen=True)
    return json.loads(json.dumps(state))


def _edit(path: list, value: Any):
    def apply(state: dict) -> None:
        target = state
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return apply


BAD_STATES = {
    "global_step text": (_edit(["state", "global_step"], "abc"), "global_step"),
    "global_step negative": (_edit(["state", "global_step"], -1), "global_step"),
    "global_step float": (_edit(["state", "global_step"], 1.5), "global_step"),
    "epoch bool": (_edit(["state", "epoch"], True), "epoch"),
    "metrics list": (_edit(["state", "metrics"], [1]), "metrics"),
    "levels_frozen text": (_edit(["callbacks", "HashLossCallback", "levels_frozen"], "false"), "levels_frozen"),
    "model_frozen number": (_edit(["callbacks", "HashLossCallback", "model_frozen"], 1), "model_frozen"),
    "other n_bits": (_edit(["callbacks", "HashLossCallback", "settings", "n_bits"], 3), "n_bits=3 in the checkpoint"),
    "history not a list": (_edit(["callbacks", "BitQuantizerCallback", "history"], "x"), "BitQuantizerCallback"),
    "unknown callback": (_edit(["callbacks", "Evil"], {}), "Evil"),
    "not a dict": (lambda s: s.clear(), "callbacks' state"),
}


@pytest.mark.parametrize("name", list(BAD_STATES))
def test_a_bad_state_is_refused_whole(name: str) -> None:
    edit, match = BAD_STATES[name]
    state = good_state()
    edit(state)
    handler, model = fresh_handler()
    before = (handler.state_dict(), copy.deepcopy(model.state_dict()))
    with pytest.raises(ValueError, match=match):
        handler.on_load(state_dict=state)
    assert (handler.state_dict(), model.state_dict().keys()) == (before[0], before[1].keys()), \
        "a refused state must change nothing: counters, flags and the model's layers"
    assert any(isinstance(m, QuantMixin) for m in model.modules()), "the model must not have been frozen"
    assert all(p.requires_grad for _, m in quantized_layers(model) for p in m.quantizer.parameters()), \
        "the levels must not have been frozen"
    handler.on_load(state_dict=good_state())  # the event can be retried with a good state
    assert handler.state.global_step == 7 and handler.callbacks[0].levels_frozen, "the good state applies"


def test_a_damaged_state_file_is_a_clean_error(tmp_path: Path) -> None:
    handler, _ = fresh_handler()
    (tmp_path / STATE_FILE).write_text("[" * 100_000)
    with pytest.raises(ValueError, match="not valid JSON"):
        handler.on_load(input_dir=tmp_path)
    assert handler.state.global_step == 0


def test_on_save_writes_the_state_file_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handler, _ = fresh_handler()
    handler.on_save(output_dir=tmp_path)
    before = (tmp_path / STATE_FILE).read_bytes()
    handler.state.global_step = 5

    def full_disk(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        handler.on_save(output_dir=tmp_path)
    monkeypatch.undo()
    assert (tmp_path / STATE_FILE).read_bytes() == before, "a failed save must leave the previous state file whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE], "no temporary file left"


def test_a_failed_on_init_can_be_retried() -> None:
    handler = CallbackHandler([HashLossCallback(**options())])
    model = tiny_model()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        handler.on_init(model)
    assert not quantized_layers(model), "a failed on_init must leave the model unconverted"
    fixed = tiny_model()
    assert handler.on_init(fixed) is fixed and quantized_layers(fixed), "a retry with a fixed model must work"


class _FailsOnce(QuantCallback):
    def __init__(self) -> None:
        self.calls = 0

    def on_step_end(self, state, control, **kwargs) -> None:
        self.calls += 1
        control.should_save = True
        if self.calls == 1:
            raise RuntimeError("transient")


def test_a_failed_event_leaves_the_handler_as_it_was() -> None:
    handler = CallbackHandler([_FailsOnce()], max_steps=1)
    handler.on_init(tiny_model())
    handler.on_step_begin()
    with pytest.raises(RuntimeError, match="transient"):
        handler.on_step_end()
    assert handler.state.global_step == 0 and not handler.control.should_stop and not handler.control.should_save, \
        "the step count and flags must be as before the failed call"
    handler.on_step_end()  # the step is still open: ending it again is allowed
    assert handler.state.global_step == 1 and handler.control.should_stop


@pytest.mark.parametrize("callbacks,match", [(5, "callbacks=5"), (HashLossCallback(**options()), "list of"),
                                             ("HashLossCallback", "callbacks='HashLossCallback'"),
                                             ([HashLossCallback, 1], "QuantCallback instances")])
def test_callback_handler_names_bad_callbacks(callbacks: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        CallbackHandler(callbacks)


def test_callback_handler_names_a_bad_accelerator() -> None:
    with pytest.raises(TypeError, match="accelerator='gpu'.*expected an accelerate.Accelerator"):
        CallbackHandler([], accelerator="gpu")


def test_a_nan_metric_is_saved_and_restored(tmp_path: Path) -> None:
    handler, _ = fresh_handler()
    handler.on_evaluate({"loss": float("nan"), "acc": 0.5})
    handler.on_save(output_dir=tmp_path)  # a diverged evaluation must not make the checkpoint fail
    other, _ = fresh_handler()
    other.on_load(input_dir=tmp_path)
    metrics = other.state.metrics
    assert metrics["acc"] == 0.5 and metrics["loss"] != metrics["loss"], f"metrics not restored: {metrics}"
