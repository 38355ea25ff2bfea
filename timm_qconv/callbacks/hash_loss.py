"""Hash-loss quantization-aware training as a callback: :class:`HashLossCallback`.

``on_init`` replaces the model's layers by quantized ones (:func:`~timm_qconv.quantize_model`),
``on_loss`` adds the weighted hash loss (:func:`~timm_qconv.hash_loss`), the step and epoch events
run the weight's warm-up or schedule and freeze the quantizer's levels when asked, and
``on_train_end`` can freeze the model into plain layers (:func:`~timm_qconv.freeze_model`).

Frozen levels: in one process the quantizer's parameters get ``requires_grad=False``. Under DDP
that flag cannot change after wrapping (DDP would wait forever for their gradients), so the
parameters keep receiving (zero-weighted) gradients and their frozen values are written back after
every optimizer step, which keeps them identical on every process.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .._errors import check_choice, check_float, check_int
from .._registry import config_owner
from ..config import QuantConfig
from ..convert import freeze_model, quantize_model, quantized_layers
from ..layers import MODES
from ..loss import hash_loss
from ..selection import LayerSelection
from .base import QuantCallback, TrainControl, TrainState, _short, method_config, resolve_options


def _optional_int(name: str, value: Any, low: int) -> int | None:
    return None if value is None else check_int(name, value, low)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected True or False")
    return value


@dataclass
class HashLossOptions:
    """Options of :class:`HashLossCallback`, checked when created.

    Args:
        method: a method name, a Quantizer class or a config object (see ``list_methods()``).
        n_bits: bits per weight, 1..8 (``None``: the method's default).
        n_functions: channel groups per layer: the output channels are split into this many
            groups, each with its own levels (``None``: the method's default).
        method_options: the method's own options, e.g. ``{"temperature": 0.1}`` for ``poly``.
        layers, avoid, skip_first_last: which layers to quantize, as in
            :class:`~timm_qconv.selection.LayerSelection` (``layers=None``: convs only).
        mode: ``"ste"`` (train through the quantized weight) or ``"float"`` (the prototype's).
        loss_weight: the hash loss's weight once warmed up.
        warmup_steps: optimizer steps over which the weight rises linearly from ``loss_weight / warmup_steps``.
        schedule: ``schedule(step) -> weight``; replaces ``loss_weight`` and ``warmup_steps``.
        wrt_weights: let the hash loss also pull each float weight towards its level.
        freeze_levels_after_step: freeze the quantizer's levels once this many steps are done.
        freeze_levels_after_epoch: freeze them once this many epochs are done.
        final_temperature: for methods with ``set_temperature`` (``poly``): anneal the softmax
            temperature geometrically from the config's value to this one ...
        anneal_steps: ... over this many steps.
        freeze_model_at_end: at ``on_train_end``, replace quantized layers by plain ones holding
            the quantized weights (the model then loads without timm_qconv).
    """

    method: Any = "hash"
    n_bits: int | None = None
    n_functions: int | None = None
    method_options: dict[str, Any] = field(default_factory=dict)
    layers: Any = None
    avoid: Any = ()
    skip_first_last: bool = False
    mode: str = "ste"
    loss_weight: float = 1.0
    warmup_steps: int = 0
    schedule: Callable[[int], float] | None = None
    wrt_weights: bool = False
    freeze_levels_after_step: int | None = None
    freeze_levels_after_epoch: int | None = None
    final_temperature: float | None = None
    anneal_steps: int = 0
    freeze_model_at_end: bool = True
    config: QuantConfig = field(init=False, repr=False)
    selection: LayerSelection = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.config = method_config(self.method, self.n_bits, self.n_functions, self.method_options)
        self.selection = LayerSelection(self.layers, self.avoid, self.skip_first_last)
        self.layers, self.avoid = self.selection.layers, self.selection.avoid
        check_choice("mode", self.mode, MODES)
        check_float("loss_weight", self.loss_weight, strict=False)
        check_int("warmup_steps", self.warmup_steps, 0)
        if self.schedule is not None and not callable(self.schedule):
            raise TypeError(f"schedule={self.schedule!r} must be None or callable as schedule(step) -> weight")
        _check_bool("wrt_weights", self.wrt_weights)
        _optional_int("freeze_levels_after_step", self.freeze_levels_after_step, 1)
        _optional_int("freeze_levels_after_epoch", self.freeze_levels_after_epoch, 1)
        check_int("anneal_steps", self.anneal_steps, 0)
        if self.final_temperature is not None:
            check_float("final_temperature", self.final_temperature)
            method = config_owner(self.config)
            if not hasattr(method, "set_temperature"):
                raise ValueError(f"final_temperature={self.final_temperature!r} needs a method with a temperature "
                                 f"(set_temperature), such as 'poly'; method={method.name!r} has none")
            if self.anneal_steps < 1:
                raise ValueError(f"anneal_steps={self.anneal_steps!r} must be >= 1 when final_temperature is set")
        _check_bool("freeze_model_at_end", self.freeze_model_at_end)

    def quant_settings(self) -> dict[str, Any]:
        """The settings that shape the quantized model; a resumed checkpoint must have the same."""
        return {"method": config_owner(self.config).name, **self.config.to_dict(), **self.selection.to_dict(),
                "mode": self.mode}

    def weight_at(self, step: int) -> float:
        """The hash loss's weight during step ``step`` (0-based)."""
        if self.schedule is not None:
            return float(self.schedule(step))
        if self.warmup_steps:
            return self.loss_weight * min(1.0, (step + 1) / self.warmup_steps)
        return self.loss_weight

    def temperature_at(self, step: int) -> float:
        start, end = float(self.config.temperature), float(self.final_temperature)
        return start * (end / start) ** min(1.0, step / self.anneal_steps)


class HashLossCallback(QuantCallback):
    """Quantization-aware training with the hash loss.

    Args:
        options: a :class:`HashLossOptions`; or pass its fields as keywords instead.

    Example::

        handler = CallbackHandler([HashLossCallback(n_bits=4, warmup_steps=500, freeze_levels_after_epoch=80)])
    """

    def __init__(self, options: HashLossOptions | None = None, **kwargs: Any) -> None:
        options = resolve_options(HashLossOptions, options, kwargs, "HashLossCallback")
        self.options = options
        self.levels_frozen = False
        self.model_frozen = False  # True once on_train_end replaced the quantized layers by plain ones
        self.layer_names: list[str] = []
        self._model: nn.Module | None = None
        self._state: TrainState | None = None
        self._snapshot: list[Tensor] | None = None  # DDP only: the frozen levels, written back after each step
        self._optimizer_checked = False  # the optimizer was seen to hold the quantizer's parameters
        self._probe: _OptimizerProbe | None = None  # without an optimizer in sight: watch the first steps
        self._epoch_events = False  # the loop calls on_epoch_begin/on_epoch_end
        self._warned_epochs = False

    # ----------------------------------------------------------------- levels
    def quantizer_parameters(self) -> list[nn.Parameter]:
        """The parameters of every quantized layer's quantizer (the levels, bases, scales...)."""
        if self._model is None:
            return []
        return [p for _, layer in quantized_layers(self._model) for p in layer.quantizer.parameters()]

    def _distributed(self) -> bool:
        # The handler's state knows the process layout (Accelerate's, or torch.distributed's).
        return self._state is not None and self._state.num_processes > 1

    def freeze_levels(self) -> None:
        """Stop training the quantizer's levels from now on (see the module docstring for DDP)."""
        self.levels_frozen = True
        if self._distributed():
            self._snapshot = [p.detach().clone() for p in self.quantizer_parameters()]
        self._sync_requires_grad()

    def _sync_requires_grad(self) -> None:
        if self._distributed():
            return  # DDP fixed the set of parameters it waits for when it wrapped the model
        for p in self.quantizer_parameters():
            p.requires_grad_(not self.levels_frozen)
            if self.levels_frozen:
                p.grad = None  # an optimizer with momentum would otherwise keep moving them

    def _anneal(self, step: int) -> None:
        # Between steps only: the temperature is saved for backward, so it must not change mid-step.
        if self.options.final_temperature is not None:
            temperature = self.options.temperature_at(step)
            for _, layer in quantized_layers(self._model):
                layer.quantizer.set_temperature(temperature)

    @torch.no_grad()
    def _restore_levels(self) -> None:
        if self._snapshot is not None:
            for p, frozen in zip(self.quantizer_parameters(), self._snapshot):
                p.copy_(frozen)

    # ----------------------------------------------------------------- events
    def on_init(self, state: TrainState, control: TrainControl, model: nn.Module, handler: Any = None,
                **kwargs: Any) -> None:
        if quantized_layers(model):
            raise ValueError(f"{type(model).__name__} already has quantized layers; HashLossCallback converts the "
                             "float model itself in on_init (do not call quantize_model before it)")
        o = self.options
        s = o.selection
        quantize_model(model, method=o.config, layers=s.layers, avoid=s.avoid, skip_first_last=s.skip_first_last,
                       filter_fn=s.filter_fn, mode=o.mode)
        self._model, self._state = model, state
        self.layer_names = [name for name, _ in quantized_layers(model)]
        if self.levels_frozen:  # state loaded before on_init
            self._sync_requires_grad()
        self._anneal(state.global_step)
        if handler is not None:
            s = o.quant_settings()
            handler.print(f"timm_qconv: {len(self.layer_names)} layers quantized ({s['method']}, {s['n_bits']} bits, "
                          f"{s['n_functions']} channel groups, mode={o.mode})")

    def _check_optimizers(self, optimizers: list[Any]) -> None:
        held = {id(p) for optimizer in optimizers for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, layer in quantized_layers(self._model)
                   if any(p.requires_grad and id(p) not in held for p in layer.quantizer.parameters())]
        if missing:
            raise RuntimeError(f"the optimizer does not hold the quantizer parameters of {len(missing)} layers "
                               f"({missing[:3]}...): create the optimizer after handler.on_init(model)")
        self._optimizer_checked = True

    def on_train_begin(self, state: TrainState, control: TrainControl, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is not None:
            self._check_optimizers([optimizer])

    def on_epoch_begin(self, state: TrainState, control: TrainControl, **kwargs: Any) -> None:
        self._epoch_events = True

    def _watch_optimizer(self, accelerator: Any) -> None:
        """The short loop calls no on_train_begin: find out from what it does call whether the
        optimizer holds the quantizer's parameters (Accelerate knows its prepared optimizers;
        otherwise the first steps are watched: weights move but levels with gradients do not)."""
        optimizers = list(getattr(accelerator, "_optimizers", None) or [])
        if optimizers:
            self._check_optimizers(optimizers)
        elif self._probe is None and not self.levels_frozen and self._model is not None:
            self._probe = _OptimizerProbe(self._model)

    def _conclude_probe(self) -> None:
        verdict = self._probe.verdict()
        if verdict is None:
            return  # no evidence this step (no gradient reached the levels, or the step was skipped)
        self._probe.close()
        self._probe = None
        self._optimizer_checked = True
        if verdict:
            warnings.warn(f"the quantizer parameters of {len(verdict)} layers ({verdict[:3]}) got gradients but did "
                          "not change in the first optimizer step while the weights did: the optimizer does not hold "
                          "them. Create the optimizer after handler.on_init(model)", RuntimeWarning, stacklevel=5)

    def on_loss(self, state: TrainState, control: TrainControl, loss: Tensor, model: nn.Module,
                **kwargs: Any) -> Tensor:
        if not self._optimizer_checked:
            self._watch_optimizer(kwargs.get("accelerator"))
        o = self.options
        if self.levels_frozen and self._distributed() and self._snapshot is None:  # resumed with frozen levels
            self._snapshot = [p.detach().clone() for p in self.quantizer_parameters()]
        weight = o.weight_at(state.global_step)
        if self.levels_frozen and not o.wrt_weights:
            if self._snapshot is None:
                return loss  # nothing left for the hash loss to train
            weight = 0.0  # DDP still expects a gradient for every parameter it was built with
        term = hash_loss(model, o.wrt_weights)
        state.logs["hash_loss"] = term.detach()
        state.logs["hash_loss_weight"] = weight
        return loss + weight * term

    def on_step_end(self, state: TrainState, control: TrainControl, handler: Any = None, **kwargs: Any) -> None:
        if self._probe is not None:
            self._conclude_probe()
        if self.options.freeze_levels_after_epoch is not None and not self._epoch_events and not self._warned_epochs:
            self._warned_epochs = True
            warnings.warn(f"freeze_levels_after_epoch={self.options.freeze_levels_after_epoch} needs epoch events, but "
                          "this loop calls no on_epoch_begin/on_epoch_end, so the levels would never freeze: call "
                          "handler.on_epoch_begin() and handler.on_epoch_end() around each epoch, or use "
                          "freeze_levels_after_step", RuntimeWarning, stacklevel=4)
        self._restore_levels()
        self._anneal(state.global_step)
        after = self.options.freeze_levels_after_step
        if after is not None and not self.levels_frozen and state.global_step >= after:
            self.freeze_levels()
            if handler is not None:
                handler.print(f"timm_qconv: quantizer levels frozen after step {state.global_step}")

    def on_epoch_end(self, state: TrainState, control: TrainControl, handler: Any = None, **kwargs: Any) -> None:
        after = self.options.freeze_levels_after_epoch
        if after is not None and not self.levels_frozen and state.epoch >= after:
            self.freeze_levels()
            if handler is not None:
                handler.print(f"timm_qconv: quantizer levels frozen after epoch {state.epoch}")

    def on_train_end(self, state: TrainState, control: TrainControl, model: nn.Module,
                     **kwargs: Any) -> nn.Module | None:
        self._restore_levels()
        if self.options.freeze_model_at_end:
            self.model_frozen = True
            return freeze_model(model)
        return None

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.options.quant_settings(), "levels_frozen": self.levels_frozen,
                "model_frozen": self.model_frozen}

    def check_state_dict(self, state: Any) -> dict[str, Any]:
        """Return ``state`` if :meth:`load_state_dict` can apply it: the right entries and types, and
        the same quantization settings as this callback (else ``ValueError`` naming them)."""
        keys = ("settings", "levels_frozen", "model_frozen")
        if not isinstance(state, dict) or set(state) != set(keys):
            raise ValueError(f"HashLossCallback state={_short(state)} is not allowed; expected an object with "
                             f"exactly the entries {list(keys)}")
        for key in ("levels_frozen", "model_frozen"):
            if not isinstance(state[key], bool):
                raise ValueError(f"HashLossCallback state {key}={_short(state[key])} is not allowed; "
                                 "expected true or false")
        saved, mine = state["settings"], self.options.quant_settings()
        if not isinstance(saved, dict):
            raise ValueError(f"HashLossCallback state settings={_short(saved)} is not allowed; expected an object")
        differ = [k for k in [*mine, *(k for k in saved if k not in mine)] if saved.get(k) != mine.get(k)]
        if differ:
            detail = "; ".join(f"{k}={_short(saved.get(k))} in the checkpoint but {k}={mine.get(k)!r} here"
                               for k in differ)
            raise ValueError(f"checkpoint made with different quantization settings: {detail}. "
                             "Resume with the checkpoint's settings, or start a new run")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state, once :meth:`check_state_dict` accepted all of it (nothing changes otherwise)."""
        state = self.check_state_dict(state)
        if state["model_frozen"] and not self.model_frozen and self._model is not None:
            # A checkpoint written after on_train_end holds plain layers: load it into plain layers.
            freeze_model(self._model)
            self.model_frozen = True
        was_frozen, self.levels_frozen = self.levels_frozen, state["levels_frozen"]
        self._snapshot = None  # under DDP: taken again at the next on_loss, once the weights are loaded
        if self.levels_frozen != was_frozen:
            self._sync_requires_grad()


class _OptimizerProbe:
    """Watches one optimizer step: which quantizer parameters received a non-zero gradient, and
    whether they and the layers' weights changed. Hooks are removed by :meth:`close`."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [(name, layer) for name, layer in quantized_layers(model)]
        self.levels = {name: [p.detach().clone() for p in layer.quantizer.parameters() if p.requires_grad]
                       for name, layer in self.layers}
        self.weights = [layer.weight.detach().clone() for _, layer in self.layers]
        self.got_grad: set[str] = set()
        self.handles = []
        for name, layer in self.layers:
            for p in layer.quantizer.parameters():
                if p.requires_grad:
                    self.handles.append(p.register_post_accumulate_grad_hook(self._seen(name)))

    def _seen(self, name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if name not in self.got_grad and param.grad is not None and bool(param.grad.any()):
                self.got_grad.add(name)
        return hook

    @torch.no_grad()
    def verdict(self) -> list[str] | None:
        """Layers whose levels should have moved and did not; ``None`` when this step proves nothing."""
        weights_moved = any(not torch.equal(layer.weight, before)
                            for (_, layer), before in zip(self.layers, self.weights))
        if not weights_moved or not self.got_grad:
            return None
        return [name for name, layer in self.layers if name in self.got_grad and all(
            torch.equal(p, before) for p, before in zip((p for p in layer.quantizer.parameters() if p.requires_grad),
                                                        self.levels[name]))]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
