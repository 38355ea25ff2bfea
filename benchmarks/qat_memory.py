"""Peak memory of a quantization-aware training step against the float step (timm resnet34, CPU).

Each variant runs in its own process (so that one's heap does not hide another's): build the
model, take two warm-up steps, reset the kernel's high-water mark of resident memory
(``/proc/self/clear_refs``, Linux), take ``--steps`` more steps and read the peak (``VmHWM``).
A step is forward, loss (cross-entropy, plus the hash loss for quantized variants), backward and
an SGD step with momentum, at batch 64 x 3 x 32 x 32, every Conv2d quantized with 32 groups.

A second float baseline ("float, kernels loaded") first runs one quantized layer's forward and
backward, which loads timm_qconv's Numba kernels and Numba's runtime (a fixed cost, about
140-190 MiB, whatever the model): the ratio to it is the quantized step's own memory.

The peak resident memory also counts what glibc's allocator keeps after a free for reuse, which
depends on the order of allocations more than on their sizes. ``--live`` runs every variant a
second time with freed blocks of 128 KiB or more returned to the system at once
(``MALLOC_MMAP_THRESHOLD_``), where the peak is the memory in use.

    python benchmarks/qat_memory.py [--bits 2 4] [--methods hash] [--steps 3] [--live]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from _memory import reset_peak, vm_kib


def child(method: str, n_bits: int, steps: int, batch: int) -> None:
    """One variant in this process; prints ``peak_kib model_kib``."""
    import timm
    import torch
    from torch import nn

    from timm_qconv import hash_loss, quantize_model

    if method == "float-kernels":  # load the kernels (and Numba) with one small quantized layer
        from timm_qconv import QuantConv2d

        QuantConv2d(64, 64, 3, n_bits=4)(torch.randn(2, 64, 8, 8)).sum().backward()
        method = "float"
    torch.manual_seed(0)
    model = timm.create_model("resnet34", pretrained=False, num_classes=10)
    if method != "float":
        quantize_model(model, method=method, n_bits=n_bits, n_functions=32)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    model_kib = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) // 1024

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if method != "float":
            loss = loss + hash_loss(model)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    reset_peak()
    for _ in range(steps):
        step()
    print(vm_kib("VmHWM"), model_kib)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["hash"])
    parser.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--live", action="store_true",
                        help="also run each variant with glibc returning every freed block of 128 KiB or more "
                             "to the system (MALLOC_MMAP_THRESHOLD_), so that the peak is the memory in use")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "BITS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.steps, args.batch)
        return

    def run(method: str, bits: int, live: bool = False) -> tuple[int, int]:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(128 * 1024)) if live else None
        out = subprocess.run([sys.executable, __file__, "--child", method, str(bits), "--steps", str(args.steps),
                              "--batch", str(args.batch)], check=True, capture_output=True, text=True, env=env)
        peak, model = out.stdout.split()[-2:]
        return int(peak), int(model)

    float_peak, float_model = run("float", 0)
    loaded_peak, _ = run("float-kernels", 0)
    loaded_live = run("float-kernels", 0, live=True)[0] if args.live else 0
    live = " | live memory, ratio to float with kernels loaded" if args.live else ""
    print(f"| variant | peak RSS in the steps | ratio to float | ratio to float, kernels loaded{live} "
          "| parameters and buffers |")
    print("| --- | ---: | ---: | ---: | " + ("---: | " if args.live else "") + "---: |")
    print(f"| float | {float_peak / 1024:.0f} MiB | 1.000 | | " + ("| " if args.live else "")
          + f"{float_model / 1024:.0f} MiB |")
    print(f"| float, kernels loaded | {loaded_peak / 1024:.0f} MiB | {loaded_peak / float_peak:.3f} | 1.000 | "
          + ("1.000 | " if args.live else "") + f"{float_model / 1024:.0f} MiB |")
    for method in args.methods:
        for bits in args.bits:
            peak, model = run(method, bits)
            cells = [f"{peak / 1024:.0f} MiB", f"{peak / float_peak:.3f}", f"{peak / loaded_peak:.3f}"]
            if args.live:
                cells.append(f"{run(method, bits, live=True)[0] / loaded_live:.3f}")
            print(f"| {method} {bits} bits + hash loss | " + " | ".join(cells) + f" | {model / 1024:.0f} MiB |")

if __name__ == "__main__":
    main()
