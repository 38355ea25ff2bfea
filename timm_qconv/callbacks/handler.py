"""The :class:`CallbackHandler`: runs a list of callbacks, checks event order, talks to Accelerate.

A training loop calls the handler's events; the handler keeps the :class:`TrainState`, calls every
callback in order, then forwards the event to plugins (hook ``training_event``). With an
``accelerate.Accelerator`` attached, events fire on every process, printing happens on the main
process only, and ``on_save`` / ``on_load`` fire from Accelerate's own ``save_state`` /
``load_state`` pre-hooks, so the loop does not call them.

Checkpoints carry the callbacks' state as plain JSON (:data:`STATE_FILE`), never as a pickle: the
handler is not registered with ``register_for_checkpointing``, whose ``custom_checkpoint_*.pkl``
Accelerate unpickles with ``weights_only=False``. A loaded state is checked entirely (types,
ranges, the quantization settings) before any of it is applied, and before the weights load.

An event that raises leaves the handler as it was before the call (its event history, counters,
flags and model), so a loop can fix the cause and call the event again.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import warnings
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from ..atomic import atomic_write
from .base import QuantCallback, TrainControl, TrainState, _short

STATE_FILE = "timm_qconv_callbacks.json"
"""Written by ``on_save`` into a checkpoint folder; ``on_load`` checks it before any weight loads."""
MAX_STATE_BYTES = 16 * 2**20
"""A state file larger than this is refused unread (a real one is well under a kilobyte per callback)."""

_TRAINING_EVENTS = ("on_train_begin", "on_epoch_begin", "on_step_begin", "on_loss", "on_step_end", "on_epoch_end")


def forward_to_plugins(event: str, state: TrainState, control: TrainControl, payload: dict[str, Any]) -> None:
    """The one place where callback events reach plugins."""
    from ..plugins import call_hook

    call_hook("training_event", event=event, state=state, control=control, payload=payload)


def unwrap_model(model: nn.Module, accelerator: Any = None) -> nn.Module:
    """The model under DDP/DataParallel and ``torch.compile`` wrappers (Accelerate's own unwrapping first)."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _is_ddp(model: nn.Module) -> bool:
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return True
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return False
        model = inner


class CallbackHandler:
    """Run ``callbacks`` at a training loop's events.

    Args:
        callbacks: :class:`QuantCallback` instances, called in this order at every event.
        accelerator: an ``accelerate.Accelerator`` to :meth:`attach` now (or later).
        max_steps: stop after this many optimizer steps (``on_step_end`` sets ``control.should_stop``).

    Example (a raw Accelerate loop; QAT adds the lines marked ``+``)::

        qat = CallbackHandler([HashLossCallback(n_bits=4)], accelerator)   # +
        model = qat.on_init(model)                                         # + before the optimizer
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        for x, y in loader:
            loss = qat.on_loss(F.cross_entropy(model(x), y))               # +
            accelerator.backward(loss)
            optimizer.step(); optimizer.zero_grad()
            qat.on_step_end()                                              # +
    """

    def __init__(self, callbacks: Iterable[QuantCallback] = (), accelerator: Any = None,
                 max_steps: int | None = None) -> None:
        if isinstance(callbacks, QuantCallback) or isinstance(callbacks, (str, bytes)) \
                or not isinstance(callbacks, Iterable):
            raise TypeError(f"callbacks={_short(callbacks)} has type {type(callbacks).__name__}; expected a list of "
                            "QuantCallback instances, e.g. CallbackHandler([HashLossCallback(n_bits=4)])")
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, QuantCallback):
                raise TypeError(f"callbacks contains {_short(cb)} of type {type(cb).__name__}; "
                                "expected QuantCallback instances")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"max_steps={max_steps!r} is not allowed; expected None or an integer >= 1")
        self.state = TrainState(max_steps=max_steps)
        self.control = TrainControl()
        self.model: nn.Module | None = None
        self.accelerator: Any = None
        self._seen: set[str] = set()
        self._open: set[str] = set()  # "epoch", "step" while between their begin and end
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # plain torchrun + DDP
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            self.state.process_index, self.state.num_processes, self.state.is_main_process = rank, world, rank == 0
        if accelerator is not None:
            self.attach(accelerator)

    # ----------------------------------------------------------------- Accelerate
    def attach(self, accelerator: Any) -> "CallbackHandler":
        """Run under ``accelerator``: main-process printing, checkpointing and checkpoint hooks.

        Fires ``on_save``/``on_load`` from Accelerate's ``save_state``/``load_state`` pre-hooks:
        ``on_save`` writes :data:`STATE_FILE` (JSON) into the checkpoint folder, and ``on_load``
        checks and applies it before the weights load. Nothing is pickled.
        """
        if self.accelerator is accelerator:
            return self
        if self.accelerator is not None:
            raise RuntimeError("this CallbackHandler is already attached to another Accelerator")
        needed = ("register_save_state_pre_hook", "register_load_state_pre_hook", "process_index", "unwrap_model")
        if not all(hasattr(accelerator, name) for name in needed):
            raise TypeError(f"accelerator={_short(accelerator)} has type {type(accelerator).__name__}; "
                            "expected an accelerate.Accelerator (or None)")
        self.accelerator = accelerator
        self.state.process_index = accelerator.process_index
        self.state.num_processes = accelerator.num_processes
        self.state.is_main_process = accelerator.is_main_process
        if accelerator.num_processes == 1 and torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            warnings.warn(f"{torch.distributed.get_world_size()} processes were launched but Accelerate runs "
                          "each on its own (no GPU found): on a machine without GPUs create "
                          "Accelerator(cpu=True) to train them together with DDP over gloo", stacklevel=2)
        accelerator.register_save_state_pre_hook(
            lambda models, weights, output_dir: self.on_save(output_dir=output_dir))
        accelerator.register_load_state_pre_hook(lambda models, input_dir: self.on_load(input_dir=input_dir))
        return self

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on the main process only."""
        if self.state.is_main_process:
            print(*args, **kwargs)

    def log(self, values: dict[str, Any]) -> None:
        """Send scalars to the accelerator's trackers (main process only), at ``state.global_step``."""
        if self.accelerator is not None and getattr(self.accelerator, "trackers", None):
            self.accelerator.log({k: float(v) for k, v in values.items()}, step=self.state.global_step)

    # ----------------------------------------------------------------- event order
    def _check_order(self, event: str) -> None:
        if event == "on_init":
            if "on_init" in self._seen:
                raise RuntimeError("on_init called twice; a CallbackHandler converts one model, once")
            return
        if "on_init" not in self._seen:
            raise RuntimeError(f"{event} called before on_init: call handler.on_init(model) first, "
                               "before creating the optimizer and before accelerator.prepare")
        if event in _TRAINING_EVENTS and "on_train_end" in self._seen:
            raise RuntimeError(f"{event} called after on_train_end; training has ended")
        for scope in ("epoch", "step"):
            if event == f"on_{scope}_begin" and scope in self._open:
                raise RuntimeError(f"on_{scope}_begin called twice without on_{scope}_end in between")
        if event == "on_epoch_end" and "epoch" not in self._open:
            raise RuntimeError("on_epoch_end called before on_epoch_begin")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Undo the handler's own changes (events seen, open scopes, counters, flags, model) if the body raises."""
        saved = (set(self._seen), set(self._open), self.model, copy.deepcopy(self.state.state_dict()),
                 dataclasses.asdict(self.control), dict(self.state.logs))
        try:
            yield
        except BaseException:
            self._seen, self._open, self.model, counters, control, logs = saved
            self.state.global_step, self.state.epoch, self.state.metrics = (
                counters["global_step"], counters["epoch"], counters["metrics"])
            for name, value in control.items():
                setattr(self.control, name, value)
            self.state.logs = logs
            raise

    def _dispatch(self, event: str, **payload: Any) -> list[Any]:
        self._check_order(event)
        self._seen.add(event)
        kwargs = {"model": self.model, "accelerator": self.accelerator, "handler": self, **payload}
        results = [getattr(cb, event)(self.state, self.control, **kwargs) for cb in self.callbacks]
        forward_to_plugins(event, self.state, self.control, {"model": self.model, **payload})
        return results

    # ----------------------------------------------------------------- events
    def on_init(self, model: nn.Module) -> nn.Module:
        """Let callbacks convert ``model``; call before creating the optimizer and ``accelerator.prepare``.

        Returns:
            ``model`` (converted in place; wrappers such as ``torch.compile``'s are kept).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"on_init(model={type(model).__name__}): expected an nn.Module")
        if _is_ddp(model):
            raise RuntimeError("on_init got a model already wrapped in DistributedDataParallel: call on_init "
                               "before accelerator.prepare, so that DDP synchronises the quantizer's parameters")
        self._check_order("on_init")
        with self._transaction():
            self.model = unwrap_model(model, self.accelerator)
            for result in self._dispatch("on_init"):
                if isinstance(result, nn.Module) and result is not self.model:
                    raise RuntimeError(f"a callback's on_init returned a new model ({type(result).__name__}); "
                                       "on_init must convert the model in place")
        return model

    def on_load(self, input_dir: str | os.PathLike | None = None, state_dict: dict[str, Any] | None = None,
                **kwargs: Any) -> None:
        """Resuming: restore the callbacks' state and check their settings, before any weight is loaded.

        Args:
            input_dir: an Accelerate checkpoint folder (fired for you by ``accelerator.load_state``).
            state_dict: in a plain loop, the :meth:`state_dict` saved in your checkpoint.
        """
        self._check_order("on_load")
        saved = state_dict
        if saved is None and input_dir is not None:
            saved = read_state_file(input_dir)
        with self._transaction():
            if saved is not None:
                self.load_state_dict(saved)
            self._dispatch("on_load", input_dir=input_dir, **kwargs)

    def on_train_begin(self, **kwargs: Any) -> TrainControl:
        with self._transaction():
            self._dispatch("on_train_begin", **kwargs)
        return self.control

    def on_epoch_begin(self, **kwargs: Any) -> TrainControl:
        with self._transaction():
            self._dispatch("on_epoch_begin", **kwargs)
            self._open.add("epoch")
        return self.control

    def on_step_begin(self, **kwargs: Any) -> TrainControl:
        with self._transaction():
            self._dispatch("on_step_begin", **kwargs)
            self._open.add("step")
        return self.control

    def on_loss(self, loss: Tensor, **kwargs: Any) -> Tensor:
        """Give every callback the loss in turn; returns the loss to backpropagate."""
        self._check_order("on_loss")
        with self._transaction():
            self._seen.add("on_loss")
            common = {"model": self.model, "accelerator": self.accelerator, "handler": self, **kwargs}
            for cb in self.callbacks:
                result = cb.on_loss(self.state, self.control, loss=loss, **common)
                loss = loss if result is None else result
            forward_to_plugins("on_loss", self.state, self.control, {"model": self.model, "loss": loss, **kwargs})
        return loss

    def on_step_end(self, **kwargs: Any) -> TrainControl:
        """Count the step (call it after ``optimizer.step()``, once per optimizer step)."""
        self._check_order("on_step_end")
        with self._transaction():
            self.state.global_step += 1
            self.control.reset_step_flags()
            if self.state.max_steps is not None and self.state.global_step >= self.state.max_steps:
                self.control.should_stop = True
            self._open.discard("step")
            self._dispatch("on_step_end", **kwargs)
        return self.control

    def on_evaluate(self, metrics: dict[str, float], **kwargs: Any) -> TrainControl:
        self._check_order("on_evaluate")
        with self._transaction():
            self.state.metrics = {k: float(v) for k, v in metrics.items()}
            self._dispatch("on_evaluate", metrics=metrics, **kwargs)
        return self.control

    def on_epoch_end(self, **kwargs: Any) -> TrainControl:
        self._check_order("on_epoch_end")
        with self._transaction():
            self.state.epoch += 1
            self._dispatch("on_epoch_end", **kwargs)
            self._open.discard("epoch")
        return self.control

    def on_save(self, output_dir: str | os.PathLike | None = None, **kwargs: Any) -> dict[str, Any]:
        """A checkpoint is written: with ``output_dir``, the main process writes :data:`STATE_FILE` there.

        Returns:
            :meth:`state_dict`, to put into a plain loop's checkpoint dict.
        """
        with self._transaction():
            self._dispatch("on_save", output_dir=output_dir, **kwargs)
        state = self.state_dict()
        if output_dir is not None and self.state.is_main_process:
            os.makedirs(output_dir, exist_ok=True)
            atomic_write(os.path.join(os.fspath(output_dir), STATE_FILE), json.dumps(state, indent=1))
        return state

    def on_train_end(self, **kwargs: Any) -> nn.Module:
        """Training ended; returns the (unwrapped) model, which callbacks may have frozen into plain layers."""
        with self._transaction():
            for result in self._dispatch("on_train_end", **kwargs):
                if isinstance(result, nn.Module):
                    self.model = result
        return self.model

    # ----------------------------------------------------------------- checkpointing
    def _stateful(self) -> dict[str, QuantCallback]:
        named: dict[str, QuantCallback] = {}
        for cb in self.callbacks:
            if callable(getattr(cb, "state_dict", None)) and callable(getattr(cb, "load_state_dict", None)):
                base, n = type(cb).__name__, 1
                name = base
                while name in named:
                    name, n = f"{base}_{n}", n + 1
                named[name] = cb
        return named

    def state_dict(self) -> dict[str, Any]:
        """The run's counters and every stateful callback's state (JSON-serialisable)."""
        return {"state": self.state.state_dict(),
                "callbacks": {k: cb.state_dict() for k, cb in self._stateful().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, all or nothing.

        Everything is checked first: the structure, the counters' types and ranges, and every
        callback's own ``check_state_dict`` (a callback whose settings differ raises, naming the
        setting). Only then is it applied; should a callback's ``load_state_dict`` still raise, the
        callbacks already restored get their previous state back.
        """
        mine = self._stateful()
        if not isinstance(state, dict) or set(state) != {"state", "callbacks"} \
                or not isinstance(state["callbacks"], dict):
            raise ValueError(f"callbacks' state={_short(state)} is not allowed; expected an object "
                             "{'state': {...}, 'callbacks': {...}} written by CallbackHandler.state_dict()")
        saved = state["callbacks"]
        if set(saved) != set(mine):
            raise ValueError(f"the checkpoint has state for the callbacks {sorted(map(str, saved))}, "
                             f"but this handler has the stateful callbacks {sorted(mine)}")
        counters = TrainState.check_state_dict(state["state"])
        for name, cb in mine.items():
            check = getattr(cb, "check_state_dict", None)
            if callable(check):
                check(saved[name])
        before = {name: cb.state_dict() for name, cb in mine.items()}
        done: list[str] = []
        try:
            for name, cb in mine.items():
                cb.load_state_dict(saved[name])
                done.append(name)
        except BaseException:
            for name in done:
                with contextlib.suppress(Exception):
                    mine[name].load_state_dict(before[name])
            raise
        self.state.load_state_dict(counters)


def read_state_file(folder: str | os.PathLike) -> dict[str, Any]:
    """The callbacks' state in ``folder/``:data:`STATE_FILE`, parsed as JSON (checked on loading).

    Raises:
        FileNotFoundError: the folder has no such file (it was not written by a ``CallbackHandler``).
        ValueError: the file is too large or not JSON.
    """
    path = os.path.join(os.fspath(folder), STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint folder {os.fspath(folder)!r} has no {STATE_FILE}; it was not saved "
                                "by a run with a CallbackHandler, so the callbacks' state cannot be restored")
    size = os.path.getsize(path)
    if size > MAX_STATE_BYTES:
        raise ValueError(f"{path} has {size} bytes; the callbacks' state file has at most {MAX_STATE_BYTES}")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{path} is not valid JSON ({str(exc)[:100]}); the file is damaged") from None
