"""Quantized weights kept for the backward as their codes, not as themselves.

A convolution or linear layer keeps its weight from the forward to the backward, where the
input's gradient needs it. In quantization-aware training that weight is the quantized one, a
float tensor as large as the layer's weight made fresh by every forward: a training step kept a
second copy of every quantized weight from its forward to its backward (85 MB for resnet34's 21 M
conv weights, most of QAT's extra memory). Its codes (one byte per weight) are kept for the
levels' gradient anyway, and the weight is one table read away from them.

So a quantizer's training forward tags the weight it returns with a :class:`CodedWeight` (its
codes and levels), and a quantized layer runs its convolution under
:func:`saved_as_codes`: PyTorch's saved-tensor hooks
(:class:`torch.autograd.graph.saved_tensors_hooks`) keep the tag in the weight's place, and the
backward decodes it (:func:`timm_qconv._kernels.decode_codes`: one more pass over the weights,
against the float weight's memory). Autograd gives the decoded tensor the weight's place in the
graph, so a backward that builds a graph (``create_graph=True``) differentiates through it as before.

The hooks stand aside where other saved-tensor hooks are in force (non-reentrant checkpointing,
``save_on_cpu``: only the innermost hooks apply, and those have their own plan for every saved
tensor), where PyTorch has disabled them, and in traced code.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from ._kernels import decode_codes

_TAG = "_timm_qconv_coded"


class CodedWeight:
    """A quantized weight as its codes: ``table[groups[c], codes[c, k]]``, shaped and typed as ``like``.

    The ``(G, L)`` table is copied: it may be a parameter (``linear``'s levels), which an in-place
    edit before the backward would otherwise change under the codes, unseen by autograd's checks.
    """

    __slots__ = ("codes", "table", "groups", "shape", "dtype", "__weakref__")

    def __init__(self, codes: Tensor, table: Tensor, groups: Tensor, like: Tensor):
        self.codes, self.table, self.groups = codes, table.detach().clone(), groups
        self.shape, self.dtype = like.shape, like.dtype

    def value(self) -> Tensor:
        """The weight, bit for bit."""
        return decode_codes(self.table, self.groups, self.codes).view(self.shape).to(self.dtype)


def tag(weight: Tensor, coded: CodedWeight) -> CodedWeight | None:
    """Mark ``weight`` as decodable from ``coded``, for as long as ``weight`` lives; only a
    contiguous weight at the start of its storage, the layout :meth:`CodedWeight.value` rebuilds
    (``None`` for others, which the graph keeps as they are, and in traced code, where the hooks
    stand aside)."""
    if torch.compiler.is_compiling() or not weight.is_contiguous() or weight.storage_offset() != 0:
        return None
    setattr(weight, _TAG, coded)
    return coded


class _Saved:
    """What the graph keeps in place of a view of a tagged weight."""

    __slots__ = ("coded", "size", "stride", "offset")

    def __init__(self, coded: CodedWeight, view: Tensor):
        self.coded, self.size, self.stride, self.offset = coded, view.shape, view.stride(), view.storage_offset()


def _unpack(saved: Any) -> Any:
    if isinstance(saved, _Saved):
        return saved.coded.value().as_strided(saved.size, saved.stride, saved.offset)
    return saved


def _hooks_free() -> bool:
    """Whether saved-tensor hooks of ours would be the only ones in force, and allowed."""
    autograd = torch._C._autograd
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    enabled = getattr(autograd, "_saved_tensors_hooks_is_enabled", None)
    return top is not None and enabled is not None and enabled() and top(False) is None


def saved_as_codes(weight: Tensor) -> contextlib.AbstractContextManager:
    """A ``with`` block in which autograd keeps a tagged ``weight`` (or any view of it) as its
    codes; a no-op for other weights, without grad, in traced code, under other saved-tensor
    hooks or where PyTorch has disabled them, and for storage without an address (meta tensors)."""
    coded = getattr(weight, _TAG, None)
    if coded is None or not torch.is_grad_enabled() or torch.compiler.is_compiling() or not _hooks_free():
        return contextlib.nullcontext()
    storage, dtype, device = weight.untyped_storage().data_ptr(), weight.dtype, weight.device
    if storage == 0:  # every meta tensor has address 0: nothing would tell the weight apart
        return contextlib.nullcontext()

    def pack(tensor: Tensor) -> Any:
        if tensor.dtype == dtype and tensor.device == device and tensor.untyped_storage().data_ptr() == storage:
            return _Saved(coded, tensor)
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
