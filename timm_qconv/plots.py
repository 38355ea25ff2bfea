"""PNG charts of a quantization experiment: accuracy per epoch, accuracy against bits, levels over weights.

Needs matplotlib (``pip install "timm_qconv[plot]"``); it is imported when a chart is drawn, so
the rest of timm_qconv works without it. Every chart is rendered in memory and written with
:func:`~timm_qconv.atomic.atomic_write`, so a reader never sees half a PNG.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .atomic import atomic_write


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError('timm_qconv.plots needs matplotlib: pip install "timm_qconv[plot]"') from error
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    fig.clear()
    _pyplot().close(fig)
    return atomic_write(path, buffer.getvalue())


def plot_accuracy_per_epoch(epochs: Iterable[Mapping[str, Any]], path: str | os.PathLike,
                            reference: Mapping[str, float] | None = None) -> Path:
    """One line per training run (``run`` key) of test accuracy (``accuracy``, 0-1) against ``epoch``.

    Args:
        epochs: rows with ``run``, ``epoch`` and ``accuracy``.
        path: the PNG to write.
        reference: runs without epochs (post-training ones), drawn as dashed horizontal lines.
    """
    plt = _pyplot()
    runs: dict[str, list[tuple[float, float]]] = {}
    for row in epochs:
        runs.setdefault(str(row["run"]), []).append((float(row["epoch"]), 100 * float(row["accuracy"])))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, points in runs.items():
        points.sort()
        ax.plot([e for e, _ in points], [a for _, a in points], marker="o", markersize=3, label=name)
    lowest = min((a for points in runs.values() for _, a in points), default=0.0)
    for i, (name, accuracy) in enumerate((reference or {}).items()):
        shown = 100 * accuracy >= lowest - 5  # far below the curves it would squash them: say it in the legend
        ax.axhline(100 * accuracy if shown else float("nan"), linestyle="--", linewidth=1, color=f"C{len(runs) + i}",
                   label=f"{name} {100 * accuracy:.1f}%" + ("" if shown else " (below the chart)"))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_vs_bits(final: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Accuracy against bits per weight, one line per kind of run (``ptq``, ``qat``), float as a line.

    Args:
        final: ``{run name: {"kind": ..., "n_bits": int or None, "accuracy": float}}``.
        path: the PNG to write.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    kinds: dict[str, list[tuple[int, float]]] = {}
    for row in final.values():
        if row.get("n_bits") is None:
            ax.axhline(100 * row["accuracy"], color="black", linewidth=1, label="float")
        else:
            kinds.setdefault(str(row["kind"]), []).append((int(row["n_bits"]), 100 * float(row["accuracy"])))
    for kind, points in sorted(kinds.items()):
        points.sort()
        ax.plot([b for b, _ in points], [a for _, a in points], marker="o", label=kind)
    bits = sorted({b for points in kinds.values() for b, _ in points})
    ax.set_xticks(bits)
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_levels_over_weights(layers: Sequence[tuple[str, Tensor, Tensor]], path: str | os.PathLike,
                             title: str = "") -> Path:
    """For each layer, a histogram of one channel group's float weights with that group's levels on top.

    Args:
        layers: ``(name, weights, levels)``: the group's float weights (any shape) and its levels (1-D).
        path: the PNG to write.
        title: a title over the grid (e.g. the run's name).
    """
    plt = _pyplot()
    n = max(1, len(layers))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (name, weights, levels) in zip(axes.flat, layers):
        values = weights.detach().float().flatten().cpu()
        ax.hist(values.numpy(), bins=min(80, max(10, values.numel() // 20)), color="tab:blue", alpha=0.7)
        for level in torch.unique(levels.detach().float().cpu()).tolist():
            ax.axvline(level, color="tab:red", linewidth=1)
        ax.set_title(f"{name} ({torch.unique(levels).numel()} levels)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
