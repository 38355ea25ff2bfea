"""GPU readiness: the QAT, evaluation and post-training ratios on CUDA, plus a recipe smoke run.

Prints one table:

* training step with the hash loss and evaluation forward (``eval()``, ``no_grad``) against float,
  alternating in one process, medians of paired ratios: timm ``resnet34`` at batch 128 x 3 x 32 x 32
  and ``resnet50`` at batch 128 x 3 x 224 x 224, every Conv2d quantized (hash, 32 groups);
* ``BitQuantizer(model, 32, 4, device="cuda").train_hash_functions(50)`` on ``resnet50`` and
  ``vit_large_patch16_224`` against one sort + one bucketize of the same weights on the GPU;
* ``BitQuantizer.calibrate`` of resnet18 at 2 bits with float32 and bfloat16 weights on the GPU,
  against the same calibration on the CPU;
* ``accelerate launch`` of ``recipes/resnet34_q.py`` with 2 processes (``--multi_gpu`` with two or
  more GPUs; with one GPU, one process on it) for a few steps on synthetic Fashion-MNIST-shaped
  files (the machine needs no data or network).

Without CUDA it exits with status 2 and says so; nothing is measured.

    python benchmarks/gpu_check.py [--steps 20] [--bits 2 4]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def _timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, with_hash_loss: bool):
    from timm_qconv import hash_loss

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        if with_hash_loss:
            loss = loss + hash_loss(model)
        loss.backward()
        optimizer.step()

    return step


def _eval_fn(model: nn.Module, x: torch.Tensor):
    def forward() -> None:
        model.eval()
        with torch.no_grad():
            model(x)

    return forward


def _paired(base, variant, steps: int) -> float:
    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        base()
        variant()
    return statistics.median(_timed(variant) / _timed(base) for _ in range(steps))


def qat_rows(model_name: str, size: int, batch: int, bits: list[int], steps: int) -> list[list[str]]:
    import timm

    from timm_qconv import quantize_model

    torch.manual_seed(0)
    base = timm.create_model(model_name, pretrained=False, num_classes=10).cuda()
    x = torch.randn(batch, 3, size, size, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    rows = []
    for n_bits in bits:
        quant = quantize_model(copy.deepcopy(base), method="hash", n_bits=n_bits, n_functions=32)
        train = _paired(_step_fn(base, x, y, False), _step_fn(quant, x, y, True), steps)
        evaluation = _paired(_eval_fn(base, x), _eval_fn(quant, x), steps)
        rows.append([f"{model_name} {size}x{size} batch {batch}, hash {n_bits} bits", "train step + hash loss / float",
                     f"{train:.3f}"])
        rows.append(["", "eval forward / float", f"{evaluation:.3f}"])
    return rows


def ptq_row(model_name: str) -> list[str]:
    import timm

    from timm_qconv import BitQuantizer

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).cuda().eval()
    ws = [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]

    def baseline() -> None:
        for w in ws:
            torch.sort(w.reshape(-1))
        for w in ws:
            torch.bucketize(w.reshape(-1), torch.linspace(float(w.min()), float(w.max()), 17, device="cuda")[1:-1])

    def fit() -> None:
        BitQuantizer(model, 32, 4, layers=("conv", "linear"), device="cuda").train_hash_functions(50)

    _timed(baseline), _timed(fit)  # warm-up
    base = statistics.median(_timed(baseline) for _ in range(3))
    fitted = statistics.median(_timed(fit) for _ in range(3))
    return [f"{model_name} BitQuantizer 4 bits", "fit / (sort + bucketize)",
            f"{fitted / base:.2f} ({fitted:.2f} s / {base:.2f} s)"]


def calibrate_rows(device: str = "cuda", n_samples: int = 512) -> list[list[str]]:
    """``BitQuantizer.calibrate`` on ``device`` (issue 9): timm resnet18 (1 channel, standard stem) at
    2 bits, ``n_samples`` random 32x32 inputs, float32 and bfloat16 weights; its time, and the mean
    of the layers' output errors beside the same calibration's on the CPU (float32)."""
    import timm

    from timm_qconv import BitQuantizer

    torch.manual_seed(0)
    model = timm.create_model("resnet18", in_chans=1, num_classes=10).eval()
    x = torch.randn(n_samples, 1, 32, 32)
    loader = [x[i:i + 128] for i in range(0, n_samples, 128)]

    def mean_output_error(bq: BitQuantizer) -> float:
        return statistics.mean(r.out_error for r in bq.report() if r.out_error is not None)

    on_cpu = mean_output_error(BitQuantizer(model, 32, 2).train_hash_functions(50).calibrate(loader, n_samples))
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        bq = BitQuantizer(copy.deepcopy(model).to(device, dtype), 32, 2, device=device).train_hash_functions(50)
        start = time.perf_counter()
        bq.calibrate(loader, n_samples)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        rows.append([f"resnet18 calibrate, 2 bits, {n_samples} inputs, {str(dtype)[6:]} weights on {device}",
                     "time; mean output error (CPU float32)",
                     f"{seconds:.1f} s; {mean_output_error(bq):.4f} ({on_cpu:.4f})"])
    return rows


def _write_idx(path: Path, data: torch.Tensor) -> None:
    header = b"\0\0\x08" + bytes([data.dim()]) + struct.pack(f">{data.dim()}I", *data.shape)
    path.write_bytes(header + data.to(torch.uint8).numpy().tobytes())


def recipe_row(folder: Path) -> list[str]:
    """A few steps of every run of the recipe, launched with accelerate, on synthetic IDX files."""
    data = folder / "data"
    data.mkdir()
    generator = torch.Generator().manual_seed(0)
    for split, n in (("train", 512), ("t10k", 256)):
        _write_idx(data / f"{split}-images-idx3-ubyte", torch.randint(0, 256, (n, 28, 28), generator=generator))
        _write_idx(data / f"{split}-labels-idx1-ubyte", torch.randint(0, 10, (n,), generator=generator))
    gpus = torch.cuda.device_count()
    launch = ["--multi_gpu", "--num_processes", "2"] if gpus >= 2 else ["--num_processes", "1"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launch, str(ROOT / "recipes" / "resnet34_q.py"),
               "--model", "resnet18", "--dataset", "fashion-mnist", "--data-dir", str(data), "--epochs", "1",
               "--qat-epochs", "1", "--max-steps", "3", "--bits", "2", "--batch-size", "64",
               "--output-dir", str(folder / "run")]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    took = time.perf_counter() - start
    status = "ok" if done.returncode == 0 else f"FAILED (exit {done.returncode}): {done.stderr.strip()[-300:]}"
    processes = "2 processes" if gpus >= 2 else f"1 process ({gpus} GPU)"
    return [f"recipe resnet34_q.py (resnet18), accelerate launch, {processes}", "float + ptq + qat, 3 steps each",
            f"{status}, {took:.0f} s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); this script measures the "
              "GPU ratios only, so nothing was measured. Run it on a machine with an NVIDIA GPU.", file=sys.stderr)
        sys.exit(2)
    torch.backends.cudnn.benchmark = True
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()} x {torch.cuda.device_count()}, "
          f"{args.steps} paired steps per ratio\n")
    rows = [*qat_rows("resnet34", 32, 128, args.bits, args.steps),
            *qat_rows("resnet50", 224, 128, args.bits, args.steps),
            ptq_row("resnet50"), ptq_row("vit_large_patch16_224"), *calibrate_rows()]
    with tempfile.TemporaryDirectory() as folder:
        rows.append(recipe_row(Path(folder)))
    print("| setup | measure | result |")
    print("| --- | --- | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    os.environ.setdefault("TIMM_QCONV_PLUGINS", "")
    main()
