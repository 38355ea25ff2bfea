"""Time of the eager code search (every weight's level index) over timm resnet34's convs (CPU).

Each method is fitted to the random weights (``quantize_model``, 32 groups), then every layer's
codes are computed from its fitted levels by each search, a pass over all layers at a time, and
the median of ``--repeats`` passes printed beside its ratio to ``torch.searchsorted`` measured in
the same run:

* ``default``: :func:`timm_qconv._kernels.threshold_codes` as training calls it (thresholds per
  group, comparisons up to 16 levels, bins above, in blocks where bins crowd);
* ``per row``: the same with one row of thresholds per channel (the previous layout);
* ``blocks``: the search in blocks alone, the fallback above 16 levels;
* ``searchsorted``: ``torch.searchsorted`` on the per-row thresholds.

Every search is checked against ``torch.searchsorted`` before it is timed.

    python benchmarks/codes_speed.py [--methods hash kmeans log] [--bits 5 6 8] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from timm_qconv import quantize_model
from timm_qconv._groups import midpoints
from timm_qconv._kernels import _count_above_in_blocks, threshold_codes


def layer_inputs(method: str, bits: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(thresholds per group, weights as rows, group of each row) of every quantized conv."""
    model = quantize_model(timm.create_model("resnet34", num_classes=10), method=method, n_bits=bits,
                           n_functions=32)
    inputs = []
    for module in model.modules():
        quantizer = getattr(module, "quantizer", None)
        if quantizer is not None:
            thresholds = midpoints(quantizer.levels().detach().float()).contiguous()
            rows = module.weight.detach().reshape(module.weight.shape[0], -1).contiguous()
            inputs.append((thresholds, rows, quantizer.group_index))
    return inputs


SEARCHES = {
    "default": lambda thresholds, rows, groups: threshold_codes(thresholds, rows, groups),
    "per row": lambda thresholds, rows, groups: threshold_codes(thresholds[groups], rows),
    "blocks": lambda thresholds, rows, groups: _count_above_in_blocks(rows, thresholds[groups].contiguous()),
    "searchsorted": lambda thresholds, rows, groups: torch.searchsorted(thresholds[groups].contiguous(), rows),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["hash", "kmeans", "log"])
    parser.add_argument("--bits", nargs="+", type=int, default=[5, 6, 8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, resnet34 convs (21 M weights); "
          f"median of {args.repeats} passes over every layer (ratio to searchsorted)\n")
    print("| method, bits | " + " | ".join(SEARCHES) + " |")
    print("| --- |" + " ---: |" * len(SEARCHES))
    for method in args.methods:
        for bits in args.bits:
            inputs = layer_inputs(method, bits)
            for name, search in SEARCHES.items():
                for thresholds, rows, groups in inputs:
                    expected = torch.searchsorted(thresholds[groups].contiguous(), rows)
                    if not torch.equal(search(thresholds, rows, groups).long(), expected):
                        raise AssertionError(f"{method} {bits} bits: {name} differs from torch.searchsorted")
            times = {name: [] for name in SEARCHES}
            for _ in range(args.repeats):
                for name, search in SEARCHES.items():  # interleaved: the machine's drift hits all alike
                    start = time.perf_counter()
                    for thresholds, rows, groups in inputs:
                        search(thresholds, rows, groups)
                    times[name].append(time.perf_counter() - start)
            medians = {name: statistics.median(values) for name, values in times.items()}
            cells = [f"{medians[name] * 1e3:.0f} ms ({medians[name] / medians['searchsorted']:.2f})"
                     for name in SEARCHES]
            print(f"| {method} {bits} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
