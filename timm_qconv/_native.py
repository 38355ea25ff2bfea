"""CPU kernels of the quantization hot path, compiled by Numba: each weight is read once forward
(its code, quantized value and squared error together) and once backward (the levels' gradient).

Eager PyTorch makes one pass through memory per operation: at 4 bits a layer's nearest-level
lookup was about 30 of them (15 comparisons and their sum, dtype conversions, a gather, a
subtraction, a dot product; a scatter in the backward), which on a 2-core CPU kept a resnet34
training step at 1.26-1.39x the float step. These kernels do the same work in one pass each way,
one row of weights at a time, each row's temporaries in the cache, in as many threads as
PyTorch uses (:func:`_run`).

A code is the number of the row's ascending thresholds strictly below the weight (ties go to
the lower level, NaN to code 0), as :func:`timm_qconv._kernels.threshold_codes` defines it: below
:data:`MIN_BINNED_THRESHOLDS` thresholds by counting comparisons, which vectorise (up to
:data:`MAX_SELECTED_THRESHOLDS`, each comparison also selects the level); from there, by bins
equal in value (:func:`_bin_tables`), where the thresholds crowd such bins by counting up to
:data:`MAX_COUNTED_THRESHOLDS` and above it by bins equal in bit pattern, or where the thresholds
crowd into a bin both ways, by a branchless binary search.

:mod:`timm_qconv._kernels` calls these in training and evaluation forwards of float32 CPU
weights with up to 256 levels, outside ``torch.compile``, when Numba imports. The eager PyTorch
formulation serves the rest, post-training quantization's codes included: Numba's runtime alone
(120-190 MiB) would exceed that memory bound, twice the largest layer beyond the model. Each
kernel compiles on first use (a few seconds) and Numba caches it on disk.
"""
from __future__ import annotations

import functools
import os
import threading
from typing import Any, Callable

import numba
import numpy as np
import torch
from torch import Tensor

#: Below MIN_BINNED_THRESHOLDS thresholds (16 levels) a row's codes are counted comparison by
#: comparison; from there, by bins equal in value where they hold few thresholds each. Rows whose
#: thresholds crowd such bins are counted up to MAX_COUNTED_THRESHOLDS (32 levels), and above it
#: binned by bit pattern, or searched. All of resnet34's conv weights, the whole forward, one
#: thread, AMD Zen 4: at 16 levels counted 25.6-25.9 ms, binned 25.6-30.6; at 32 levels 34 / 28.4
#: (kmeans), but 33.6 / 37.8 by bit pattern (log), which therefore counts there.
MIN_BINNED_THRESHOLDS = 16
MAX_COUNTED_THRESHOLDS = 31
#: Up to this many thresholds (8 levels) the forward finds each weight's level along with its code,
#: one select per threshold, instead of reading it from the table by code afterwards (a gather):
#: all of resnet34's conv weights at 2 / 4 / 8 levels take 6.5 / 8.8 / 14.2 ms instead of 11.3 /
#: 12.4 / 15.2 (at 16 levels the selects cost more than the gather: 23.4 against 19.9 ms).
MAX_SELECTED_THRESHOLDS = 7
#: Up to this many levels the backward sums each level's gradient in its own pass over the row
#: (a masked sum, which vectorises) instead of one pass adding each weight's to its level (which
#: does not): resnet34's conv weights, 2 / 4 levels, 4.0 / 6.0 ms instead of 8.0 / 6.9 (at 8 levels
#: 9.8 against 6.8). For the hash loss's term the forward then also sums ``q - x`` per level
#: (:func:`_level_deviations`), so that this backward need not read the weights again.
MAX_MASKED_LEVELS = 4
#: The bins: this many per threshold, and a weight is compared with at most MAX_BIN_THRESHOLDS
#: thresholds of its bin. Bins are equal in value, or where that crowds more thresholds into one
#: bin (log's, halving towards zero), equal in bit pattern (:func:`_bit_keys`); rows crowded both
#: ways take a branchless binary search (9.3 ms at 256 levels).
BINS_PER_THRESHOLD = 4
MAX_BIN_THRESHOLDS = 4  # _row_codes compares with up to four, one unswitched loop per depth
#: Bit-pattern keys are taken of ``x * LIFT``: exact (a power of two) and it makes subnormal
#: numbers, whose bit patterns grow linearly rather than by octaves, normal.
LIFT = np.float32(2.0**64)
#: The width of one octave of float32 magnitudes in bit-pattern keys (the mantissa's 23 bits).
OCTAVE = 1 << 23
#: Partial sums per level in the backward: consecutive weights of one level would otherwise wait
#: on each other's addition (1-bit layers: 3.0 -> 1.2 ms for 2.4 M weights).
_LANES = 4

_jit = functools.partial(numba.njit, cache=True, nogil=True, boundscheck=False)


@_jit
def _bit_keys(x: np.ndarray, out: np.ndarray, floor: int) -> np.ndarray:
    """A non-decreasing map of float32 ``x`` into ``out`` that spaces values by bit pattern, so that
    every octave of magnitude spans the same width: the magnitude's bits (of ``x * LIFT``) read as
    an integer, with ``x``'s sign. NaN goes with -inf, below every threshold.

    Magnitudes whose bits are below ``floor`` (at least 1, so both zeros) all map to 0, and those
    at or above it start an octave's width (``OCTAVE``) away from 0. With ``floor`` at the smallest
    threshold's, the bins span the octaves the thresholds use, not the hundred or so below them
    as well (log's 63 thresholds at 6 bits use 31 octaves: two in a bin without the floor, one
    with it), and the smallest thresholds of either sign fall in bins of their own."""
    lifted = np.empty(x.shape[0], np.float32)
    for k in range(x.shape[0]):
        v = x[k]
        lifted[k] = -np.inf if v != v else v * LIFT
    bits = lifted.view(np.int32)
    for k in range(x.shape[0]):
        above = np.int64(bits[k] & 0x7FFFFFFF) - floor
        magnitude = np.float32(above + OCTAVE if above >= 0 else 0)  # int -> float32 rounds, monotonically
        out[k] = -magnitude if bits[k] < 0 else magnitude
    return out


@_jit
def _bin_tables(thresholds: np.ndarray) -> tuple:
    """Per row ``g`` of ``thresholds`` (G, T), the tables of its bins: ``by_bits[g]``, whether they
    are equal in bit pattern rather than in value, and then the ``floor[g]`` of :func:`_bit_keys`;
    the first key and bins per unit of key (``low``, ``scale``: a weight's bin is
    ``(key(w) - low) * scale``, clamped); the number of thresholds in
    the bins before each bin (``before``); the thresholds followed by ``MAX_BIN_THRESHOLDS``
    infinities (``padded``); and the most thresholds any bin holds (``depth``: the comparisons a
    weight needs), or 0 where a bin holds more than ``MAX_BIN_THRESHOLDS`` (the bins are not used).

    Exact, not approximate: thresholds take their bins through the same float32 operations as the
    weights, which are monotone, so a threshold in an earlier bin is below the weight and one in a
    later bin is not. Empty tables for ``T < MIN_BINNED_THRESHOLDS``, which count instead, and
    no bins by bit pattern up to ``MAX_COUNTED_THRESHOLDS`` (depth 0: counted too)."""
    n_rows, n_thresholds = thresholds.shape
    if n_thresholds < MIN_BINNED_THRESHOLDS:
        n_rows = 0
    n_bins = BINS_PER_THRESHOLD * (n_thresholds + 1)
    low, scale = np.zeros(n_rows, np.float32), np.zeros(n_rows, np.float32)
    before = np.zeros((n_rows, n_bins), np.int32)
    padded = np.full((n_rows, n_thresholds + MAX_BIN_THRESHOLDS), np.inf, np.float32)
    depth, by_bits = np.zeros(n_rows, np.int32), np.zeros(n_rows, np.bool_)
    floor = np.ones(n_rows, np.int32)
    keys = np.empty(n_thresholds, np.float32)
    per_bin = np.empty(n_bins, np.int32)
    attempts = 1 if n_thresholds <= MAX_COUNTED_THRESHOLDS else 2  # in value; above, by bit pattern too
    for g in range(n_rows):
        row = thresholds[g]
        padded[g, :n_thresholds] = row
        for attempt in range(attempts):
            if attempt == 1:
                floor[g] = _smallest_magnitude_bits(row)
            keys[:] = row if attempt == 0 else _bit_keys(row, keys, floor[g])
            by_bits[g] = attempt == 1
            low[g] = keys[0]
            ratio = np.float32(n_bins) / (keys[n_thresholds - 1] - keys[0])
            scale[g] = ratio if np.isfinite(ratio) else np.float32(0.0)  # one repeated threshold, inf, NaN: one bin
            per_bin[:] = 0
            for j in range(n_thresholds):
                per_bin[_bin(keys[j], low[g], scale[g], n_bins)] += 1
            most = per_bin.max()
            depth[g] = most if most <= MAX_BIN_THRESHOLDS else 0
            if depth[g]:
                break
        total = 0
        for b in range(n_bins):
            before[g, b] = total
            total += per_bin[b]
    return by_bits, floor, low, scale, before, padded, depth


@_jit
def _smallest_magnitude_bits(row: np.ndarray) -> int:
    """The least magnitude bits (of ``x * LIFT``) among the non-NaN values of ``row``, at least 1."""
    lifted = np.empty(row.shape[0], np.float32)
    for j in range(row.shape[0]):
        v = row[j]
        lifted[j] = np.abs(v * LIFT) if v == v else np.inf
    return max(lifted.view(np.int32).min(), 1)


@_jit
def _bin(x: float, low: float, scale: float, n_bins: int) -> int:
    v = (x - low) * scale
    v = v if v > 0 else np.float32(0.0)  # NaN too: bin 0, whose thresholds it is not above (code 0)
    v = v if v < n_bins - 1 else np.float32(n_bins - 1)
    return np.int32(v)


@_jit
def _row_codes(x: np.ndarray, g: int, thresholds: np.ndarray, tables: tuple, code: np.ndarray,
               work: np.ndarray, levels: np.ndarray, q_row: np.ndarray) -> bool:
    """Codes of the weights ``x`` (K,) for row ``g`` of the ascending ``thresholds`` (G, T), into
    uint8 ``code`` (K,), with int32 ``work`` (K,) as scratch; ``tables`` are :func:`_bin_tables`'s.
    Where the bins serve the row, the weights' ``levels`` go into ``q_row`` in the same pass (one
    read of the codes less: 33 -> 29 ms for resnet34's conv weights at 64 levels, one thread), and
    it returns True; otherwise the caller reads them by code."""
    n_thresholds, n = thresholds.shape[1], x.shape[0]
    row = thresholds[g]
    by_bits, floor, low, scale, before, padded, depth = tables
    if n_thresholds < MIN_BINNED_THRESHOLDS or (n_thresholds <= MAX_COUNTED_THRESHOLDS and not depth[g]):
        code[:] = 0
        for j in range(n_thresholds):  # counted in bytes: four times the lanes of int32 (1.5 against 2.8 ms)
            t = row[j]
            for k in range(n):
                code[k] += np.uint8(x[k] > t)
        return False
    if depth[g]:
        n_bins, bin_starts, candidates, n_compared = before.shape[1], before[g], padded[g], depth[g]
        keys = _bit_keys(x, np.empty(n, np.float32), floor[g]) if by_bits[g] else x
        for k in range(n):  # the bins, in a pass that vectorises
            work[k] = _bin(keys[k], low[g], scale[g], n_bins)
        # Then the comparisons with the bin's thresholds: as many as the fullest bin holds, 1 in
        # 94-100% of fitted rows. The table reads take unsigned indexes: a signed one makes Numba
        # test it for a negative value to wrap around, and the reads of one weight then cost more
        # than the comparison (all of resnet34's conv weights at 256 levels, one thread: 38 ms with
        # signed indexes read weight by weight, 21 with unsigned ones, vectorised as gathers).
        for k in range(n):  # LLVM unswitches the loop on the depth: one vectorised loop each
            first = np.uint32(bin_starts[np.uint32(work[k])])
            v = x[k]
            found = first + np.uint32(v > candidates[first])
            if n_compared > 1:
                found += np.uint32(v > candidates[first + 1])
            if n_compared > 2:
                found += np.uint32(v > candidates[first + 2])
            if n_compared > 3:
                found += np.uint32(v > candidates[first + 3])
            code[k] = found
            q_row[k] = levels[found]
        return True
    size = 1
    while size <= n_thresholds:
        size <<= 1
    padded_row = np.full(size, np.inf, np.float32)
    padded_row[:n_thresholds] = row
    work[:] = 0
    step = size >> 1
    while step > 0:  # a branchless binary search: every weight takes the same steps, which vectorise
        for k in range(n):
            i = work[k]
            work[k] = i + step * (x[k] > padded_row[np.uint32(i + step - 1)])
        step >>= 1
    for k in range(n):
        code[k] = work[k]
    return False


@_jit(fastmath=True)
def _squared_error(q: np.ndarray, x: np.ndarray) -> float:
    # fastmath lets the sum be reordered, so that it vectorises: float32 lanes, as torch.dot's
    error = np.float32(0.0)
    for k in range(x.shape[0]):
        d = q[k] - x[k]
        error += d * d
    return error


@_jit(inline='always')
def _row_select(x: np.ndarray, row: np.ndarray, levels: np.ndarray, q_row: np.ndarray, code: np.ndarray) -> None:
    """Codes (uint8, into ``code``) and levels (into ``q_row``) of the weights ``x`` for the
    ascending thresholds ``row``, by one select per threshold: each pass vectorises without a gather."""
    t, low, high = row[0], levels[0], levels[1]
    for k in range(x.shape[0]):
        above = x[k] > t
        code[k] = np.uint8(above)
        q_row[k] = high if above else low
    for j in range(1, row.shape[0]):
        t, high = row[j], levels[j + 1]
        for k in range(x.shape[0]):
            above = x[k] > t
            code[k] += np.uint8(above)
            q_row[k] = high if above else q_row[k]


#: What the masked sums may reorder (float32 lanes) without changing how NaN and infinities compare.
_SUMS_FASTMATH = {"reassoc", "nsz", "contract", "arcp"}


@_jit(fastmath=_SUMS_FASTMATH)
def _level_sums(values: np.ndarray, code: np.ndarray, out: np.ndarray) -> None:
    """Per level ``i`` of a row, the sum of ``values`` over its weights of code ``i``, into ``out``
    (L,): the sum over codes of at least ``i``, one masked pass each (``>=`` vectorises where an
    equality test does not: 4.7 against 8.2 ms at 2 levels), less the next one's."""
    above = np.float32(0.0)
    for k in range(code.shape[0]):
        above += values[k]
    for level in range(1, out.shape[0]):
        i = np.uint8(level)
        higher = np.float32(0.0)
        for k in range(code.shape[0]):
            higher += values[k] if code[k] >= i else np.float32(0.0)
        out[level - 1] = above - higher
        above = higher
    out[out.shape[0] - 1] = above


@_jit(fastmath=_SUMS_FASTMATH)
def _level_deviations(q: np.ndarray, x: np.ndarray, code: np.ndarray, out: np.ndarray) -> float:
    """Per level ``i`` of a row, the sum of ``q - x`` over its weights of code ``i``, into ``out``
    (L,), as :func:`_level_sums`: half the hash loss's gradient in that level, for
    :func:`_masked_backward_kernel`. Returns the row's squared error, from the same first pass."""
    above, error = np.float32(0.0), np.float32(0.0)
    for k in range(code.shape[0]):
        d = q[k] - x[k]
        above += d
        error += d * d
    for level in range(1, out.shape[0]):
        i = np.uint8(level)
        higher = np.float32(0.0)
        for k in range(code.shape[0]):
            higher += (q[k] - x[k]) if code[k] >= i else np.float32(0.0)
        out[level - 1] = above - higher
        above = higher
    out[out.shape[0] - 1] = above
    return error


@_jit
def _forward_kernel(rows: np.ndarray, thresholds: np.ndarray, groups: np.ndarray, tables: tuple, table: np.ndarray,
                    q: np.ndarray, codes: np.ndarray, row_error: np.ndarray, deviations: np.ndarray, with_error: bool,
                    start: int, stop: int) -> int:
    """Rows ``start:stop`` of :func:`lookup_forward`'s outputs; returns how many rows name a group
    that ``table`` has not (they are left unwritten; the caller raises)."""
    work = np.empty(rows.shape[1], np.int32)
    bad = 0
    for c in range(start, stop):
        g = groups[c]
        if g < 0 or g >= table.shape[0]:
            bad += 1
            continue
        x, levels, q_row, code_row = rows[c], table[g], q[c], codes[c]
        if thresholds.shape[1] <= MAX_SELECTED_THRESHOLDS:
            _row_select(x, thresholds[g], levels, q_row, code_row)
        elif not _row_codes(x, g, thresholds, tables, code_row, work, levels, q_row):
            for k in range(x.shape[0]):
                q_row[k] = levels[code_row[k]]
        if with_error and deviations.shape[0]:
            row_error[c] = _level_deviations(q_row, x, code_row, deviations[c])
        elif with_error:
            row_error[c] = _squared_error(q_row, x)
    return bad


@_jit
def _backward_kernel(codes: np.ndarray, groups: np.ndarray, table: np.ndarray, rows: np.ndarray, grad: np.ndarray,
                     has_grad: bool, error_coef: float, out: np.ndarray, slab: int, start: int, stop: int) -> int:
    """Writes into ``out[slab]`` (G, L), per group and level, the sum of ``grad + error_coef * (level -
    weight)`` over the weights of that code in rows ``start:stop``; returns how many rows name a
    group that ``table`` has not (skipped; the caller raises).

    The rows of a group follow one another, and a run of them shares one set of partial sums,
    added to ``out`` when the group changes: at 256 levels the sums are 8 KiB, and zeroing and
    adding them up row by row cost more than the row's own 576 weights (resnet34's 3x3 convs of
    64 channels)."""
    n_levels = table.shape[1]
    sums = np.zeros(_LANES * n_levels, np.float64)
    sink = out[slab]
    sink[:] = 0.0
    bad, group = 0, -1
    for c in range(start, stop):
        g = groups[c]
        if g < 0 or g >= table.shape[0]:
            bad += 1
            continue
        if g != group:
            if group >= 0:
                _add_lanes(sums, sink[group])
            group = g
        levels, x, code = table[group], rows[c], codes[c]
        if has_grad and error_coef != 0.0:
            for k in range(code.shape[0]):
                i = code[k]
                sums[(k % _LANES) * n_levels + i] += grad[c, k] + error_coef * (levels[i] - x[k])
        elif has_grad:
            for k in range(code.shape[0]):
                sums[(k % _LANES) * n_levels + code[k]] += grad[c, k]
        else:
            for k in range(code.shape[0]):
                i = code[k]
                sums[(k % _LANES) * n_levels + i] += error_coef * (levels[i] - x[k])
    if group >= 0:
        _add_lanes(sums, sink[group])
    return bad


@_jit
def _add_lanes(sums: np.ndarray, target: np.ndarray) -> None:
    """Adds the ``_LANES`` partial sums of each level into ``target`` (L,), and zeroes them."""
    n_levels = target.shape[0]
    for level in range(n_levels):
        total = 0.0
        for lane in range(_LANES):
            total += sums[lane * n_levels + level]
            sums[lane * n_levels + level] = 0.0
        target[level] += total


@_jit(parallel=True)
def _forward_parts(rows: np.ndarray, thresholds: np.ndarray, groups: np.ndarray, tables: tuple, table: np.ndarray,
                   q: np.ndarray, codes: np.ndarray, row_error: np.ndarray, deviations: np.ndarray, with_error: bool,
                   n_parts: int) -> int:
    by_bits, floor, low, scale, before, padded, depth = tables
    bad = 0
    for p in numba.prange(n_parts):
        bad += _forward_kernel(rows, thresholds, groups, (by_bits, floor, low, scale, before, padded, depth), table,
                               q, codes, row_error, deviations, with_error, rows.shape[0] * p // n_parts,
                               rows.shape[0] * (p + 1) // n_parts)
    return bad


@_jit(parallel=True)
def _backward_parts(codes: np.ndarray, groups: np.ndarray, table: np.ndarray, rows: np.ndarray, grad: np.ndarray,
                    has_grad: bool, error_coef: float, out: np.ndarray, slab: int, n_parts: int) -> int:
    """:func:`_backward_kernel` in ``n_parts`` parts, part ``p`` writing ``out[p]`` (``slab``: the
    single part's, unused here)."""
    bad = 0
    for p in numba.prange(n_parts):
        bad += _backward_kernel(codes, groups, table, rows, grad, has_grad, error_coef, out, p,
                                codes.shape[0] * p // n_parts, codes.shape[0] * (p + 1) // n_parts)
    return bad


@_jit
def _masked_backward_kernel(codes: np.ndarray, groups: np.ndarray, grad: np.ndarray, has_grad: bool,
                            deviations: np.ndarray, error_coef: float, out: np.ndarray, slab: int, start: int,
                            stop: int) -> int:
    """:func:`_backward_kernel` for up to MAX_MASKED_LEVELS levels, the hash loss's term taken from
    the forward's :func:`_level_deviations` instead of the weights."""
    n_levels = out.shape[2]
    sums = np.zeros(n_levels, np.float32)
    sink = out[slab]
    sink[:] = 0.0
    bad = 0
    for c in range(start, stop):
        g = groups[c]
        if g < 0 or g >= sink.shape[0]:
            bad += 1
            continue
        if has_grad:
            _level_sums(grad[c], codes[c], sums)
        for level in range(n_levels):
            total = sums[level]
            if error_coef != 0.0:
                total += error_coef * deviations[c, level]
            sink[g, level] += total
    return bad


@_jit(parallel=True)
def _masked_backward_parts(codes: np.ndarray, groups: np.ndarray, grad: np.ndarray, has_grad: bool,
                           deviations: np.ndarray, error_coef: float, out: np.ndarray, slab: int, n_parts: int) -> int:
    bad = 0
    for p in numba.prange(n_parts):
        bad += _masked_backward_kernel(codes, groups, grad, has_grad, deviations, error_coef, out, p,
                                       codes.shape[0] * p // n_parts, codes.shape[0] * (p + 1) // n_parts)
    return bad


@_jit
def _sum_slabs(slabs: np.ndarray, scale: float, out: np.ndarray) -> None:
    """``out`` (G, L): the float64 sum of the backward's per-part ``slabs`` (P, G, L), times ``scale``."""
    for g in range(out.shape[0]):
        for level in range(out.shape[1]):
            total = 0.0
            for p in range(slabs.shape[0]):
                total += slabs[p, g, level]
            out[g, level] = total * scale


@_jit
def _midpoints(table: np.ndarray, out: np.ndarray) -> np.ndarray:
    """The thresholds of nearest-level rounding: ``(table[:, j] + table[:, j + 1]) * 0.5`` into
    ``out`` (G, L-1), in float32 as :func:`timm_qconv._groups.midpoints` computes them."""
    for g in range(table.shape[0]):
        for j in range(out.shape[1]):
            out[g, j] = (table[g, j + 1] + table[g, j]) * np.float32(0.5)
    return out


@_jit
def _decode_kernel(codes: np.ndarray, groups: np.ndarray, table: np.ndarray, q: np.ndarray, start: int,
                   stop: int) -> int:
    bad = 0
    for c in range(start, stop):
        g = groups[c]
        if g < 0 or g >= table.shape[0]:
            bad += 1
            continue
        levels, code, q_row = table[g], codes[c], q[c]
        for k in range(code.shape[0]):
            q_row[k] = levels[code[k]]
    return bad


@_jit(parallel=True)
def _decode_parts(codes: np.ndarray, groups: np.ndarray, table: np.ndarray, q: np.ndarray, n_parts: int) -> int:
    bad = 0
    for p in numba.prange(n_parts):
        bad += _decode_kernel(codes, groups, table, q, codes.shape[0] * p // n_parts,
                              codes.shape[0] * (p + 1) // n_parts)
    return bad


#: Layers of fewer weights per thread than this run in one thread: splitting them would cost
#: more than it saves.
MIN_WEIGHTS_PER_THREAD = 1 << 15
_parallel_lock = threading.Lock()
#: The process that started Numba's thread pool, if any.
_parallel_pid: int | None = None


def _n_parts(n_rows: int, numel: int) -> int:
    """How many parts a kernel over ``n_rows`` rows of ``numel`` weights is worth splitting into."""
    return max(1, min(torch.get_num_threads(), n_rows, numel // MIN_WEIGHTS_PER_THREAD))


def _parts_here(n_rows: int, numel: int) -> int:
    """The parts :func:`_run` is to split such a kernel into in this process: :func:`_n_parts`, or 1
    in a forked child of a process that started Numba's threads (see :func:`_run`)."""
    return 1 if _parallel_pid not in (None, os.getpid()) else _n_parts(n_rows, numel)


def _run(kernel: Callable[..., int], parts: Callable[..., int], n_rows: int, n_parts: int, *args: Any) -> int:
    """``kernel`` over all ``n_rows`` rows, in ``n_parts`` contiguous parts (:func:`_parts_here`): in
    this thread, or by ``parts`` (its ``parallel=True`` driver) in Numba's threads, as many as
    PyTorch has (``torch.set_num_threads``). Returns the kernel's count of rows that name a group
    the table has not (then nothing it wrote is to be used).

    Numba's threads, not a pool of our own, which waited on PyTorch's OpenMP threads after every
    convolution while they spin (8 bits: 1.19-1.29x the float step against 1.35-1.41). Numba's
    OpenMP layer links the system's libgomp; where the PyTorch wheel bundles its own
    (``torch/lib/libgomp.so.1``, as the 2.14.1 wheels do) two OpenMP runtimes share the cores, and
    in a resnet34 training step the kernels take 1.3-1.6x their time alone (2 bits: 28-36 against
    22 ms a step), about half of which goes when both use PyTorch's runtime (``LD_PRELOAD`` of
    its libgomp: 24-25 ms); Numba's ``workqueue`` layer and one thread were slower still. Three
    things about it are handled here. Starting it resets the thread count PyTorch reads, which is
    put back. Its OpenMP layer terminates a forked child that uses it once the parent has ("fork()
    called from a process already using GNU OpenMP"), so such a child runs the kernels in one
    thread (:func:`_parts_here`). Its ``workqueue`` layer (where OpenMP is missing) is not safe from
    several threads at once, so calls take a lock (a kernel keeps every core busy anyway).
    """
    global _parallel_pid
    if n_parts == 1:
        return kernel(*args, 0, n_rows)
    with _parallel_lock:
        if _parallel_pid is None:
            threads = torch.get_num_threads()
            bad = parts(*args, n_parts)
            _parallel_pid = os.getpid()
            torch.set_num_threads(threads)
            return bad
        return parts(*args, n_parts)


def _array(x: Tensor) -> np.ndarray:
    """``x``'s memory as a NumPy array (``.numpy()``, which refuses tensors that require grad)."""
    return x.detach().numpy() if x.requires_grad else x.numpy()


def _new(shape: tuple[int, ...], dtype: type = np.float32) -> tuple[Tensor, np.ndarray]:
    """An uninitialised tensor and the NumPy array that owns its memory: one allocation, without the
    five dispatched operations of ``torch.empty(...).numpy()`` (which a step pays for every layer)."""
    array = np.empty(shape, dtype)
    return torch.from_numpy(array), array


class _Slabs(threading.local):
    """The backward's per-part float64 sums, kept per thread from call to call (each part zeroes its own)."""

    def __init__(self) -> None:
        self.buffer = np.empty(0, np.float64)

    def get(self, n_parts: int, shape: tuple[int, int]) -> np.ndarray:
        n = n_parts * shape[0] * shape[1]
        if self.buffer.shape[0] < n:
            self.buffer = np.empty(n, np.float64)
        return self.buffer[:n].reshape(n_parts, shape[0], shape[1])


_slabs = _Slabs()


def _check(rows: Tensor, groups: Tensor, table: Tensor, thresholds: Tensor | None = None, grad: Tensor | None = None,
           codes: Tensor | None = None) -> None:
    """The kernels index without bounds checks: shapes that do not fit would read and write out
    of bounds, so they are refused here, as PyTorch's own operations would refuse them. (The
    group indexes' values are checked by the kernels as they read them: :func:`_refuse_groups`.)"""
    n_rows = rows.shape[0]
    problems = []
    if rows.ndim != 2 or not rows.is_contiguous():
        problems.append(f"rows must be a contiguous (C, K) matrix, got shape {tuple(rows.shape)}")
    if table.ndim != 2 or not table.is_contiguous():
        problems.append(f"table must be a contiguous (G, L) matrix, got shape {tuple(table.shape)}")
    if groups.shape != (n_rows,):
        problems.append(f"groups must be {n_rows} indexes into the rows of table, got shape {tuple(groups.shape)}")
    for name, tensor in (("grad", grad), ("codes", codes)):
        if tensor is not None and tensor.shape != rows.shape:
            problems.append(f"{name} must have the shape {tuple(rows.shape)} of rows, got {tuple(tensor.shape)}")
    if thresholds is not None and thresholds.shape != (table.shape[0], table.shape[1] - 1):
        problems.append(f"thresholds must be ({table.shape[0]}, {table.shape[1] - 1}), one row per row of table, "
                        f"got {tuple(thresholds.shape)}")
    if problems:
        raise ValueError("timm_qconv kernels: " + "; ".join(problems))


def _refuse_groups(bad: int, groups: Tensor, table: Tensor) -> None:
    """Raises if a kernel found ``bad`` rows whose group index is not a row of ``table``."""
    if bad:
        raise ValueError(f"timm_qconv kernels: groups must be {groups.shape[0]} group indexes below G, the "
                         f"{table.shape[0]} rows of table; {bad} rows name another")


#: What :func:`_bin_tables` returns for rows of fewer than MIN_BINNED_THRESHOLDS thresholds, which count
#: instead: empty tables of its types.
_NO_BIN_TABLES = (np.zeros(0, np.bool_), np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.float32),
                  np.zeros((0, 0), np.int32), np.zeros((0, 0), np.float32), np.zeros(0, np.int32))
_NO_GRAD = np.zeros((0, 0), np.float32)


def lookup_forward(thresholds: Tensor | None, groups: Tensor, table: Tensor, rows: Tensor,
                   with_error: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """``(q, codes, error, deviations)``: each weight of row ``c`` of ``rows`` (C, K) mapped by row
    ``groups[c]`` of ``thresholds`` (G, L-1; ``None``: the midpoints of ``table``, nearest-level
    rounding) to its level in the same row of ``table`` (G, L); the uint8 codes; and if
    ``with_error`` (else ``None``) ``sum((q - rows)**2)`` as a float32 scalar and, up to
    MAX_MASKED_LEVELS levels, per row and level the sum of ``q - rows`` (C, L) for
    :func:`lookup_backward`."""
    _check(rows, groups, table, thresholds)
    n_rows, n_levels = rows.shape[0], table.shape[1]
    table_ = _array(table)
    if thresholds is None:
        thresholds_ = _midpoints(table_, np.empty((table_.shape[0], n_levels - 1), np.float32))
    else:
        thresholds_ = _array(thresholds)
    tables = _bin_tables(thresholds_) if thresholds_.shape[1] >= MIN_BINNED_THRESHOLDS else _NO_BIN_TABLES
    q, q_ = _new(tuple(rows.shape))
    codes, codes_ = _new(tuple(rows.shape), np.uint8)
    row_error, row_error_ = _new((n_rows if with_error else 0,))
    masked = with_error and n_levels <= MAX_MASKED_LEVELS
    deviations, deviations_ = _new((n_rows, n_levels) if masked else (0, 0))
    bad = _run(_forward_kernel, _forward_parts, n_rows, _parts_here(n_rows, rows.numel()), _array(rows), thresholds_,
               _array(groups), tables, table_, q_, codes_, row_error_, deviations_, with_error)
    _refuse_groups(bad, groups, table)
    return q, codes, (row_error.sum() if with_error else None), (deviations if masked else None)


def lookup_backward(codes: Tensor, groups: Tensor, table: Tensor, rows: Tensor, grad: Tensor | None,
                    error_coef: float, scale: float, deviations: Tensor | None = None) -> Tensor:
    """Gradient of the ``(G, L)`` table: per level of each group, the sum over the weights of that
    code in the group's rows of ``grad + error_coef * (level - weight)``, times ``scale``. With the
    forward's ``deviations`` (see :func:`lookup_forward`) the weights ``rows`` are not read."""
    _check(rows, groups, table, grad=grad, codes=codes)
    n_rows, shape = codes.shape[0], (table.shape[0], table.shape[1])
    n_parts = _parts_here(n_rows, codes.numel())
    slabs = _slabs.get(n_parts, shape)  # one (G, L) per part
    grad_ = _NO_GRAD if grad is None else _array(grad)
    if shape[1] <= MAX_MASKED_LEVELS and (error_coef == 0.0 or deviations is not None):
        if deviations is not None and deviations.shape != (n_rows, shape[1]):
            raise ValueError(f"timm_qconv kernels: deviations must be {(n_rows, shape[1])}, "
                             f"got {tuple(deviations.shape)}")
        bad = _run(_masked_backward_kernel, _masked_backward_parts, n_rows, n_parts, _array(codes), _array(groups),
                   grad_, grad is not None, _NO_GRAD if deviations is None else _array(deviations),
                   float(error_coef), slabs, 0)
    else:
        bad = _run(_backward_kernel, _backward_parts, n_rows, n_parts, _array(codes), _array(groups), _array(table),
                   _array(rows), grad_, grad is not None, float(error_coef), slabs, 0)
    _refuse_groups(bad, groups, table)
    out, out_ = _new(shape)
    _sum_slabs(slabs, float(scale), out_)
    return out


def decoder(codes: Tensor, groups: Tensor, table: Tensor) -> Callable[[], Tensor]:
    """A call that returns the float32 ``(C, K)`` levels of uint8 ``codes``: row ``c`` reads row
    ``groups[c]`` of ``table`` (G, L); the codes are the forward's (:func:`lookup_forward`), all
    below L. Checked and prepared now: the training forward prepares the decode its backward runs,
    which then makes the pass over the weights and little else."""
    n_rows = codes.shape[0]
    if (codes.ndim != 2 or codes.dtype != torch.uint8 or not codes.is_contiguous() or table.ndim != 2
            or not table.is_contiguous() or groups.shape != (n_rows,)):
        raise ValueError(f"timm_qconv kernels: decode needs contiguous uint8 (C, K) codes, a contiguous (G, L) "
                         f"table and C group indexes below G; got codes {tuple(codes.shape)} {codes.dtype}, "
                         f"table {tuple(table.shape)}, groups {tuple(groups.shape)}")
    shape, numel = (codes.shape[0], codes.shape[1]), codes.numel()
    arrays = _array(codes), _array(groups), _array(table)

    def decode_now() -> Tensor:
        q, q_ = _new(shape)
        _refuse_groups(_run(_decode_kernel, _decode_parts, n_rows, _parts_here(n_rows, numel), *arrays, q_),
                       groups, table)
        return q

    return decode_now
