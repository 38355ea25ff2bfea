"""The :class:`Quantizer` base class: the per-layer module that maps a float weight to few-bit levels.

A quantizer owns the learnable state of one method for one layer (a basis, levels, a scale...).
It splits the output channels into groups; each group has at most ``2**n_bits`` levels. Subclasses
implement :meth:`levels` and, where the nearest-level rule does not apply, :meth:`encode`.

Contract used by the layers, the post-training fit and export:

* ``forward(weight)`` returns the quantized weight, differentiable with respect to the quantizer's
  parameters but not the weight (rounding has zero derivative); ``forward(weight, ste=True)`` also
  passes the gradient straight through to the weight, which is what the layers use.
* ``encode(rows)`` returns integer codes and ``levels()[group, code]`` is the quantized value, so
  ``decode(encode(rows))`` equals ``forward`` in eval mode bit for bit.
* ``fit_(stats, n_iter)`` fits the state to a layer's weights after training. The default
  minimises the hash loss with Adam; methods with a closed-form step override it.
"""
from __future__ import annotations

import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._groups import SortedGroups, as_rows, group_index, midpoints, row_chunks
from .._kernels import lookup_codes, scale_grad, straight_through, threshold_codes
from .._saved_codes import CodedWeight, tag
from .._weight_cache import module_tensors
from ..config import QuantConfig


class Quantizer(nn.Module):
    """Base class of all quantization methods.

    Args:
        weight: the layer's float weight, first dimension = output channels. Used to size the
            groups and to initialise the levels from the weights' own distribution.
        config: the method's options.
        stats: the weight already sorted per group, when the caller has it (saves a sort).
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type[QuantConfig]] = QuantConfig
    #: True when every weight goes to its nearest level (the thresholds are the levels' midpoints).
    nearest: ClassVar[bool] = True
    #: True when a weight's code is the number of :meth:`thresholds` below it (nearest methods and
    #: ``linear``); such methods share the fused lookup and the hash loss from the forward.
    thresholded: ClassVar[bool] = True

    def __init__(self, weight: Tensor, config: QuantConfig, stats: SortedGroups | None = None) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"config={config!r} must be a {self.config_class.__name__} for method {self.name!r}")
        self.config = config
        n_channels = weight.shape[0]
        self.n_groups = min(config.n_functions, n_channels)
        # Derivable from the shape, so not saved in the state dict.
        self.register_buffer("group_index", group_index(n_channels, self.n_groups, weight.device), persistent=False)
        self.last_lookup = LastLookup()

    def weight_stats(self, weight: Tensor, stats: SortedGroups | None) -> SortedGroups:
        """``stats`` if given, else the weight sorted per group (for initialising from the weights)."""
        return stats if stats is not None else SortedGroups(as_rows(weight), self.n_groups)

    # ----------------------------------------------------------------- what subclasses implement
    def levels(self) -> Tensor:
        """Per-group level table ``(G, L)``: code ``c`` of group ``g`` means ``levels()[g, c]``.

        Nearest-level methods return each row sorted ascending.
        """
        raise NotImplementedError

    @classmethod
    def batched_levels(cls, quantizers: list["Quantizer"]) -> Tensor:
        """The :meth:`levels` of several quantizers of this class and bit width, stacked ``(sum G, L)``.

        Quantization-aware training with the compiled kernels calls this once per step for all
        of a model's layers; override it where one call can compute them all at once.
        """
        return torch.cat([q.levels() for q in quantizers])

    def thresholds(self) -> Tensor:
        """Per-group decision thresholds ``(G, L-1)``, ascending, of thresholded methods: a weight's
        code is the number of thresholds below it. Nearest-level methods: the levels' midpoints."""
        return midpoints(self.levels())

    def observe(self, rows: Tensor) -> None:
        """Read what the method needs from the ``(C, K)`` weights at every training forward (default: nothing)."""

    def encode(self, rows: Tensor) -> Tensor:
        """Integer code of every weight of the ``(C, K)`` matrix ``rows`` -> ``(C, K)`` int64."""
        return threshold_codes(self.thresholds().detach(), rows, self.group_index).long()

    def encode_uint8(self, rows: Tensor, chunk_numel: int = 1 << 18) -> Tensor:
        """:meth:`encode` as uint8 (at most 256 levels: 8 bits), a few rows at a time for
        thresholded methods: never a (C, K) int64 or float temporary, which is what bounds
        post-training quantization's memory on large layers."""
        if not self.thresholded:
            return self.encode(rows).to(torch.uint8)
        thresholds = self.thresholds().detach()
        codes = torch.empty(rows.shape, dtype=torch.uint8, device=rows.device)
        for part in row_chunks(*rows.shape, chunk_numel):
            codes[part] = threshold_codes(thresholds, rows[part], self.group_index[part])
        return codes

    def _lookup(self, rows: Tensor, levels: Tensor | None = None,
                **kwargs: Any) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """:func:`~timm_qconv._kernels.lookup_codes` with this quantizer's levels (or ``levels``,
        their value already computed) and thresholds."""
        thresholds = None if self.nearest else self.thresholds().detach()
        levels = self.levels() if levels is None else levels
        return lookup_codes(levels, rows, thresholds, groups=self.group_index, **kwargs)

    # ----------------------------------------------------------------- shared machinery
    def decode(self, codes: Tensor, channels: slice = slice(None)) -> Tensor:
        """Quantized ``(C, K)`` float32 values of ``codes`` (differentiable in the levels); with
        ``channels``, ``codes`` are those of that slice of the output channels only."""
        return self.levels()[self.group_index[channels]].gather(1, codes)

    def quantize_rows(self, rows: Tensor) -> Tensor:
        """Quantize a ``(C, K)`` float32 matrix; gradients flow to the quantizer's parameters."""
        if self.training:
            self.observe(rows)
        if not self.thresholded:
            return self.decode(self.encode(rows))
        return self._lookup(rows)[0]

    def forward(self, weight: Tensor, ste: bool = False) -> Tensor:
        """The quantized weight, same shape and dtype.

        Args:
            weight: the float weight (first dimension = output channels).
            ste: let the gradient reach ``weight`` straight through the rounding (the layers'
                ``"ste"`` mode); otherwise only the quantizer's parameters get gradients.
        """
        rows = as_rows(weight if ste else weight.detach()).float()
        if not ste:
            q = self.quantize_rows(rows)
        elif self.thresholded:  # one fused op, no copy of the gradient
            if self.training:
                self.observe(rows)
            levels = self.levels()
            q, codes, error = self._lookup(rows, levels, ste=True, grad_scale=self.grad_scale(rows),
                                           with_error=self.last_lookup.wanted)
            out = q.view(weight.shape).to(weight.dtype)
            if not out.requires_grad:
                return out
            alive: Any = out
            if codes is not None:  # the layers' graphs keep the codes, not out (see _saved_codes)
                alive = tag(out, CodedWeight(codes, levels, self.group_index, out)) or out
            if error is not None:
                self.last_lookup.keep(self, weight, error, alive)
            return out
        else:
            q = straight_through(scale_grad(self.quantize_rows(rows.detach()), self.grad_scale(rows)), rows)
        return q.view(weight.shape).to(weight.dtype)

    def squared_error_of_last_forward(self, weight: Tensor) -> Tensor | None:
        """``sum((q - weight)**2)`` as this step's training forward computed it with the quantized
        weight: differentiable in the levels only, as the hash loss with weights detached. ``None``
        when no such forward is alive (its backward ran, or the weight or the levels changed
        since), and the first time it is asked for: from then on the forward computes it."""
        return self.last_lookup.squared_error(self, weight)

    def squared_error(self, weight: Tensor) -> Tensor:
        """``sum((q - weight)**2)`` at the current levels, differentiable in the levels only (the
        hash loss with the weights detached): this step's forward's (see
        :meth:`squared_error_of_last_forward`), else from one fused lookup that computes the error
        without keeping its quantized weight, whose backward is the lookup's own."""
        reused = self.squared_error_of_last_forward(weight)
        if reused is not None:
            return reused
        rows = as_rows(weight.detach()).float()
        if not self.thresholded:
            return (self.quantize_rows(rows) - rows).pow(2).sum()
        if self.training:
            self.observe(rows)
        error = self._lookup(rows, with_error=True)[2]
        if error is None:  # where no gradient is wanted, or the compiled kernel ran
            error = (self._lookup(rows)[0] - rows).pow(2).sum()
        return error

    def grad_scale(self, rows: Tensor) -> float:
        """Factor on the task loss's gradient to the quantizer: ``1 / sqrt(weights per group)``.

        A level is shared by thousands of weights, so its true gradient is a sum over all of them
        and would move it far faster than any weight; LSQ (Esser et al., ICLR 2020) scales it down
        the same way. The hash loss is a mean and needs no scaling.
        """
        return (self.n_groups / rows.numel()) ** 0.5

    @torch.no_grad()
    def fit_(self, stats: SortedGroups, n_iter: int, rows: Tensor | None = None) -> None:
        """Fit this quantizer to a layer's weights after training (in place).

        The default runs ``n_iter`` Adam steps on the mean squared quantization error; methods with
        a closed-form update (hash, kmeans, log, linear) override this with prefix-sum iterations.

        Args:
            stats: the layer's weights sorted per group (see :class:`SortedGroups`).
            n_iter: iterations.
            rows: the ``(C, K)`` weights themselves (the default fit needs them).
        """
        if rows is None:
            raise ValueError(f"method {self.name!r} fits by gradient descent and needs rows=")
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return
        optimizer = torch.optim.Adam(params, lr=1e-2)
        target = rows.detach().float()
        for _ in range(n_iter):
            with torch.enable_grad():
                optimizer.zero_grad()
                loss = (self.quantize_rows(target) - target).pow(2).mean()
                loss.backward()
            optimizer.step()

    # ----------------------------------------------------------------- calibration with data
    def free_level_design(self, table: Tensor) -> Tensor:
        """The :meth:`level_design` of methods whose ``(G, L)`` level ``table`` is its own parameters."""
        return torch.eye(table.shape[1], device=table.device).expand(self.n_groups, -1, -1)

    def level_design(self) -> Tensor | None:
        """``(G, L, P)`` float32 matrix ``D`` with ``levels()[g] == D[g] @ params[g]``, in code order.

        Calibration (:mod:`timm_qconv.calibrate`) refits the ``P`` parameters of each group by least
        squares on the layer's output error, which keeps the levels in the method's family. ``None``
        (the default) means the levels are not linear in the parameters: calibration then keeps the
        levels and only re-assigns the codes.
        """
        return None

    def calibration_starts(self) -> list["Quantizer"]:
        """Other starting points for calibration's alternation of code assignment and level refit,
        which can settle near where it starts: copies with other levels in the method's family.
        Calibration runs from this quantizer and from each of these, keeping what gives the lowest
        output error. Default: none."""
        return []

    def set_level_params_(self, params: Tensor) -> Tensor:
        """Write the parameters ``(G, P)`` solved for :meth:`level_design`'s ``D`` (in place).

        Returns ``(G, L)`` int64: the new code of each old code (levels may change order).
        """
        raise NotImplementedError(f"method {self.name!r} has no level_design")

    def extra_repr(self) -> str:
        return f"n_bits={self.config.n_bits}, groups={self.n_groups}"


class LastLookup:
    """The squared rounding error that a quantizer's last training forward computed, for the hash loss.

    The forward computes it (one pass over the weights, and none in the backward, which scatters it
    with the task gradient) only once the hash loss has asked for it (``wanted``), so that training
    without the hash loss does not pay for it. It is used only while that forward's quantized
    weight is alive (``alive``: the weight, or its codes where a layer's graph keeps those in its
    place; autograd keeps either until the backward) and the weight and the quantizer's
    parameters keep the versions they had then. Copies and pickles of a quantizer start without it.
    """

    __slots__ = ("wanted", "error", "alive", "weight", "versions")

    def __init__(self) -> None:
        self.wanted = False
        self.clear()

    def clear(self) -> None:
        self.error = self.alive = self.weight = self.versions = None

    @staticmethod
    def _versions(quantizer: nn.Module, weight: Tensor) -> tuple[int, ...]:
        return (weight._version, *(p._version for p in module_tensors(quantizer, buffers=False)))

    def keep(self, quantizer: nn.Module, weight: Tensor, error: Tensor, alive: Any) -> None:
        self.error, self.weight, self.alive = error, weight, weakref.ref(alive)
        self.versions = self._versions(quantizer, weight)

    def squared_error(self, quantizer: nn.Module, weight: Tensor) -> Tensor | None:
        if torch.compiler.is_compiling():  # traced code keeps nothing for later: the loss recomputes
            return None
        self.wanted = True
        if self.error is None or self.weight is not weight or self.versions != self._versions(quantizer, weight):
            return None
        if self.alive() is None or not torch.is_grad_enabled():
            return None
        return self.error

    def __getstate__(self) -> Any:
        return (self.wanted,)  # a weak reference does not pickle; a copy recomputes

    def __setstate__(self, state: Any) -> None:
        self.wanted = bool(state[0]) if state else False
        self.clear()
