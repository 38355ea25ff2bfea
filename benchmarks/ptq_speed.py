"""Post-training fit of timm resnet34: speed against one sort + one bucketize, and error against the optimum.

Speed: fitting every Conv2d and Linear at 4 bits, 32 groups, 50 iterations, divided by the time of
one ``torch.sort`` over the same weights plus one ``torch.bucketize`` pass over them, both measured
in this process (medians of --repeats). Target: at most 2.

Quality: relative weight error ``sum((q - w)**2) / sum(w**2)`` over all layers, for ``hash`` and
``kmeans`` at each bit width, against the best known scalar quantizer of each group: exact 1-D
k-means by dynamic programming where affordable (small groups), Lloyd-Max run to convergence
elsewhere. ``--check-exact`` measures how far converged Lloyd-Max stays above the exact optimum on
two 4608-weight groups (exact program: O(L n^2), seconds at this size).

    python benchmarks/ptq_speed.py [--bits 1 2 3 4 5 6 7 8] [--repeats 3] [--check-exact]
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
from torch import nn

from timm_qconv import BitQuantizer
from timm_qconv._groups import SortedGroups, as_rows
from timm_qconv.methods.kmeans import density_init, exact_levels, lloyd, refine_small_groups


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def baseline_seconds(ws: list[torch.Tensor], n_bits: int) -> float:
    """One sort of the weights plus one bucketize pass into 2**n_bits cells."""
    start = time.perf_counter()
    for w in ws:
        torch.sort(w.reshape(-1))
    for w in ws:
        bounds = torch.linspace(float(w.min()), float(w.max()), 2**n_bits + 1)[1:-1]
        torch.bucketize(w.reshape(-1), bounds)
    return time.perf_counter() - start


def optimum(ws: list[torch.Tensor], n_bits: int, groups: int, max_iter: int = 2000) -> float:
    """Relative error of the best known scalar quantizer of every group, over all layers: the exact
    k-means optimum where the dynamic program is affordable (small groups), else Lloyd-Max run to
    convergence from the companded start."""
    err = total = 0.0
    for w in ws:
        rows = as_rows(w).float()
        stats = SortedGroups(rows, min(groups, rows.shape[0]))
        levels, prev = density_init(stats, 2**n_bits), None
        for _ in range(max_iter // 50):
            levels = lloyd(stats, levels, 50)
            e = float(stats.nearest_error(levels).sum())
            if prev is not None and prev - e <= 1e-9 * prev:
                break
            prev = e
        exact = torch.sort(refine_small_groups(stats, levels), 1).values
        err += float(torch.minimum(stats.nearest_error(levels), stats.nearest_error(exact)).sum())
        total += float(rows.double().pow(2).sum())
    return err / total


def check_exact(ws: list[torch.Tensor], n_bits: int, groups: int, size: int = 4608) -> float:
    """Gap between converged Lloyd-Max and the exact optimum on two groups of ``size`` weights: how
    far above exact the reference may be where the exact program is too costly."""
    layer = next(w for w in ws if as_rows(w).numel() // groups == size)
    stats = SortedGroups(as_rows(layer).float(), groups)
    ref = stats.nearest_error(lloyd(stats, density_init(stats, 2**n_bits), 2000))
    exact = [stats.nearest_error(torch.sort(exact_levels(stats.sorted[g], 2**n_bits)).values.expand(groups, -1))[g]
             for g in range(2)]
    return max(float(ref[g]) / float(exact[g]) - 1 for g in range(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4, 5, 6, 7, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check-exact", action="store_true")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = timm.create_model("resnet34", pretrained=False)
    ws = weights(model)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, resnet34: "
          f"{sum(w.numel() for w in ws) / 1e6:.1f} M weights in {len(ws)} layers, 32 groups")

    fit, base = [], []
    for _ in range(args.repeats):
        base.append(baseline_seconds(ws, 4))
        start = time.perf_counter()
        BitQuantizer(model, 32, 4, layers=("conv", "linear"), method="hash").train_hash_functions(n_iter=50)
        fit.append(time.perf_counter() - start)
    print(f"speed (4 bits, 50 iterations, hash): fit {statistics.median(fit):.2f} s, "
          f"sort + bucketize {statistics.median(base):.2f} s, "
          f"ratio {statistics.median(fit) / statistics.median(base):.2f} (target <= 2)")

    print(f"{'bits':>4} {'optimum':>9} {'hash':>9} {'hash/opt':>9} {'kmeans':>9} {'kmeans/opt':>10}")
    for n_bits in args.bits:
        opt = optimum(ws, n_bits, 32)
        row = [f"{n_bits:>4}", f"{opt:9.5f}"]
        for method in ("hash", "kmeans"):
            bq = BitQuantizer(model, 32, n_bits, layers=("conv", "linear"), method=method).train_hash_functions(50)
            err = bq.report().rel_error
            row += [f"{err:9.5f}", f"{err / opt:9.4f}" + (" " if method == "kmeans" else "")]
        if args.check_exact and n_bits <= 4:  # the exact program costs O(L n^2)
            row.append(f"  Lloyd-Max above exact on 4608-weight groups: +{check_exact(ws, n_bits, 32):.1%}")
        print(" ".join(row), flush=True)


if __name__ == "__main__":
    main()
