"""Calibrated vs data-free post-training quantization of LeNet-5 on Fashion-MNIST (BENCHMARKS.md, "Calibrated PTQ").

    python benchmarks/calibrate_lenet.py                                  # trains LeNet-5 (10 epochs), then the table
    python benchmarks/calibrate_lenet.py --methods hash kmeans --bits 4 2 1 --variants default
    python benchmarks/calibrate_lenet.py --methods log --variants default --held-out 5000 --scale-starts 4 8

Every Conv2d and Linear is quantized with 4 groups per layer; 512 calibration images are drawn
from the training set (seed 0); accuracy is on the 10,000 test images, and with ``--held-out N``
also on N other training images (seed 1, none of the calibration ones): a check of a choice that
does not read the test set. Each variant is a set of ``BitQuantizer.calibrate`` options, measured
against the simpler alternatives. ``--scale-starts`` compares the extra starting scales of the
scaled-shape methods (``log``): ``n`` per octave, from a quarter octave below the fitted scale to
half an octave above (4: the previous default, 2^-1/4, 2^1/4, 2^1/2; 8: the default).
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from timm_qconv import BitQuantizer
from timm_qconv.datasets import load_dataset
from timm_qconv.methods.scaled_shape import ScaledShapeQuantizer

VARIANTS = {
    "bias correction only": dict(gptq=False, refit=False, rounds=1),
    "level refit only": dict(gptq=False, refit=True, bias_correction=False),
    "GPTQ only": dict(refit=False, bias_correction=False, rounds=1),
    "symmetric target": dict(asymmetric=False),
    "no bias correction": dict(bias_correction=False),
    "default": dict(),
}


def lenet5() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))


def tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split, normalised, without augmentation, and their labels."""
    return (split.images.float() / 255 - split.mean) / split.std, split.labels


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + 2000]).argmax(1) == y[i:i + 2000]).sum()) for i in range(0, len(x), 2000))
    return 100 * hits / len(x)


def train(x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    torch.manual_seed(0)
    model = lenet5()
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * (len(x) // 128 + 1))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(128):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["hash", "kmeans"])
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 2, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--weights", default="", help="a LeNet-5 state dict to use instead of training one")
    parser.add_argument("--held-out", type=int, default=0, help="also score on this many other training images")
    parser.add_argument("--scale-starts", nargs="+", type=int, default=[],
                        help="starting scales per octave of scaled-shape methods to compare (default: the library's)")
    args = parser.parse_args()
    train_set, test_set = load_dataset("fashion-mnist", download=False)
    x, y = tensors(train_set)
    xt, yt = tensors(test_set)
    if args.weights:
        model = lenet5().eval()
        model.load_state_dict(torch.load(args.weights, weights_only=True))
    else:
        model = train(x, y, args.epochs)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:512]
    calib = [x[idx[i:i + 128]] for i in range(0, 512, 128)]
    others = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    others = others[~torch.isin(others, idx)][:args.held_out]

    def score(model: nn.Module) -> str:
        held_out = f" / held-out {accuracy(model, x[others], y[others]):.2f}" if args.held_out else ""
        return f"{accuracy(model, xt, yt):.2f}{held_out}"

    print(f"float {score(model)}")
    starts = {f"{n} starts/octave": tuple(2 ** (k / n) for k in range(-n // 4, n // 2 + 1) if k)
              for n in args.scale_starts} or {"": ScaledShapeQuantizer.CALIBRATION_SCALES}
    for method in args.methods:
        for n_bits in args.bits:
            def fitted() -> BitQuantizer:
                bq = BitQuantizer(model, 4, n_bits, layers=(nn.Conv2d, nn.Linear), method=method)
                return bq.train_hash_functions(50)
            row = [f"{method} {n_bits}b", f"data-free {score(fitted().get_hashed_model())}"]
            for name in args.variants:
                for label, scales in starts.items():
                    ScaledShapeQuantizer.CALIBRATION_SCALES = scales
                    bq = fitted()
                    start = time.perf_counter()
                    bq.calibrate(calib, 512, **VARIANTS[name])
                    seconds = time.perf_counter() - start
                    name_label = f"{name}, {label}" if label else name
                    row.append(f"{name_label} {score(bq.get_hashed_model())} ({seconds:.1f} s)")
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
