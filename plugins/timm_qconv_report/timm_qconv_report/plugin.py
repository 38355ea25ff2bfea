"""The report plugin: hooks in, files out."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from timm_qconv.plugin_api import atomic_write, hookimpl

from .files import encode_records
from .plots import errors_png, have_matplotlib, histograms_png
from .process import is_main_process
from .settings import ENABLE_ENV, check_format, resolve_dir, resolve_enabled, resolve_format
from .snapshot import LayerSnapshot, from_bit_quantizer, from_model

RECORD_EVENTS = ("on_epoch_end", "on_train_end")


class ReportPlugin:
    """Records each quantized layer's relative error and distinct levels; plots them when a run ends.

    It acts only when enabled: an instance you create is on unless ``enabled=False``; the one the
    installed package registers is on only with ``TIMM_QCONV_REPORT=1``, so installing it writes
    nothing and costs nothing. The first file written to a directory, and every set of plots, is
    announced on stderr with its path. A record (one row per layer) is taken at every ``on_epoch_end``
    and ``on_train_end`` training
    event and after every BitQuantizer pass; ``on_train_begin`` starts over. The records file is
    rewritten after each. The plots are drawn at ``on_train_end`` (from the model, else from the
    last BitQuantizer pass), or after a BitQuantizer pass outside training. Only the main process
    does any of this.

    Args:
        out_dir: where the files go; ``None``: ``$TIMM_QCONV_REPORT_DIR``, else ``./timm-qconv-report``.
        fmt: ``"csv"`` or ``"json"``; ``None``: ``$TIMM_QCONV_REPORT_FORMAT``, else ``"csv"``.
        plots: draw the PNG plots (when matplotlib is installed).
        enabled: ``True`` (the default) or ``False``; ``None``: ``$TIMM_QCONV_REPORT``, read at each event.
    """

    def __init__(self, out_dir: str | os.PathLike | None = None, fmt: str | None = None, plots: bool = True,
                 enabled: bool | None = True) -> None:
        if enabled is not None and not isinstance(enabled, bool):
            raise TypeError(f"enabled={enabled!r} must be True, False or None (None: ${ENABLE_ENV})")
        self.enabled = enabled
        self.out_dir = out_dir
        self.fmt = None if fmt is None else check_format(fmt)
        self.plots = plots
        self.records: list[dict[str, Any]] = []
        self._epoch: Any = None
        self._step: Any = None
        self._training = False
        self._last_pass: list[LayerSnapshot] = []
        self._announced: set[Path] = set()

    @property
    def directory(self) -> Path:
        return resolve_dir(self.out_dir)

    @property
    def active(self) -> bool:
        """Whether the plugin acts now (see ``enabled``)."""
        return resolve_enabled(self.enabled)

    @hookimpl
    def training_event(self, event: str, state: Any, payload: dict[str, Any]) -> None:
        if not self.active or not is_main_process(state, payload):
            return
        self._epoch = getattr(state, "epoch", self._epoch)
        self._step = getattr(state, "global_step", getattr(state, "step", self._step))
        if event == "on_train_begin":
            self.records, self._last_pass, self._training = [], [], True
        elif event in RECORD_EVENTS:
            model = (payload or {}).get("model")
            snapshots = from_model(model) if model is not None else []
            self._record(event, snapshots)
            if event == "on_train_end":
                self._training = False
                self._plot(snapshots or self._last_pass)

    @hookimpl
    def after_bit_quantizer(self, quantizer: Any) -> None:
        if not self.active or not is_main_process():
            return
        self._last_pass = from_bit_quantizer(quantizer)
        self._record("bit_quantizer", self._last_pass)
        if not self._training:
            self._plot(self._last_pass)

    def _record(self, event: str, snapshots: list[LayerSnapshot]) -> None:
        if not snapshots:
            return
        self.records += [
            {"event": event, "epoch": self._epoch, "step": self._step, "layer": s.name, "n_bits": s.n_bits,
             "rel_error": s.rel_error, "n_levels": s.n_levels}
            for s in snapshots
        ]
        fmt = resolve_format(self.fmt)
        path = self.directory / f"records.{fmt}"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, encode_records(self.records, fmt))
        if path not in self._announced:
            self._announced.add(path)
            _say(f"records in {path.resolve()}, rewritten after every epoch and BitQuantizer pass")

    def _plot(self, snapshots: list[LayerSnapshot]) -> None:
        if not (self.plots and snapshots and have_matplotlib()):
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.directory / "histograms.png", histograms_png(snapshots))
        atomic_write(self.directory / "errors.png", errors_png(snapshots))
        _say(f"plots in {self.directory.resolve()}: histograms.png, errors.png")


def _say(message: str) -> None:
    print(f"timm_qconv_report: {message}", file=sys.stderr)
