"""Post-training quantization during or after training: :class:`BitQuantizerCallback`.

At the end of training and/or every N epochs it fits a :class:`~timm_qconv.BitQuantizer` to the
current float weights and builds a quantized *copy*, so training goes on in float. With an eval
function or dataloader it evaluates the float model and the copy and prints their metrics side by
side. Metrics come from torchmetrics and are computed on every process (torchmetrics gathers the
processes' states); only the main process prints.

It quantizes plain ``nn.Conv2d``/``nn.Linear`` layers, so it is meant for float training, not
together with :class:`~timm_qconv.callbacks.HashLossCallback` (whose layers are already quantized).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .._errors import check_int
from .._registry import config_owner
from .._table import render_table
from ..bit_quantizer import BitQuantizer
from ..config import QuantConfig
from ..report import QuantReport
from ..selection import LayerSelection
from .base import QuantCallback, TrainControl, TrainState, method_config, resolve_options

EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class BitQuantizerOptions:
    """Options of :class:`BitQuantizerCallback`, checked when created.

    Args:
        n_bits: bits per weight, 1..8.
        n_functions: channel groups per layer: the output channels are split into this many
            groups, each with its own levels.
        method: a method name, a Quantizer class or a config object (``"hash"``, ``"kmeans"``...).
        method_options: the method's own options.
        layers, avoid, skip_first_last: which layers to quantize, as in
            :class:`~timm_qconv.selection.LayerSelection` (``layers=None``: convs only).
        n_iter: fitting iterations per layer.
        every_n_epochs: also run after every this many epochs (``None``: never during training).
        at_train_end: run at ``on_train_end``.
        calibration_samples: inputs of ``calibration_dataloader`` to calibrate with, >= 1.
    """

    n_bits: int = 4
    n_functions: int = 32
    method: Any = "hash"
    method_options: dict[str, Any] = field(default_factory=dict)
    layers: Any = None
    avoid: Any = ()
    skip_first_last: bool = False
    n_iter: int = 50
    every_n_epochs: int | None = None
    at_train_end: bool = True
    calibration_samples: int = 512
    config: QuantConfig = field(init=False, repr=False)
    selection: LayerSelection = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.config = method_config(self.method, self.n_bits, self.n_functions, self.method_options)
        self.selection = LayerSelection(self.layers, self.avoid, self.skip_first_last)
        self.layers, self.avoid = self.selection.layers, self.selection.avoid
        check_int("n_iter", self.n_iter, 1)
        check_int("calibration_samples", self.calibration_samples, 1)
        if self.every_n_epochs is not None:
            check_int("every_n_epochs", self.every_n_epochs, 1)
        if not isinstance(self.at_train_end, bool):
            raise TypeError(f"at_train_end={self.at_train_end!r} must be True or False")
        if self.every_n_epochs is None and not self.at_train_end:
            raise ValueError("every_n_epochs=None and at_train_end=False: the callback would never run")


def _metric_values(metric: Any) -> dict[str, float]:
    value = metric.compute()
    if isinstance(value, dict):  # a MetricCollection
        return {name: float(v) for name, v in value.items()}
    name = type(metric).__name__
    for prefix in ("Multiclass", "Multilabel", "Binary"):
        name = name.removeprefix(prefix)
    return {name.lower(): float(value)}


class BitQuantizerCallback(QuantCallback):
    """Fit a BitQuantizer on a copy of the model and compare float and quantized metrics.

    Args:
        options: a :class:`BitQuantizerOptions`; or pass its fields as keywords instead.
        eval_fn: ``eval_fn(model) -> {name: value}``, called (in eval mode, without gradients) on
            the float model and on the quantized copy.
        eval_dataloader: instead of ``eval_fn``, batches ``(inputs, targets)``; the metric is
            ``metric`` (cloned for every evaluation) or, by default, multiclass accuracy.
        metric: a torchmetrics ``Metric`` or ``MetricCollection`` for ``eval_dataloader``.
        calibration_dataloader: batches (a tensor, or a tuple/list whose first item is the input) to
            refine the fit with :meth:`~timm_qconv.BitQuantizer.calibrate` (``calibration_samples`` of them).

    After a run, ``history`` holds one row per pass (step, epoch, relative error, float and
    quantized metrics), ``quantized_model`` the last quantized copy and ``report`` its per-layer
    :class:`~timm_qconv.report.QuantReport`.
    """

    def __init__(self, options: BitQuantizerOptions | None = None, *, eval_fn: EvalFn | None = None,
                 eval_dataloader: Iterable | None = None, metric: Any = None,
                 calibration_dataloader: Iterable | None = None, **kwargs: Any) -> None:
        options = resolve_options(BitQuantizerOptions, options, kwargs, "BitQuantizerCallback")
        if eval_fn is not None and eval_dataloader is not None:
            raise TypeError("pass eval_fn or eval_dataloader, not both")
        if eval_fn is not None and not callable(eval_fn):
            raise TypeError(f"eval_fn={eval_fn!r} must be callable as eval_fn(model) -> dict of metrics")
        if metric is not None and eval_dataloader is None:
            raise TypeError("metric= is used with eval_dataloader=; pass both")
        if calibration_dataloader is not None and not hasattr(calibration_dataloader, "__iter__"):
            raise TypeError(f"calibration_dataloader={type(calibration_dataloader).__name__} is not iterable; expected "
                            "batches of inputs (a DataLoader)")
        self.calibration_dataloader = calibration_dataloader
        self.options = options
        self.eval_fn = eval_fn
        self.eval_dataloader = eval_dataloader
        self.metric = metric
        self.history: list[dict[str, Any]] = []
        self.quantized_model: nn.Module | None = None
        self.report: QuantReport | None = None
        self._epoch_events = False  # the loop calls on_epoch_begin/on_epoch_end
        self._warned_epochs = False

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """``model``'s metrics with ``eval_fn`` or ``eval_dataloader`` (``{}`` when neither was given)."""
        if self.eval_fn is None and self.eval_dataloader is None:
            return {}
        was_training = model.training
        model.eval()
        try:
            if self.eval_fn is not None:
                return {name: float(v) for name, v in self.eval_fn(model).items()}
            metric = None if self.metric is None else self.metric.clone()
            device = next(model.parameters()).device
            for inputs, targets in self.eval_dataloader:
                outputs = model(inputs.to(device))
                if metric is None:
                    from torchmetrics.classification import MulticlassAccuracy

                    metric = MulticlassAccuracy(num_classes=outputs.shape[-1])
                metric = metric.to(outputs.device)
                metric.update(outputs, targets.to(outputs.device))
            if metric is None:
                raise ValueError("eval_dataloader yielded no batch")
            return _metric_values(metric)
        finally:
            model.train(was_training)

    def run(self, model: nn.Module, state: TrainState, handler: Any = None) -> dict[str, Any]:
        """One pass: fit, build the quantized copy, evaluate both, print the comparison."""
        o, config = self.options, self.options.config
        s = o.selection
        bq = BitQuantizer(model, config.n_functions, config.n_bits, avoid=s.avoid, layers=s.layers, method=config,
                          skip_first_last=s.skip_first_last, filter_fn=s.filter_fn)
        bq.train_hash_functions(o.n_iter)
        if self.calibration_dataloader is not None:
            bq.calibrate(self.calibration_dataloader, o.calibration_samples)
        self.quantized_model, self.report = bq.get_hashed_model(), bq.report()
        row = {"epoch": state.epoch, "step": state.global_step, "rel_error": self.report.rel_error,
               "float": self.evaluate(model), "quantized": self.evaluate(self.quantized_model)}
        self.history.append(row)
        state.logs.update({f"{kind}/{name}": v for kind in ("float", "quantized") for name, v in row[kind].items()})
        if handler is not None:
            handler.print(self.format(row))
            handler.log({f"bitquantizer/{kind}/{name}": v
                         for kind in ("float", "quantized") for name, v in row[kind].items()})
        return row

    def format(self, row: dict[str, Any]) -> str:
        """A pass's result as a small table: one line per metric, float and quantized side by side."""
        c = self.options.config
        lines = [f"timm_qconv BitQuantizer ({config_owner(c).name}, {c.n_bits} bits, {c.n_functions} channel groups) "
                 f"at epoch {row['epoch']}, step {row['step']}: relative weight error {row['rel_error']:.4g}"]
        if row["float"]:
            cells = [(name, f"{value:.4f}", f"{row['quantized'].get(name, float('nan')):.4f}")
                     for name, value in row["float"].items()]
            lines.append(render_table(cells, header=("metric", "float", "quantized"), align="lrr", indent="  "))
        return "\n".join(lines)

    # ----------------------------------------------------------------- events
    def on_epoch_begin(self, state: TrainState, control: TrainControl, **kwargs: Any) -> None:
        self._epoch_events = True

    def on_step_end(self, state: TrainState, control: TrainControl, **kwargs: Any) -> None:
        if self.options.every_n_epochs is not None and not self._epoch_events and not self._warned_epochs:
            self._warned_epochs = True
            warnings.warn(f"every_n_epochs={self.options.every_n_epochs} needs epoch events, but this loop calls no "
                          "on_epoch_begin/on_epoch_end, so BitQuantizerCallback runs only at on_train_end: call "
                          "handler.on_epoch_begin() and handler.on_epoch_end() around each epoch",
                          RuntimeWarning, stacklevel=4)

    def on_epoch_end(self, state: TrainState, control: TrainControl, model: nn.Module, handler: Any = None,
                     **kwargs: Any) -> None:
        every = self.options.every_n_epochs
        if every is not None and state.epoch % every == 0:
            self.run(model, state, handler)

    def on_train_end(self, state: TrainState, control: TrainControl, model: nn.Module, handler: Any = None,
                     **kwargs: Any) -> None:
        if self.options.at_train_end and not (self.history and self.history[-1]["step"] == state.global_step):
            self.run(model, state, handler)

    # ----------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    @staticmethod
    def check_state_dict(state: Any) -> dict[str, Any]:
        """Return ``state`` if it is ``{"history": [rows]}`` with JSON-like rows (from a file: checked)."""
        if not isinstance(state, dict) or set(state) != {"history"} or not isinstance(state["history"], list) \
                or not all(isinstance(row, dict) and all(isinstance(k, str) for k in row) for row in state["history"]):
            raise ValueError("BitQuantizerCallback state is not allowed; expected an object "
                             "{'history': [rows]} whose rows are objects with string keys")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(self.check_state_dict(state)["history"])
