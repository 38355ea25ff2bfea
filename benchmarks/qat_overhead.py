"""Training-step and evaluation overhead of quantization-aware training on timm resnet34 (CPU).

For every method and bit width asked, measures against the float model, alternating the two in one
process (the machine's speed drifts; the ratio of each float/quantized pair cancels it):

* "step": one training step (forward, backward, SGD step with momentum), every Conv2d quantized
  (32 groups, ``"ste"``);
* "+ hash loss": the same step with the hash loss added to the task loss;
* "eval": a forward in ``eval()`` under ``torch.no_grad()`` (quantized weights cached).

Backends: ``eager`` (the default kernels), ``compiled`` (the batched path of ``kernels="compiled"``),
and ``torch.compile``: the converted model wrapped in ``torch.compile`` by the user, against the float
model wrapped the same way (the hash loss called outside the compiled model, as a training loop would).
The last column pairs two quantized models directly, alternating them as the float pairs are: for
``compiled`` rows, the compiled backend's step with the hash loss against the default (eager)
kernels' (below 1: the compiled backend is faster); for ``torch.compile`` rows, the compiled
quantized model against the same model uncompiled (step with the hash loss / eval), which is what
a user choosing whether to compile compares.

and prints one table of medians of the paired ratios. ``--floors`` adds two reference rows that
replace the quantizer by a plain copy of each weight into a kept buffer: what any per-step weight
transform costs at the least; "+ read back" adds one read of each weight and its gradient in the
backward, the least that levels learning from the task loss cost on top.

    python benchmarks/qat_overhead.py [--methods hash kmeans linear log] [--bits 2 4] [--steps 10]
        [--batch 64] [--backends eager compiled] [--floors]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
from torch import nn
from torch.nn.utils import parametrize

from timm_qconv import hash_loss, quantize_model


class _CopyInto(torch.autograd.Function):
    """Forward: the weight copied into a buffer kept from step to step (no allocation, as the
    compiled kernels do). Backward: the gradient unchanged; with ``read_back``, after one read of
    the weight and its gradient together (a dot product)."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, buffer: torch.Tensor, read_back: bool) -> torch.Tensor:
        ctx.read_back = read_back
        ctx.save_for_backward(weight)
        return buffer.copy_(weight).detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.read_back:
            (weight,) = ctx.saved_tensors
            torch.dot(weight.flatten(), grad.flatten())
        return grad, None, None


class _Copy(nn.Module):
    """The cheapest per-step weight transform: a copy (the gradient passes unchanged)."""

    def __init__(self, read_back: bool = False) -> None:
        super().__init__()
        self.read_back = read_back
        self.buffer: torch.Tensor | None = None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.empty_like(weight)
        return _CopyInto.apply(weight, self.buffer, self.read_back)


def copy_model(model: nn.Module, read_back: bool = False) -> nn.Module:
    """``model`` whose every Conv2d uses a copy of its weight made at each step: the floor of any
    method that recomputes the weights each step (as QAT must), whatever its maths. With
    ``read_back``, the backward also reads each weight and its gradient once, as learning the
    levels from the task loss must (a level's gradient sums those of the weights it holds), with
    the gradient still in cache and no arithmetic: a floor for the "hash ste" rows."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            parametrize.register_parametrization(module, "weight", _Copy(read_back))
    return model


def make_step(model: nn.Module, with_hash_loss: bool = False):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        model.train()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        if with_hash_loss:
            loss = loss + hash_loss(model)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def make_eval(model: nn.Module):
    def forward(x: torch.Tensor, y: torch.Tensor) -> float:
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            model(x)
        return time.perf_counter() - start

    return forward


def paired_ratio(float_step, step, x, y, steps: int) -> tuple[float, float, float]:
    """Median of the paired ratios, median quantized time, median float time."""
    for _ in range(2):  # warm-up (and compilation)
        float_step(x, y)
        step(x, y)
    base_times, times = [], []
    for _ in range(steps):
        base_times.append(float_step(x, y))
        times.append(step(x, y))
    paired = statistics.median(t / b for t, b in zip(times, base_times))
    return paired, statistics.median(times), statistics.median(base_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["hash", "kmeans", "linear", "log"])
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backends", nargs="+", default=["eager"], choices=["eager", "compiled", "torch.compile"])
    parser.add_argument("--floors", action="store_true", help="add the weight-copy floor rows")
    args = parser.parse_args()

    torch.manual_seed(0)
    base = timm.create_model("resnet34", pretrained=False, num_classes=10)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    float_step, float_eval = make_step(base), make_eval(base)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, resnet34, batch {args.batch}x3x32x32, "
          f"{args.steps} alternating pairs (float, quantized) per cell; medians of paired ratios\n")
    print("| variant | step | + hash loss | eval (no_grad) | float step | float eval | vs eager / uncompiled |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    if args.floors:
        for name, read_back in (("floor: weight copy", False), ("floor + read back", True)):
            ratio, _, ref = paired_ratio(float_step, make_step(copy_model(base, read_back)), x, y, args.steps)
            print(f"| {name} | {ratio:.3f} | | | {ref * 1e3:.0f} ms | | |", flush=True)
    for method in args.methods:
        for bits in args.bits:
            for backend in args.backends:
                user_compiled = backend == "torch.compile"
                quant = quantize_model(copy.deepcopy(base), method=method, n_bits=bits, n_functions=32, mode="ste",
                                       kernels="eager" if user_compiled else backend)
                reference_step, reference_eval = float_step, float_eval
                versus = ""
                if user_compiled:
                    # Fresh caches: every model compiled adds guards to the same code (timm's forwards),
                    # and past torch._dynamo's recompile limit the rows would silently run eager.
                    torch._dynamo.reset()
                    compiled_float = torch.compile(copy.deepcopy(base))
                    uncompiled, quant = quant, torch.compile(copy.deepcopy(quant))
                    reference_step, reference_eval = make_step(compiled_float), make_eval(compiled_float)
                    step_vs, _, _ = paired_ratio(make_step(uncompiled, True), make_step(quant, True), x, y, args.steps)
                    eval_vs, _, _ = paired_ratio(make_eval(uncompiled), make_eval(quant), x, y, args.steps)
                    versus = f"{step_vs:.3f} / {eval_vs:.3f}"
                elif backend == "compiled":
                    eager = quantize_model(copy.deepcopy(base), method=method, n_bits=bits, n_functions=32, mode="ste",
                                           kernels="eager")
                    step_vs, _, _ = paired_ratio(make_step(eager, True), make_step(quant, True), x, y, args.steps)
                    versus = f"{step_vs:.3f}"
                plain, _, ref = paired_ratio(reference_step, make_step(quant, False), x, y, args.steps)
                with_loss, _, _ = paired_ratio(reference_step, make_step(quant, True), x, y, args.steps)
                evaluation, _, ref_eval = paired_ratio(reference_eval, make_eval(quant), x, y, args.steps)
                print(f"| {method} {bits} bits, {backend} | {plain:.3f} | {with_loss:.3f} | {evaluation:.3f} | "
                      f"{ref * 1e3:.0f} ms | {ref_eval * 1e3:.0f} ms | {versus} |", flush=True)


if __name__ == "__main__":
    main()
