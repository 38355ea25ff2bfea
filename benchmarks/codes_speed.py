"""Time of the eager code search (every weight's level index) over a timm model's layers (CPU).

Each method is fitted to the random weights (``quantize_model``, 32 groups, every Conv2d and
Linear), then every layer's codes (of layers of at least ``--min-numel`` weights) are computed from
its fitted levels by each search, a pass over all layers at a time, and the median of
``--repeats`` passes printed beside its ratio to ``torch.searchsorted`` measured in the same run:

* ``default``: :func:`timm_qconv._kernels.threshold_codes` as post-training quantization calls it,
  and training where Numba does not import (the Numba kernels' own search is timed with the
  training step, ``qat_overhead.py``): thresholds per group; comparisons one by one up to 16
  levels, 8 in layers of 4 Mi weights or more; bins above; in blocks where bins crowd;
* ``one by one``: the comparisons alone (up to 16 levels);
* ``bins``: the binned search alone (equal in value, else by bit pattern; "declined" where
  thresholds crowd in the bins);
* ``per row``: the default with one row of thresholds per channel (the previous layout);
* ``blocks``: the search in blocks alone, the fallback where bins crowd;
* ``searchsorted``: ``torch.searchsorted`` on the per-row thresholds.

Every search is checked against ``torch.searchsorted`` before it is timed.

    python benchmarks/codes_speed.py [--methods hash kmeans log] [--bits 5 6 8] [--repeats 5]
    python benchmarks/codes_speed.py --model vit_large_patch16_224 --min-numel 4000000 --bits 4
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from timm_qconv import quantize_model
from timm_qconv._groups import midpoints
from timm_qconv._kernels import (
    CHAIN_MAX_LEVELS,
    _count_above,
    _count_above_binned,
    _count_above_in_blocks,
    threshold_codes,
)


def layer_inputs(model_name: str, method: str, bits: int,
                 min_numel: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(thresholds per group, weights as rows, group of each row) of every quantized layer."""
    model = quantize_model(timm.create_model(model_name, num_classes=10), method=method, n_bits=bits,
                           n_functions=32, layers=("conv", "linear"))
    inputs = []
    for module in model.modules():
        quantizer = getattr(module, "quantizer", None)
        if quantizer is not None and module.weight.numel() >= min_numel:
            thresholds = midpoints(quantizer.levels().detach().float()).contiguous()
            rows = module.weight.detach().reshape(module.weight.shape[0], -1).contiguous()
            inputs.append((thresholds, rows, quantizer.group_index))
    return inputs


def one_by_one(thresholds: torch.Tensor, rows: torch.Tensor, groups: torch.Tensor) -> torch.Tensor | None:
    return _count_above(rows, thresholds[groups]) if thresholds.shape[1] < CHAIN_MAX_LEVELS else None


def bins(thresholds: torch.Tensor, rows: torch.Tensor, groups: torch.Tensor) -> torch.Tensor | None:
    by_value = _count_above_binned(rows, thresholds, groups)
    return by_value if by_value is not None else _count_above_binned(rows, thresholds, groups, by_bits=True)


SEARCHES = {
    "default": lambda thresholds, rows, groups: threshold_codes(thresholds, rows, groups),
    "one by one": one_by_one,
    "bins": bins,
    "per row": lambda thresholds, rows, groups: threshold_codes(thresholds[groups], rows),
    "blocks": lambda thresholds, rows, groups: _count_above_in_blocks(rows, thresholds[groups].contiguous()),
    "searchsorted": lambda thresholds, rows, groups: torch.searchsorted(thresholds[groups].contiguous(), rows),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["hash", "kmeans", "log"])
    parser.add_argument("--bits", nargs="+", type=int, default=[5, 6, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="resnet34", help="timm model (random weights)")
    parser.add_argument("--min-numel", type=int, default=0, help="only layers with at least this many weights")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.model}, layers of at least "
          f"{args.min_numel} weights; median of {args.repeats} passes over them (ratio to searchsorted)\n")
    print("| method, bits | " + " | ".join(SEARCHES) + " |")
    print("| --- |" + " ---: |" * len(SEARCHES))
    for method in args.methods:
        for bits in args.bits:
            inputs = layer_inputs(args.model, method, bits, args.min_numel)
            searches = dict(SEARCHES)
            for name, search in SEARCHES.items():
                for thresholds, rows, groups in inputs:
                    expected = torch.searchsorted(thresholds[groups].contiguous(), rows)
                    codes = search(thresholds, rows, groups)
                    if codes is None:  # does not apply, or declined
                        searches.pop(name)
                        break
                    if not torch.equal(codes.long(), expected):
                        raise AssertionError(f"{method} {bits} bits: {name} differs from torch.searchsorted")
            times = {name: [] for name in searches}
            for _ in range(args.repeats):
                for name, search in searches.items():  # interleaved: the machine's drift hits all alike
                    start = time.perf_counter()
                    for thresholds, rows, groups in inputs:
                        search(thresholds, rows, groups)
                    times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(values) for name, values in times.items()}
            cells = [f"{medians[name] * 1e3:.0f} ms ({medians[name] / medians['searchsorted']:.2f})"
                     if name in medians else "n/a" for name in SEARCHES]
            print(f"| {method} {bits} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
