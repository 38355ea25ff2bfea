"""The callback event model: :class:`QuantCallback`, :class:`TrainState` and :class:`TrainControl`.

Shaped after Hugging Face's ``TrainerCallback``: every event is a no-op method taking the run's
state, its control flags and keyword arguments, so a callback implements only the events it needs
and new arguments break nobody. State (counters the handler keeps) and control (flags a callback
may set for the loop to read) are separate objects.

Events, in the order a loop fires them (:class:`~timm_qconv.callbacks.CallbackHandler` checks it)::

    on_init            before the optimizer and accelerator.prepare: layers are replaced here
    on_load            before a checkpoint's weights are loaded (resuming)
    on_train_begin
      on_epoch_begin
        on_step_begin
        on_loss        receives the loss, returns the loss to backpropagate
        on_step_end    after optimizer.step()
        on_evaluate    receives metrics
      on_epoch_end
      on_save          when a checkpoint is written
    on_train_end
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .._registry import make_config
from ..config import QuantConfig

EVENTS = (
    "on_init", "on_load", "on_train_begin", "on_epoch_begin", "on_step_begin", "on_loss", "on_step_end",
    "on_evaluate", "on_epoch_end", "on_save", "on_train_end",
)


@dataclass
class TrainState:
    """Counters of the run, kept by the handler and restored on resume.

    Args:
        global_step: optimizer steps finished (``on_step_end`` adds one before the callbacks run).
        epoch: epochs finished (``on_epoch_end`` adds one before the callbacks run).
        max_steps: the run's step budget, if any; reaching it sets ``control.should_stop``.
        metrics: the last metrics given to ``on_evaluate``.
        logs: scalars callbacks report for the current step (e.g. ``hash_loss``); not checkpointed.
        process_index, num_processes, is_main_process: this process in a distributed run.
    """

    global_step: int = 0
    epoch: int = 0
    max_steps: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    logs: dict[str, Any] = field(default_factory=dict)
    process_index: int = 0
    num_processes: int = 1
    is_main_process: bool = True

    _CHECKPOINTED = ("global_step", "epoch", "metrics")

    def state_dict(self) -> dict[str, Any]:
        """The counters a resumed run needs (not the process layout, which belongs to the new run)."""
        return {name: getattr(self, name) for name in self._CHECKPOINTED}

    @staticmethod
    def check_state_dict(state: Any) -> dict[str, Any]:
        """Return ``state`` if it holds valid counters (from a file: types and ranges are checked)."""
        if not isinstance(state, dict) or set(state) != set(TrainState._CHECKPOINTED):
            raise ValueError(f"state={_short(state)} is not allowed; expected an object with exactly the entries "
                             f"{list(TrainState._CHECKPOINTED)}")
        for name in ("global_step", "epoch"):
            value = state[name]
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**62:
                raise ValueError(f"state.{name}={_short(value)} is not allowed; expected an integer >= 0")
        metrics = state["metrics"]
        if not isinstance(metrics, dict) or not all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                for k, v in metrics.items()):
            raise ValueError(f"state.metrics={_short(metrics)} is not allowed; expected an object of names to numbers")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters of :meth:`state_dict` (checked first; nothing changes if they are invalid)."""
        state = self.check_state_dict(state)
        self.global_step, self.epoch = state["global_step"], state["epoch"]
        self.metrics = {k: float(v) for k, v in state["metrics"].items()}


def _short(value: Any) -> str:
    """``repr`` cut to 60 characters, for messages about values read from files."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@dataclass
class TrainControl:
    """Flags callbacks set and the loop reads after an event.

    Args:
        should_stop: end training after this step (sticky once set).
        should_save: write a checkpoint now (reset at every step).
        should_evaluate: evaluate now (reset at every step).
        should_log: log now (reset at every step).
    """

    should_stop: bool = False
    should_save: bool = False
    should_evaluate: bool = False
    should_log: bool = False

    def reset_step_flags(self) -> None:
        self.should_save = self.should_evaluate = self.should_log = False


class QuantCallback:
    """Base class of training callbacks: every event is a no-op.

    Each event gets the run's :class:`TrainState` and :class:`TrainControl` and keyword arguments:
    always ``model`` (the unwrapped model), ``accelerator`` (or ``None``) and ``handler`` (for
    main-process-only :meth:`~timm_qconv.callbacks.CallbackHandler.print`), plus the event's own.
    Stateful callbacks also define ``state_dict()`` and ``load_state_dict(state)``; the handler
    checkpoints them with the run.
    """

    def on_init(self, state: TrainState, control: TrainControl, model: nn.Module, **kwargs: Any) -> None:
        """Before the optimizer exists and before ``accelerator.prepare``: convert ``model`` in place."""

    def on_load(self, state: TrainState, control: TrainControl, **kwargs: Any) -> None:
        """Resuming, before the checkpoint's weights are loaded; this callback's state is already restored."""

    def on_train_begin(self, state: TrainState, control: TrainControl, **kwargs: Any) -> None:
        """Training starts (``optimizer`` may be among the arguments)."""

    def on_epoch_begin(self, state: TrainState, control: TrainControl, **kwargs: Any) -> None:
        """An epoch starts; ``state.epoch`` epochs are done."""

    def on_step_begin(self, state: TrainState, control: TrainControl, **kwargs: Any) -> None:
        """A step starts (optional in loops that do not need it)."""

    def on_loss(self, state: TrainState, control: TrainControl, loss: Tensor, **kwargs: Any) -> Tensor:
        """Return the loss to backpropagate (``loss`` itself, or ``loss`` plus a term)."""
        return loss

    def on_step_end(self, state: TrainState, control: TrainControl, **kwargs: Any) -> None:
        """After ``optimizer.step()``; ``state.global_step`` counts this step."""

    def on_evaluate(self, state: TrainState, control: TrainControl, metrics: dict[str, float], **kwargs: Any) -> None:
        """Evaluation finished with ``metrics``."""

    def on_epoch_end(self, state: TrainState, control: TrainControl, **kwargs: Any) -> None:
        """An epoch ended; ``state.epoch`` counts it."""

    def on_save(self, state: TrainState, control: TrainControl, **kwargs: Any) -> None:
        """A checkpoint is being written (``output_dir`` when it is a folder)."""

    def on_train_end(self, state: TrainState, control: TrainControl, **kwargs: Any) -> nn.Module | None:
        """Training ended; may return a replacement for the model (e.g. frozen into plain layers)."""


def method_config(method: Any, n_bits: Any, n_functions: Any, method_options: Any) -> QuantConfig:
    """The validated method config of a callback's options (``method_options``: the method's own)."""
    if not isinstance(method_options, dict):
        raise TypeError(f"method_options={method_options!r} must be a dict of the method's options")
    return make_config(method, n_bits=n_bits, n_functions=n_functions, **method_options)


def resolve_options(options_class: type, options: Any, kwargs: dict[str, Any], owner: str) -> Any:
    """A callback's options: the ``options`` object given, or one built from keyword arguments.

    Unknown keywords and a mix of both forms raise ``TypeError`` naming what is allowed.
    """
    if options is None:
        known = [f.name for f in dataclasses.fields(options_class) if f.init]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            raise TypeError(f"unknown option(s) {unknown} for {owner}; allowed: {known}")
        return options_class(**kwargs)
    if kwargs:
        raise TypeError(f"pass either options={options_class.__name__}(...) or keyword options, not both")
    if not isinstance(options, options_class):
        raise TypeError(f"options={options!r} must be a {options_class.__name__}")
    return options
