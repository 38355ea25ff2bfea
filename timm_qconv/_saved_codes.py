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
backward decodes it (:func:`timm_qconv._kernels.codes_decoder`, prepared in the forward: one
more pass over the weights, against the float weight's memory). Autograd gives the decoded
tensor the weight's place in the graph, so a backward that builds a graph
(``create_graph=True``) differentiates through it as before.
Under autocast the layers cast the weight themselves before the convolution
(:func:`autocast_weight`), so that the half-precision copy autocast would make is kept as codes too.

The hooks stand aside where other saved-tensor hooks are in force (non-reentrant checkpointing,
``save_on_cpu``: only the innermost hooks apply, and those have their own plan for every saved
tensor), where PyTorch has disabled them, and in traced code.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from ._kernels import codes_decoder

_TAG = "_timm_qconv_coded"


class CodedWeight:
    """A quantized weight as its codes: ``table[groups[c], codes[c, k]]``, shaped and typed as ``like``.

    The ``(G, L)`` table is copied: it may be a parameter (``linear``'s levels), which an in-place
    edit before the backward would otherwise change under the codes, unseen by autograd's checks.
    """

    __slots__ = ("decode", "shape", "dtype", "__weakref__")

    def __init__(self, codes: Tensor, table: Tensor, groups: Tensor, like: Tensor):
        # prepared here, in the forward: the backward's call then does little but the pass over the weights
        self.decode = codes_decoder(table.detach().clone(), groups, codes)
        self.shape, self.dtype = like.shape, like.dtype

    def value(self) -> Tensor:
        """The weight, bit for bit."""
        value = self.decode().view(self.shape)
        return value if value.dtype == self.dtype else value.to(self.dtype)


def tag(weight: Tensor, coded: CodedWeight) -> CodedWeight | None:
    """Mark ``weight`` as decodable from ``coded``, for as long as ``weight`` lives; only a
    contiguous weight at the start of its storage, the layout :meth:`CodedWeight.value` rebuilds
    (``None`` for others, which the graph keeps as they are, and in traced code, where the hooks
    stand aside)."""
    if torch.compiler.is_compiling() or not weight.is_contiguous() or weight.storage_offset() != 0:
        return None
    setattr(weight, _TAG, coded)
    return coded


#: Devices whose autocast runs convolutions and linear layers in its lower precision.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_weight(weight: Tensor) -> Tensor:
    """A tagged ``weight`` cast, still tagged, to the dtype autocast would cast it to inside a
    convolution or linear layer; else ``weight`` itself.

    Under autocast the convolution would otherwise cast the weight itself and keep that copy for
    the backward, out of the hooks' sight. The cast here is the same operation, so the outputs and
    gradients do not change.
    """
    coded, device = getattr(weight, _TAG, None), weight.device.type
    if (coded is None or device not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device)
            or torch.compiler.is_compiling()):
        return weight
    dtype = torch.get_autocast_dtype(device)
    if weight.dtype != torch.float32 or dtype == torch.float32:  # autocast casts only float32
        return weight
    cast = weight.to(dtype)
    tag(cast, coded)  # the same CodedWeight: the hash loss watches its life
    return cast


class _Saved:
    """What the graph keeps in place of a view of a tagged weight (or of its autocast copy)."""

    __slots__ = ("coded", "dtype", "size", "stride", "offset")

    def __init__(self, coded: CodedWeight, view: Tensor):
        self.coded, self.dtype = coded, view.dtype
        self.size, self.stride, self.offset = view.shape, view.stride(), view.storage_offset()


def _unpack(saved: Any) -> Any:
    if isinstance(saved, _Saved):
        value = saved.coded.value()
        value = value if value.dtype == saved.dtype else value.to(saved.dtype)
        if value.shape == saved.size and value.stride() == saved.stride and not saved.offset:  # the weight itself
            return value
        return value.as_strided(saved.size, saved.stride, saved.offset)
    return saved


def hooks_free() -> bool:
    """Whether saved-tensor hooks of ours would be the only ones in force, and allowed: not so
    inside non-reentrant checkpointing (which also runs the forward again in the backward) or
    ``save_on_cpu``."""
    autograd = torch._C._autograd
    top = getattr(autograd, "_top_saved_tensors_default_hooks", None)
    enabled = getattr(autograd, "_saved_tensors_hooks_is_enabled", None)
    return top is not None and enabled is not None and enabled() and top(False) is None


def saved_as_codes(weight: Tensor) -> contextlib.AbstractContextManager:
    """A ``with`` block in which autograd keeps a tagged ``weight`` (or any view of it) as its
    codes; a no-op for other weights, without grad, in traced code, under other saved-tensor
    hooks or where PyTorch has disabled them, and for storage without an address (meta tensors)."""
    coded = getattr(weight, _TAG, None)
    if coded is None or not torch.is_grad_enabled() or torch.compiler.is_compiling() or not hooks_free():
        return contextlib.nullcontext()
    storage, dtype, device = weight.untyped_storage().data_ptr(), weight.dtype, weight.device
    if storage == 0:  # every meta tensor has address 0: nothing would tell the weight apart
        return contextlib.nullcontext()

    def pack(tensor: Tensor) -> Any:
        if tensor.dtype == dtype and tensor.device == device and tensor.untyped_storage().data_ptr() == storage:
            return _Saved(coded, tensor)
        return tensor

    return torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
