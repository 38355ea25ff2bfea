"""Post-training fit of large timm models: time and peak memory, and the cost of installed plugins.

For each model (random weights, ``pretrained=False``), in its own process: the time of
``BitQuantizer(model, 32, 4).train_hash_functions(50)`` over every Conv2d and Linear against one
``torch.sort`` plus one ``torch.bucketize`` of the same weights (measured in that process), and
the peak resident memory beyond the model during the fit, during ``save_quantized`` and during
``load_quantized`` (kernel high-water mark reset before each, ``/proc/self/clear_refs``; Linux),
against the largest layer's weight.

``--plugins`` also fits resnet34 alternately in processes with every installed plugin loaded
(``TIMM_QCONV_PLUGINS`` unset) and with none (``TIMM_QCONV_PLUGINS=``), and prints the ratio of
the median fit times.

    python benchmarks/ptq_scale.py [--models vit_large_patch16_224 convnext_large] [--plugins]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from _memory import reset_peak, vm_kib


def child_fit(model_name: str, n_bits: int) -> dict:
    import timm
    import torch
    from ptq_speed import baseline_seconds, weights

    from timm_qconv import BitQuantizer, load_quantized, save_quantized

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    ws = weights(model)
    largest = max(w.numel() * w.element_size() for w in ws)
    base = baseline_seconds(ws, n_bits)
    result = {"model": model_name, "weights_m": sum(w.numel() for w in ws) / 1e6, "layers": len(ws),
              "largest_mib": largest / 2**20, "sort_bucketize_s": base}
    before = reset_peak()
    start = time.perf_counter()
    bq = BitQuantizer(model, 32, n_bits, layers=("conv", "linear")).train_hash_functions(50)
    result["fit_s"] = time.perf_counter() - start
    result["fit_extra_mib"] = (vm_kib("VmHWM") - before) / 1024
    with tempfile.TemporaryDirectory() as folder:
        before = reset_peak()
        save_quantized(bq, folder)
        result["save_extra_mib"] = (vm_kib("VmHWM") - before) / 1024
        del bq
        before = reset_peak()
        load_quantized(folder, model)
        result["load_extra_mib"] = (vm_kib("VmHWM") - before) / 1024
    return result


def child_plugins() -> dict:
    import timm
    import torch

    from timm_qconv import BitQuantizer

    torch.manual_seed(0)
    model = timm.create_model("resnet34", pretrained=False)
    BitQuantizer(model, 32, 4, layers=("conv", "linear")).train_hash_functions(5)  # warm-up: imports, plugins
    start = time.perf_counter()
    BitQuantizer(model, 32, 4, layers=("conv", "linear")).train_hash_functions(50)
    return {"fit_s": time.perf_counter() - start}


def run_child(args: list[str], env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["vit_large_patch16_224", "convnext_large"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--plugins", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_plugins() if args.child == "plugins" else child_fit(args.child, args.bits)))
        return

    if args.models:
        print("| model | weights | fit | sort + bucketize | ratio | largest layer "
              "| beyond the model: fit | save | load |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in args.models:
        r = run_child(["--child", name, "--bits", str(args.bits)])
        print(f"| {name} | {r['weights_m']:.0f} M | {r['fit_s']:.1f} s | {r['sort_bucketize_s']:.1f} s | "
              f"{r['fit_s'] / r['sort_bucketize_s']:.2f} | {r['largest_mib']:.0f} MiB | {r['fit_extra_mib']:.0f} MiB | "
              f"{r['save_extra_mib']:.0f} MiB | {r['load_extra_mib']:.0f} MiB |", flush=True)
    if args.plugins:
        with_plugins = {k: v for k, v in os.environ.items() if k != "TIMM_QCONV_PLUGINS"}
        without = {**os.environ, "TIMM_QCONV_PLUGINS": ""}
        times = {"all installed plugins": [], "none": []}
        for _ in range(args.repeats):
            times["all installed plugins"].append(run_child(["--child", "plugins"], with_plugins)["fit_s"])
            times["none"].append(run_child(["--child", "plugins"], without)["fit_s"])
        a, b = statistics.median(times["all installed plugins"]), statistics.median(times["none"])
        print(f"resnet34 fit (4 bits, 50 iterations), medians of {args.repeats}: plugins {a:.2f} s, "
              f"none {b:.2f} s, ratio {a / b:.3f}")


if __name__ == "__main__":
    main()
