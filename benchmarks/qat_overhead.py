"""Training-step overhead of quantization-aware training on timm resnet34 (CPU).

Measures one step (forward, backward, SGD step) with every Conv2d quantized (hash, 2 bits, 32
functions, "ste") against the same step in float, alternating them in one process, and prints the
ratio of the medians, for both kernel backends (eager, compiled; see timm_qconv/_kernels.py).
Further rows add the hash loss to the task loss.

    python benchmarks/qat_overhead.py [--steps 15] [--batch 64]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
from torch import nn

from timm_qconv import hash_loss, quantize_model
from timm_qconv._kernels import set_backend


def make_step(model: nn.Module, with_hash_loss: bool = False, backend: str = "eager"):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        set_backend(backend)
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
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = timm.create_model("resnet34", pretrained=False, num_classes=10)
    quant = quantize_model(copy.deepcopy(base), method="hash", n_bits=2, n_functions=32, mode="ste")
    steps = {"float": make_step(base)}
    for backend in ("eager", "compiled"):
        steps[f"hash ste, {backend}"] = make_step(quant, False, backend)
        steps[f"+ hash loss, {backend}"] = make_step(quant, True, backend)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    times = {name: [] for name in steps}
    for name, step in steps.items():  # warm-up (and compilation)
        step(x, y)
        step(x, y)
    for _ in range(args.steps):
        for name, step in steps.items():
            times[name].append(step(x, y))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}x3x32x32, {args.steps} steps each")
    for name, value in med.items():
        print(f"{name:>24}: median step {value * 1e3:8.1f} ms   ratio to float {value / med['float']:.3f}")


if __name__ == "__main__":
    main()
