"""Training-step overhead of quantization-aware training on timm resnet34 (CPU).

Measures one step (forward, backward, SGD step) with every Conv2d quantized (hash, 2 bits, 32
functions, "ste") against the same step in float, alternating the two in one process, and prints
the ratio of the medians, for both kernel backends (eager, compiled; see timm_qconv/_kernels.py).
Further rows add the hash loss to the task loss. Each variant is paired with float on its own, so
that one variant's memory traffic does not slow another's steps. The "floor" rows replace the
quantizer by a plain copy of each weight into a kept buffer: what any per-step weight transform
costs at the least; "+ read back" adds one read of each weight and its gradient in the backward,
the least that levels learning from the task loss cost on top.

    python benchmarks/qat_overhead.py [--steps 30] [--batch 64] [--backends eager compiled]
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
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        if with_hash_loss:
            loss = loss + hash_loss(model)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backends", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    args = parser.parse_args()

    torch.manual_seed(0)
    base = timm.create_model("resnet34", pretrained=False, num_classes=10)
    quant = {backend: quantize_model(copy.deepcopy(base), method="hash", n_bits=2, n_functions=32, mode="ste",
                                     kernels=backend) for backend in args.backends}
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    float_step = make_step(base)
    variants = {"floor: weight copy": make_step(copy_model(base)),
                "floor + read back": make_step(copy_model(base, read_back=True))}
    variants.update({f"{label}, {backend}": make_step(quant[backend], with_loss)
                     for backend in args.backends for label, with_loss in (("hash ste", False), ("+ hash loss", True))})
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}x3x32x32, "
          f"{args.steps} alternating steps per pair (float, variant)")
    for name, step in variants.items():
        for _ in range(2):  # warm-up (and compilation)
            float_step(x, y)
            step(x, y)
        base_times, times = [], []
        for _ in range(args.steps):
            base_times.append(float_step(x, y))
            times.append(step(x, y))
        ref, value = statistics.median(base_times), statistics.median(times)
        # The machine's speed drifts over a run; the ratio of each float/variant pair cancels it.
        paired = statistics.median(t / b for t, b in zip(times, base_times))
        print(f"{name:>22}: median step {value * 1e3:7.1f} ms, float {ref * 1e3:7.1f} ms, "
              f"ratio of medians {value / ref:.3f}, median of paired ratios {paired:.3f}")

if __name__ == "__main__":
    main()
