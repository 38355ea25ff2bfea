"""PNG plots of a set of layer snapshots. matplotlib is optional (extra ``plot``): without it there are no plots.

Figures are built with matplotlib's object API (``Figure``), not ``pyplot``, so drawing here
never changes the backend or the figures of the program that runs the training.
"""
from __future__ import annotations

import importlib.util
import io
import math
from typing import Any, Sequence

from .snapshot import LayerSnapshot


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def histograms_png(snapshots: Sequence[LayerSnapshot], columns: int = 4) -> bytes:
    """One panel per layer: the histogram of its first channel group's weights, with that group's
    levels as vertical lines (each group has its own levels; all of them at once would hide the
    fit)."""
    from matplotlib.figure import Figure

    columns = min(columns, len(snapshots))
    rows = math.ceil(len(snapshots) / columns)
    fig = Figure(figsize=(4 * columns, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax, snap in zip(axes, snapshots):
        ax.hist(snap.weight_sample.numpy(), bins=80, color="0.65")
        ax.vlines(snap.group_levels.numpy(), 0, 1, transform=ax.get_xaxis_transform(), colors="C3", linewidths=1.0)
        ax.set_title(f"{snap.name}: group 1 of {snap.n_groups}, {snap.n_bits}-bit, "
                     f"{snap.group_levels.numel()} levels", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes[len(snapshots):]:
        ax.set_visible(False)
    return _png(fig)


def errors_png(snapshots: Sequence[LayerSnapshot]) -> bytes:
    """Relative quantization error of each layer, in model order (log scale: errors differ by decades across bits)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 0.25 * len(snapshots)), 4), layout="constrained")
    ax = fig.subplots()
    errors = [s.rel_error for s in snapshots]
    ax.plot(range(len(snapshots)), errors, "o", color="C0")
    ax.set_xticks(range(len(snapshots)), [s.name for s in snapshots], rotation=90, fontsize=6)
    ax.set_ylabel("relative error  sum((q-w)^2) / sum(w^2)")
    if all(e > 0 for e in errors):
        ax.set_yscale("log")
    return _png(fig)
