"""Bit packing: ``n``-bit codes (1..8) stored densely in a ``uint8`` byte stream.

Code ``i`` occupies bits ``i * n_bits .. (i + 1) * n_bits - 1`` of the stream, least significant
bit first, and bit ``b`` of the stream is bit ``b % 8`` of byte ``b // 8``. The last byte is padded
with zero bits, so ``N`` codes take ``ceil(N * n_bits / 8)`` bytes. Both directions are a handful of
vectorized tensor ops (no Python loop over elements), on chunks of :data:`CHUNK` codes: the
intermediate is one byte per bit of the chunk.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._errors import check_int
from .config import MAX_BITS

CHUNK = 1 << 18
"""Codes packed or unpacked per step (a multiple of 8, so that every chunk fills whole bytes): the
one-byte-per-bit intermediate stays at most ``8 * CHUNK`` bytes, whatever the layer's size."""


def packed_size(n_codes: int, n_bits: int) -> int:
    """Bytes that ``n_codes`` codes of ``n_bits`` bits take once packed."""
    return (n_codes * n_bits + 7) // 8


def _shifts(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, dtype=torch.uint8, device=device)


def pack_bits(codes: Tensor, n_bits: int) -> Tensor:
    """Pack integer ``codes`` (any shape, values in ``[0, 2**n_bits)``) into a flat ``uint8`` tensor.

    Args:
        codes: integer tensor; flattened in row-major order.
        n_bits: bits per code, 1..8.
    Returns:
        ``packed_size(codes.numel(), n_bits)`` bytes, on the codes' device.
    """
    check_int("n_bits", n_bits, 1, MAX_BITS)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes have dtype {codes.dtype}; expected an integer tensor")
    flat = codes.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 2**n_bits):
        raise ValueError(
            f"codes range over {int(flat.min())}..{int(flat.max())}, which does not fit n_bits={n_bits}; "
            f"expected values in 0..{2**n_bits - 1}"
        )
    flat = flat.to(torch.uint8)
    out = torch.empty(packed_size(flat.numel(), n_bits), dtype=torch.uint8, device=flat.device)
    weights = torch.ones((), dtype=torch.uint8, device=flat.device) << _shifts(8, flat.device)
    for start in range(0, flat.numel(), CHUNK):  # CHUNK codes fill whole bytes: chunks pack independently
        bits = (flat[start:start + CHUNK, None] >> _shifts(n_bits, flat.device)) & 1  # (n, n_bits), LSB first
        stream = bits.reshape(-1)
        pad = -stream.numel() % 8
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        # Each bit lands in its own bit position, so the sum is an OR and never exceeds 255.
        first = start * n_bits // 8
        out[first:first + stream.numel() // 8] = (stream.view(-1, 8) * weights).sum(1, dtype=torch.uint8)
    return out


def unpack_bits(packed: Tensor, n_bits: int, n_codes: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``n_codes`` codes of ``packed`` as a flat ``uint8`` tensor.

    Raises ``ValueError`` when ``packed`` does not hold exactly ``packed_size(n_codes, n_bits)`` bytes.
    """
    check_int("n_bits", n_bits, 1, MAX_BITS)
    check_int("n_codes", n_codes, 0)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed has dtype {packed.dtype} and {packed.dim()} dimension(s); expected 1-D uint8")
    expected = packed_size(n_codes, n_bits)
    if packed.numel() != expected:
        raise ValueError(
            f"packed holds {packed.numel()} bytes; {n_codes} codes of {n_bits} bits need exactly {expected}"
        )
    out = torch.empty(n_codes, dtype=torch.uint8, device=packed.device)
    weights = torch.ones((), dtype=torch.uint8, device=packed.device) << _shifts(n_bits, packed.device)
    for start in range(0, n_codes, CHUNK):
        n = min(CHUNK, n_codes - start)
        first = start * n_bits // 8
        chunk = packed[first:first + packed_size(n, n_bits)]
        bits = (chunk[:, None] >> _shifts(8, packed.device)) & 1  # (bytes, 8), LSB first
        bits = bits.reshape(-1)[: n * n_bits].view(n, n_bits)
        out[start:start + n] = (bits * weights).sum(1, dtype=torch.uint8)
    return out
