"""Exact decode of ``fused12`` planes into a bf16 matrix on the GPU (the decode-to-slot path).

Two launches on the current stream, no host synchronisation, no allocation:

1. :func:`_decode_kernel`: one program per ``BP`` row pairs x ``BW`` words; loads the two rows' ``sm``
   words and the pair's code words (16-byte loads), builds the exact bf16 pairs (exponent ``top - n``,
   :func:`~offload_runtime.native.fused12_bits.exact_pair`) and stores the ``4 BW`` columns of both rows in
   natural order. Escaped positions get a placeholder.
2. :func:`_patch_kernel`: one program per ``BR`` rows writes each escape's exact bits over its
   placeholder (stream order makes it run after the first). Entries whose column is outside the matrix
   (a damaged payload) are skipped rather than written out of bounds; the decoded CRC check reports them.

The oracle its tests use: :func:`offload_runtime.native.fused12_format.decode`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from offload_runtime.native.fused12_bits import exact_pair, rotl8, rotr8
from offload_runtime.native.fused12_format import Planes
from offload_runtime.native.layout import cdiv

DECODE_PAIRS = 16  # BP: row pairs per program
DECODE_WORDS = 64  # BW: words (4 columns each) per program
PATCH_ROWS = 64  # BR
PATCH_ENTRIES = 32  # escapes handled per step of a patch program


@triton.jit
def _store_row(out_ptr, rows, row_mask, col0, K, p_lo, p_hi, BW: tl.constexpr):
    """Store the 4 columns of each word of one row class: ``p_lo`` = (4j, 4j+1), ``p_hi`` = (4j+2, 4j+3)."""
    c0 = (p_lo & 0xFFFF).to(tl.int16)
    c1 = (p_lo >> 16).to(tl.int16)
    c2 = (p_hi & 0xFFFF).to(tl.int16)
    c3 = (p_hi >> 16).to(tl.int16)
    # join stacks on a new last axis: (c0, c2) x (c1, c3) flattens to c0, c1, c2, c3
    values = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), [c0.shape[0], 4 * BW])
    cols = col0 + tl.arange(0, 4 * BW)
    ptrs = out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(ptrs, values, mask=row_mask[:, None] & (cols < K)[None, :])


@triton.jit
def _decode_kernel(
    sm_ptr, codes_ptr, top_ptr, out_ptr, N, K, pitch, nwords, BP: tl.constexpr, BW: tl.constexpr
):
    pairs = tl.program_id(0) * BP + tl.arange(0, BP)
    words = tl.program_id(1) * BW + tl.arange(0, BW)
    rows_a = 2 * pairs
    rows_b = rows_a + 1
    mask_a = rows_a < N
    mask_b = rows_b < N
    word_mask = words < nwords
    c = tl.load(
        codes_ptr + pairs.to(tl.int64)[:, None] * pitch + words[None, :],
        mask=mask_a[:, None] & word_mask[None, :],
        other=0,
    ).to(tl.uint32, bitcast=True)
    sa = tl.load(
        sm_ptr + rows_a.to(tl.int64)[:, None] * pitch + words[None, :],
        mask=mask_a[:, None] & word_mask[None, :],
        other=0,
    ).to(tl.uint32, bitcast=True)
    sb = tl.load(
        sm_ptr + rows_b.to(tl.int64)[:, None] * pitch + words[None, :],
        mask=mask_b[:, None] & word_mask[None, :],
        other=0,
    ).to(tl.uint32, bitcast=True)
    top_a = tl.load(top_ptr + rows_a, mask=mask_a, other=15).to(tl.uint32)
    top_b = tl.load(top_ptr + rows_b, mask=mask_b, other=15).to(tl.uint32)
    top2_a = ((top_a << 7) | (top_a << 23))[:, None]
    top2_b = ((top_b << 7) | (top_b << 23))[:, None]
    col0 = 4 * BW * tl.program_id(1)
    a_lo = exact_pair(sa, c, top2_a)
    a_hi = exact_pair(rotr8(sa), c << 4, top2_a)
    b_lo = exact_pair(sb, c >> 4, top2_b)
    b_hi = exact_pair(rotr8(sb), rotl8(c), top2_b)
    _store_row(out_ptr, rows_a, mask_a, col0, K, a_lo, a_hi, BW)
    _store_row(out_ptr, rows_b, mask_b, col0, K, b_lo, b_hi, BW)


@triton.jit
def _patch_kernel(esc_ptr_ptr, esc_ptr, out_ptr, N, K, BR: tl.constexpr, EC: tl.constexpr):
    first = tl.program_id(0) * BR
    rows = first + tl.arange(0, BR)
    row_mask = rows < N
    ends = tl.load(
        esc_ptr_ptr + rows + 1, mask=row_mask, other=0
    )  # entry e belongs to the first row whose end > e
    e = tl.load(esc_ptr_ptr + first)
    end = tl.load(esc_ptr_ptr + tl.minimum(first + BR, N))
    while e < end:
        idx = e + tl.arange(0, EC)
        emask = idx < end
        entry = tl.load(esc_ptr + idx, mask=emask, other=0).to(tl.uint32, bitcast=True)
        before = (idx[:, None] >= ends[None, :]) & row_mask[None, :]  # rows that end at or before e
        row = first + tl.sum(before.to(tl.int32), axis=1)
        col = (entry & 0xFFFF).to(tl.int32)
        ok = emask & (col < K) & (row < N)
        tl.store(out_ptr + row.to(tl.int64) * K + col, (entry >> 16).to(tl.int16), mask=ok)
        e += EC


def decode_into(
    planes: Planes, out: torch.Tensor, block_pairs: int = DECODE_PAIRS, block_words: int = DECODE_WORDS
) -> None:
    """Enqueue the exact decode of ``planes`` into ``out`` on the current CUDA stream.

    Args:
        planes (`Planes`): the weight's planes (device tensors, e.g. views into a device-resident payload).
        out (`torch.Tensor`): ``[N, K]`` contiguous, bf16 or int16 (the bits), on the planes' device.
    """
    rows, cols = planes.rows, planes.cols
    if (
        tuple(out.shape) != (rows, cols)
        or out.dtype not in (torch.bfloat16, torch.int16)
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"need a contiguous bf16/int16 [{rows}, {cols}] output, got {out.dtype} {tuple(out.shape)}"
        )
    if rows == 0 or cols == 0:
        return
    bits = out.view(torch.int16)
    nwords = cdiv(cols, 4)
    grid = (cdiv((rows + 1) // 2, block_pairs), cdiv(nwords, block_words))
    _decode_kernel[grid](
        planes.sm,
        planes.codes,
        planes.top,
        bits,
        rows,
        cols,
        planes.pitch,
        nwords,
        BP=block_pairs,
        BW=block_words,
    )
    if planes.escapes:
        _patch_kernel[(cdiv(rows, PATCH_ROWS),)](
            planes.esc_ptr, planes.esc, bits, rows, cols, BR=PATCH_ROWS, EC=PATCH_ENTRIES
        )
