"""Calibrated post-training quantization: refine a fitted :class:`~timm_qconv.BitQuantizer` with a few hundred inputs.

The data-free fit minimises each layer's *weight* error; what matters is the *output* error, which
depends on the inputs: a weight that multiplies a large, frequent input matters more. With ``H``
the second moments of a layer's input columns, the output error of a quantized weight ``Q`` is
``tr((W - Q) H (W - Q)^T)``. :func:`calibrate` walks the layers in the order the model calls them
and, for each one:

1. collects ``H`` (and the input mean) from the calibration inputs as they reach the layer through
   the model whose earlier layers are *already quantized*. The layer thus learns to undo the
   error of the layers before it (sequential calibration, as GPTQ and AdaRound do); memory holds
   one layer's ``H`` at a time (``K x K``, ``K`` = inputs of one output channel). Each batch's
   forward runs once, paused before each layer in turn (:mod:`timm_qconv._stepped_forward`),
   rather than again from the input for every layer.
2. re-assigns its weights to the group's levels by GPTQ's column-by-column rounding with error
   feedback through ``H^-1`` (Optimal Brain Quantization: Frantar & Alistarh, NeurIPS 2022; GPTQ:
   Frantar et al., ICLR 2023), with the largest-input columns first;
3. refits the levels for the new codes by least squares on the output error, within the method's
   family (``Quantizer.level_design``: the ±basis of ``hash`` as in LQ-Nets, free levels for
   ``kmeans``, the scale of ``log``), and repeats 2-3 ``rounds`` times, keeping the best; the
   data-free result is a candidate too, so a layer never gets worse on the calibration data.
   Methods with one parameter per group (``log``'s scale) also start from other scales
   (``Quantizer.calibration_starts``): the alternation settles near where it starts;
4. corrects its bias for the mean output shift ``(W - Q) E[x]`` (bias correction: Nagel et al.,
   "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019), for layers
   that have a bias.

Finally the BatchNorm statistics are re-estimated on the quantized model (as in Nagel et al.'s
white paper, "A White Paper on Neural Network Quantization", 2021, and AdaRound's BN re-estimation),
and kept only if they bring the model's outputs closer to the float model's on the calibration data.

Why not AdaRound (Nagel et al., ICML 2020) or BRECQ (Li et al., ICLR 2021)? They learn the rounding
by gradient descent, thousands of iterations per layer: minutes to hours on a CPU, against the
60-second budget for resnet18. GPTQ's closed-form updates cost one ``K x K`` inverse and ``C K^2``
operations per layer, and the refit keeps levels that the data-free fit chose without data.
BENCHMARKS.md ("Calibrated PTQ") measures each step against the simpler alternatives.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._errors import check_choice, check_float, check_int
from ._gptq import InputStats, blocks, gptq_codes, gptq_factor, refit_levels, row_tables
from ._groups import as_rows
from ._stepped_forward import SteppedForwards
from .report import QuantReport

if TYPE_CHECKING:
    from .bit_quantizer import BitQuantizer

BN_CHOICES = ("auto", "always", "never")


@dataclass
class CalibrationConfig:
    """Options of :func:`calibrate`.

    Args:
        n_samples: calibration inputs to use (the first ones the loader yields).
        rounds: GPTQ assignment + level refit rounds per layer and starting point (one, or more
            for methods with :meth:`~timm_qconv.methods.base.Quantizer.calibration_starts`).
        gptq: re-assign codes with GPTQ (``False``: keep the data-free codes, refit the levels only).
        refit: refit the levels by least squares after each assignment.
        act_order: GPTQ quantizes the columns with the largest inputs first.
        damp: GPTQ's ridge on ``H``, relative to its mean diagonal.
        bias_correction: correct the mean output shift in layers with a bias.
        bn_reestimate: re-estimate BatchNorm statistics: ``"auto"`` keeps them if they bring the
            outputs closer to the float model's, ``"always"``, or ``"never"``.
        asymmetric: match each layer's output to the *float* model's output for the same input
            (``W f`` vs ``Q x``), not to the float layer's output on the quantized input (``W x``);
            costs a forward of the float model per layer.
        step_forwards: run each batch's forward once for all layers, paused before each one in
            turn, instead of again up to each layer (about two forwards per batch instead of half
            the model per layer), where the paused forwards' activations fit in half the free
            memory by a rough estimate: three times the largest activation (a module's output or
            a layer's input), for every calibration input. A model that keeps more alive across
            its layers (many long skip connections) may need ``False``.
    """

    n_samples: int = 512
    rounds: int = 3
    gptq: bool = True
    refit: bool = True
    act_order: bool = True
    damp: float = 0.03
    bias_correction: bool = True
    bn_reestimate: str = "auto"
    asymmetric: bool = True
    step_forwards: bool = True

    def __post_init__(self) -> None:
        check_int("n_samples", self.n_samples, 1)
        check_int("rounds", self.rounds, 1)
        check_float("damp", self.damp, 0.0, strict=False)
        check_choice("bn_reestimate", self.bn_reestimate, BN_CHOICES)
        for name in ("gptq", "refit", "act_order", "bias_correction", "asymmetric", "step_forwards"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be True or False")


class _Stop(Exception):
    """Raised by the input hook once a layer has seen its inputs: the rest of the forward is not needed."""


def collect_inputs(loader: Iterable, n_samples: int) -> list[Tensor]:
    """The first ``n_samples`` inputs of ``loader``, as a list of batches (checked, on the CPU as given).

    A batch is a tensor, or a tuple/list whose first item is the input tensor.
    """
    try:
        iterator = iter(loader)
    except TypeError:
        raise TypeError(f"loader={type(loader).__name__} is not iterable; expected an iterable of batches "
                        "(a tensor, or a tuple/list whose first item is the input)") from None
    batches, total, shape = [], 0, None
    for index, batch in enumerate(iterator):
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, Tensor):
            raise TypeError(f"loader batch {index} is {type(batch).__name__} holding {type(x).__name__}; expected a "
                            "tensor or a tuple/list whose first item is the input tensor")
        if not x.is_floating_point():
            raise TypeError(f"loader batch {index} has dtype {x.dtype} (labels only?); expected floating-point inputs")
        if x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(f"loader batch {index} has shape {tuple(x.shape)}; expected (batch, ...) with batch >= 1")
        if shape is not None and x.shape[1:] != shape:
            raise ValueError(f"loader batch {index} has shape {tuple(x.shape)}; earlier batches had "
                             f"(*, {', '.join(map(str, shape))})")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"loader batch {index} has NaN or infinite values; expected finite inputs")
        shape = x.shape[1:]
        x = x[: n_samples - total]
        batches.append(x)
        total += x.shape[0]
        if total >= n_samples:
            break
    if not batches:
        raise ValueError(f"loader={type(loader).__name__} yielded no batch (empty or exhausted); expected at least one")
    if total < n_samples:
        warnings.warn(f"loader yielded {total} inputs, fewer than n_samples={n_samples}; calibrating on {total}",
                      RuntimeWarning, stacklevel=3)
    return batches


def _call_order(model: nn.Module, modules: dict[str, nn.Module], x: Tensor) -> tuple[dict[str, int], int]:
    """The layers in the order of their first call in a forward of ``x``, with their number of
    calls; and the size in bytes of the largest activation (a module's output or a layer's input),
    per sample."""
    calls: dict[str, int] = {}
    largest = [0]

    def measure(value: Any) -> None:
        if isinstance(value, Tensor):
            largest[0] = max(largest[0], value.numel() * value.element_size() // max(len(x), 1))

    def count(module: nn.Module, args: tuple, name: str) -> None:
        calls[name] = calls.get(name, 0) + 1
        measure(args[0])

    handles = [m.register_forward_pre_hook(functools.partial(count, name=name)) for name, m in modules.items()]
    handles += [m.register_forward_hook(lambda module, args, output: measure(output)) for m in model.modules()]
    try:
        model(x)
    except Exception as error:
        raise ValueError(f"loader: a batch of shape {tuple(x.shape)} does not fit {type(model).__name__}: "
                         f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}") from error
    finally:
        for h in handles:
            h.remove()
    return calls, largest[0]


def _free_memory(device: torch.device) -> float:
    """Bytes free on ``device``: CUDA's count, else the system's available memory (inf if unknown)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return float(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return float("inf")


def _run_until(model: nn.Module, layer: nn.Module, calls: int, x: Tensor, take: Any) -> None:
    """Forward ``x``, calling ``take(input)`` at each call of ``layer``; stop after its last call."""
    seen = [0]

    def hook(module: nn.Module, args: tuple) -> None:
        take(args[0])
        seen[0] += 1
        if seen[0] == calls:
            raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()


class _LayerInputs:
    """The inputs of the layers, one layer after the other, on the quantized model and (if given)
    the float one, batch by batch.

    With ``step``, each batch's forward runs once for the whole calibration, paused before each
    layer in turn (:class:`SteppedForwards`): about two forwards per batch in all, where running
    each forward again up to each layer costs half the model per layer. Otherwise, or where a
    batch's forward cannot be stepped (its call order differs), the forward is run again up to
    the layer's last call.
    """

    def __init__(self, model: nn.Module, float_model: nn.Module | None, layers: dict[str, nn.Module],
                 calls: dict[str, int], batches: list[Tensor], device: torch.device, step: bool) -> None:
        self.model, self.float_model, self.layers, self.calls = model, float_model, layers, calls
        self.batches, self.device = batches, device
        self.float_layers = {} if float_model is None else {
            name: module for name, module in float_model.named_modules() if name in layers}
        inputs = [x.to(device, torch.float32) for x in batches] if step else []
        self.stepped = [SteppedForwards(model, inputs, layers)] if step else []
        if step and float_model is not None:
            self.stepped.append(SteppedForwards(float_model, inputs, self.float_layers))

    def __call__(self, name: str) -> Iterator[tuple[Tensor, Tensor | None]]:
        """``(input, float model's input)`` of every call of layer ``name``, batch by batch."""
        for index, x in enumerate(self.batches):
            if self.stepped:  # a batch's stopped forward answers None from then on
                quantized, *floated = self.stepped
                floats = floated[0].advance(index, name) if floated else None
                inputs = quantized.advance(index, name)
                if inputs is not None and (floats is not None or not floated):
                    yield inputs, floats
                    continue
                for forwards in self.stepped:  # cannot step this batch to this layer: run it again from now on
                    forwards.stop(index)
            yield from self._run_again(name, x.to(self.device, torch.float32))

    def _run_again(self, name: str, x: Tensor) -> Iterator[tuple[Tensor, Tensor | None]]:
        floats: list[Tensor] = []
        if self.float_model is not None:
            _run_until(self.float_model, self.float_layers[name], self.calls[name], x, floats.append)
        inputs: list[Tensor] = []
        _run_until(self.model, self.layers[name], self.calls[name], x, inputs.append)
        for i, inp in enumerate(inputs):
            yield inp, (floats[i] if i < len(floats) else None)

    def close(self) -> None:
        try:
            for forwards in self.stepped:
                forwards.close()
        finally:
            self.stepped = []


@torch.no_grad()
def calibrate_layer(quantizer: nn.Module, rows: Tensor, codes: Tensor, stats: InputStats,
                    config: CalibrationConfig) -> tuple[nn.Module, Tensor, float, float, float]:
    """Best quantizer and codes for one layer; returns ``(quantizer, codes, error before, after, reference)``.

    The errors are output errors ``tr((W - Q) H (W - Q)^T)``; the reference is ``tr(W H W^T)``.
    ``quantizer`` is not modified (copies are refined: of it, and of each of its
    :meth:`~timm_qconv.methods.base.Quantizer.calibration_starts`).
    """
    n_blocks = stats.n_blocks
    h = stats.gram()
    damp = config.damp
    w = stats.target(damp)
    codes = blocks(codes.long(), n_blocks)

    def error(q: nn.Module, c: Tensor) -> float:
        return stats.error(blocks(q.decode(c.reshape(rows.shape)), n_blocks))

    before = error(quantizer, codes)
    best = (before, quantizer, codes)
    factor = gptq_factor(h, config.act_order, damp) if config.gptq else None
    starts = quantizer.calibration_starts() if config.gptq or config.refit else []  # the method's other levels
    for start in (quantizer, *starts):
        if start is quantizer:
            current = copy.deepcopy(quantizer)
        else:  # already a copy (calibration_starts' contract), refined in place
            current, codes = start, blocks(start.encode(rows), n_blocks)
        for _ in range(config.rounds):
            if config.gptq:
                tables, codes_of = row_tables(current, n_blocks)
                codes = gptq_codes(w, factor, tables, codes_of)
                if (e := error(current, codes)) < best[0]:
                    best = (e, copy.deepcopy(current), codes)
            if config.refit:
                refitted = refit_levels(current, w, codes, h)
                if refitted is None:
                    if not config.gptq:
                        break
                    continue
                codes = refitted
                if (e := error(current, codes)) < best[0]:
                    best = (e, copy.deepcopy(current), codes)
            if not config.gptq and not config.refit:
                break
    return best[1], best[2].reshape(rows.shape), before, best[0], stats.reference()


def _bn_modules(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats}


@torch.no_grad()
def _outputs_error(model: nn.Module, reference: list[Tensor], batches: list[Tensor], device: torch.device) -> float:
    """Squared distance of ``model``'s outputs from ``reference`` over the batches."""
    return sum(float((model(x.to(device, torch.float32)).float() - r).pow(2).sum()) for x, r in zip(batches, reference))


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: list[Tensor], device: torch.device) -> dict[str, Tensor]:
    """Recompute every BatchNorm's running mean and variance on ``batches`` (cumulative average); returns them."""
    bns = _bn_modules(model)
    saved = {n: (m.momentum, m.training) for n, m in bns.items()}
    for m in bns.values():
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in batches:
            model(x.to(device, torch.float32))
    finally:
        for n, m in bns.items():
            m.momentum, training = saved[n]
            m.train(training)
    return {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in bns.items() for k in ("running_mean", "running_var")}


@torch.no_grad()
def calibrate(bq: "BitQuantizer", loader: Iterable, config: CalibrationConfig) -> tuple[dict, dict, dict, QuantReport]:
    """Refine a fitted BitQuantizer's layers with calibration inputs (see the module docstring).

    Returns ``(quantizers, codes, overrides, report)``; ``bq`` and its model are not changed, so
    the caller commits all of it or nothing. ``overrides`` maps state-dict keys of the model
    (corrected biases, BatchNorm statistics) to their new values, in the model's dtypes.
    """
    batches = collect_inputs(loader, config.n_samples)
    first = next(iter(bq.modules.values())).weight
    device = bq.device or first.device
    working = copy.deepcopy(bq.model).to(device).float().eval()
    float_model = copy.deepcopy(working) if config.asymmetric else None
    modules = dict(working.named_modules())
    layers = {name: modules[name] for name in bq.layer_names}
    calls, largest_input = _call_order(working, layers, batches[0].to(device, torch.float32))
    n_inputs = sum(len(x) for x in batches)
    paused_bytes = 3 * largest_input * n_inputs * (1 if float_model is None else 2)
    step = config.step_forwards and all(n == 1 for n in calls.values()) and paused_bytes <= _free_memory(device) / 2
    reference = []  # the float model's outputs, to judge the BatchNorm re-estimation by
    if config.bn_reestimate == "auto" and _bn_modules(working):
        reference = [working(x.to(device, torch.float32)).float() for x in batches]
    quantizers, codes, overrides, reports = dict(bq.quantizers), dict(bq.codes), {}, []
    order = [n for n in calls] + [n for n in bq.layer_names if n not in calls]  # layers never called stay data-free
    old_reports = {r.name: r for r in bq._report}
    items = tqdm(order, desc=f"calibrating {bq.method.name} {bq.config.n_bits}-bit", unit="layer",
                 disable=not bq.verbose)
    layer_inputs = _LayerInputs(working, float_model, {n: layers[n] for n in calls}, calls, batches, device, step)
    try:
        for name in items:
            original = bq.modules[name]
            old = old_reports[name]
            if name not in calls:
                reports.append(dataclasses.replace(old, data_free_sq_error=old.sq_error))
                continue
            rows = as_rows(original.weight.detach()).to(device, torch.float32)
            stats = InputStats(layers[name], rows)
            for inputs, floats in layer_inputs(name):
                stats.add(inputs, floats)
            stats.centered = config.bias_correction and original.bias is not None
            quantizer, new_codes, before, after, ref = calibrate_layer(
                copy.deepcopy(quantizers[name]).to(device), rows, bq.layer_codes(name).to(device), stats, config)
            q = quantizer.decode(new_codes)
            layers[name].weight.data.copy_(q.view(layers[name].weight.shape))
            if config.bias_correction and original.bias is not None:  # mean of W f - Q x
                shift = ((stats.w * stats.mean_float()[:, None, :]).sum(-1)
                         - (blocks(q, stats.n_blocks) * stats.mean()[:, None, :]).sum(-1))
                bias = layers[name].bias
                bias.data += shift.reshape(-1)
                overrides[f"{name}.bias"] = bias.detach().to(original.bias.device, original.bias.dtype).clone()
            quantizers[name], codes[name] = quantizer, new_codes.to(torch.uint8)
            reports.append(dataclasses.replace(
                old, sq_error=float((q - rows).pow(2).sum()), data_free_sq_error=old.sq_error,
                out_error=after / ref if ref > 0 else 0.0, data_free_out_error=before / ref if ref > 0 else 0.0))
            del stats
    finally:
        layer_inputs.close()
    if _bn_modules(working) and config.bn_reestimate != "never":
        before = _outputs_error(working, reference, batches, device) if reference else None
        state = {k: v.clone() for k, v in working.state_dict().items()}
        stats = reestimate_batchnorm(working, batches, device)
        if before is None or _outputs_error(working, reference, batches, device) < before:
            model_state = bq.model.state_dict()
            overrides.update({k: v.to(model_state[k].device, model_state[k].dtype) for k, v in stats.items()})
        else:
            working.load_state_dict(state)
    by_name = {r.name: r for r in reports}
    return quantizers, codes, overrides, QuantReport([by_name[n] for n in bq.layer_names])
