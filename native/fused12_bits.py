"""Triton building blocks shared by the ``fused12`` kernels: the word-level decode and the epilogue.

The decode works on whole 32-bit words (see :mod:`offload_runtime.native.fused12_format` for the bit
layout): a sign/mantissa word ``s`` and a code word give two weights (a bf16 pair) with a shift and two
three-input logic operations, so a 16-byte load of each plane feeds 16 weights without extracting a byte.

* :func:`scaled_pair` builds what a matmul multiplies, ``w' = w * 2**(127 - top)`` (exponent ``127 - n``),
  as two fp32 values: ``(p << 16)`` and ``(p & 0xFFFF0000)`` reinterpreted, where ``p`` is the pair;
* :func:`exact_pair` builds the exact bf16 pair (exponent ``top - n``), for the decode kernel.

The escapes' terms ``x[c] * (v - 2**(top - 142))`` of a block of rows (the main loop multiplied an escape
as ``w' = 2**-15``, its ``sm`` being 0) are summed before the main loop (:func:`escape_sums`). The
epilogue (:func:`finish`) scales the fp32 sums of ``x . w'`` per row by ``2**(top - 127)``, adds the
escape terms and the bias, and stores ``y``. With split-K, :func:`reduce_splits` first makes the last
program of each row block sum the partial sums of all splits in a fixed order (deterministic) and re-arm
the block's counter (protocol in its docstring).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from offload_runtime.native.layout import cdiv


def escape_chunk(rows_x_block: int, block_pairs: int) -> int:
    """Escapes handled per step of :func:`~offload_runtime.native.fused12_bits.escape_sums`: its
    ``[MB, EC, BP]`` temporaries stay near 4096 elements (a few registers per thread)."""
    chunk = 64
    while chunk > 8 and rows_x_block * chunk * block_pairs > 4096:
        chunk //= 2
    return chunk


@dataclass(frozen=True)
class TileConfig:
    """Tile and launch parameters shared by the matmul kernels (what the benchmark tunes per shape).

    Attributes:
        block_pairs: row pairs of ``W`` per program (``BP``; ``2 BP`` output features).
        block_words: words per step (``BW``; ``4 BW`` columns).
        split: programs sharing one output tile along K (1: no split-K).
        num_warps, num_stages: Triton launch parameters.
    """

    block_pairs: int = 16
    block_words: int = 32
    split: int = 1
    num_warps: int = 4
    num_stages: int = 1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class KRange:
    """How a launch cuts K: ``nwords`` words in ``split`` ranges of ``words_per_split`` (``iters`` steps
    of ``block_words``); ``even`` when every range is full (no column masks)."""

    nwords: int
    words_per_split: int
    iters: int
    split: int
    even: bool


def k_range(cols: int, block_words: int, split: int) -> KRange:
    """Split ``cols`` columns into at most ``split`` ranges of whole steps (fewer when steps run out)."""
    nwords = cdiv(cols, 4)
    per_split = max(cdiv(cdiv(nwords, split), block_words), 1) * block_words
    splits = max(cdiv(nwords, per_split), 1)
    return KRange(nwords, per_split, per_split // block_words, splits, nwords % per_split == 0)


def split_workspace(
    need: tuple[int, int],
    workspace: tuple[torch.Tensor, torch.Tensor] | None,
    split: int,
    fallback: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(partials, counters)`` to pass a kernel: the workspace, checked to hold ``need`` when split."""
    if split == 1:
        return fallback, fallback  # never read or written
    if workspace is None or workspace[0].numel() < need[0] or workspace[1].numel() < need[1]:
        raise ValueError(f"split-K needs a workspace of {need} (fp32 partials, int32 counters)")
    return workspace


@triton.jit
def rotl8(v):
    """Rotate uint32 words left by 8 bits (one funnel shift on the GPU)."""
    return (v << 8) | (v >> 24)


@triton.jit
def rotr8(v):
    return (v >> 8) | (v << 24)


# XOR of the masked codes that makes the exponent field 127 - n = 0b0111_(~n) (mask | 0x70 << 7 per lane).
# Kernels take it as an argument: as a literal, LLVM rewrites (s & K) | ((c & M) ^ X) into
# ((s & K) | (c & M)) ^ X, which ptxas cannot fit in two three-input LOP3s (it takes three).
SCALED_EXP_XOR = 0x3F803F80


@triton.jit
def scaled_bits(s, c, exp_xor):
    """The bf16 pair (uint32, lane 0 = low 16 bits) of ``w'`` for sign/mantissa word ``s`` (``sm`` word, or
    ``rotr8`` of it for columns 4j+2, 4j+3), code word ``c`` (codes at bits 7-10 and 23-26) and
    ``exp_xor`` = :data:`SCALED_EXP_XOR`: two LOP3s."""
    return (s & 0x807F807F) | ((c & 0x07800780) ^ exp_xor)


@triton.jit
def scaled_pair(s, c, exp_xor):
    """fp32 ``w'`` of the two weights of bf16-pair lanes 0 and 1 (:func:`scaled_bits`, then a shift and a
    mask)."""
    p = scaled_bits(s, c, exp_xor)
    return (p << 16).to(tl.float32, bitcast=True), (p & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def exact_pair(s, c, top2):
    """The exact bf16 pair (uint32, lane 0 = low 16 bits): exponent ``top - n`` per lane (``top2`` holds
    ``top << 7 | top << 23``; ``top >= 15 >= n``, so the subtraction never borrows across lanes)."""
    return (s & 0x807F807F) | (top2 - (c & 0x07800780))


@triton.jit
def decode_scaled(sa, sb, c, exp_xor):
    """The 8 fp32 ``w'`` tiles of a block: rows A (``sa``) and B (``sb``) of each row pair, columns
    ``4j + 0..3`` of each word ``j``, from uint32 words ``sa``, ``sb`` and the pair's code words ``c``."""
    a0, a1 = scaled_pair(sa, c, exp_xor)
    a2, a3 = scaled_pair(rotr8(sa), c << 4, exp_xor)
    b0, b1 = scaled_pair(sb, c >> 4, exp_xor)
    b2, b3 = scaled_pair(rotr8(sb), rotl8(c), exp_xor)
    return a0, a1, a2, a3, b0, b1, b2, b3


@triton.jit
def pair_rows(pair0, N, BP: tl.constexpr):
    """Rows A (``2p``) and B (``2p + 1``) of pairs ``pair0 + [0, BP)``, and which exist."""
    rows_a = 2 * (pair0 + tl.arange(0, BP))
    return rows_a, rows_a + 1, rows_a < N, rows_a + 1 < N


@triton.jit
def load_words(
    codes_ptr, sm_ptr, pair0, N, pitch, words, w_end,
    BP: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, THREE_D: tl.constexpr,
):  # fmt: skip
    """uint32 ``[BP, BW]`` (``THREE_D``: ``[1, BP, BW]``) code words of pairs ``pair0 + [0, BP)`` and the
    ``sm`` words of their rows A and B, words ``words``. Unmasked when the shape divides the tiles
    (``EVEN_K and EVEN_N``: a masked load zeroes its registers first); ``THREE_D`` loads straight into the
    layout of a ``[MB, BP, BW]`` accumulator (fewer trips through shared memory)."""
    rows_a, _, mask_a, mask_b = pair_rows(pair0, N, BP)
    off_c = (pair0 + tl.arange(0, BP)).to(tl.int64)[:, None] * pitch + words[None, :]
    off_a = rows_a.to(tl.int64)[:, None] * pitch + words[None, :]
    off_b = off_a + pitch
    if EVEN_K:
        mask_ca = mask_a[:, None]
        mask_cb = mask_b[:, None]
    else:
        mask_ca = mask_a[:, None] & (words < w_end)[None, :]
        mask_cb = mask_b[:, None] & (words < w_end)[None, :]
    if THREE_D:
        c = tl.load((codes_ptr + off_c)[None, :, :], mask=mask_ca[None, :, :], other=0)
        sa = tl.load((sm_ptr + off_a)[None, :, :], mask=mask_ca[None, :, :], other=0)
        sb = tl.load((sm_ptr + off_b)[None, :, :], mask=mask_cb[None, :, :], other=0)
    elif EVEN_K and EVEN_N:
        c = tl.load(codes_ptr + off_c)
        sa = tl.load(sm_ptr + off_a)
        sb = tl.load(sm_ptr + off_b)
    else:
        c = tl.load(codes_ptr + off_c, mask=mask_ca, other=0)
        sa = tl.load(sm_ptr + off_a, mask=mask_ca, other=0)
        sb = tl.load(sm_ptr + off_b, mask=mask_cb, other=0)
    return c.to(tl.uint32, bitcast=True), sa.to(tl.uint32, bitcast=True), sb.to(tl.uint32, bitcast=True)


@triton.jit
def row_scale(top_ptr, rows, row_mask):
    """``2**(top - 127)`` per row (fp32, built from the exponent bits; 1 for masked rows)."""
    top = tl.load(top_ptr + rows, mask=row_mask, other=127).to(tl.uint32)
    return (top << 23).to(tl.float32, bitcast=True)


@triton.jit
def _mine(rows, row_mask, idx, emask, esc_ptr_ptr):
    """``[EC, R]``: entry ``idx[e]`` is an escape of row ``rows[r]``."""
    lo = tl.load(esc_ptr_ptr + rows, mask=row_mask, other=0)
    hi = tl.load(esc_ptr_ptr + rows + 1, mask=row_mask, other=0)
    return (idx[:, None] >= lo[None, :]) & (idx[:, None] < hi[None, :]) & emask[:, None]


@triton.jit
def escape_sums(
    pair0, N, M, top_ptr, esc_ptr_ptr, esc_ptr, x_ptr, stride_xm, m_idx, split, n_splits,
    MB: tl.constexpr, BP: tl.constexpr, EC: tl.constexpr, DOT: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """What the escapes of rows A and B of pairs ``pair0 + [0, BP)`` add to ``y``, ``[MB, BP]`` each:
    ``x[m, c] * (v - g_r)`` per escape ``(c, v)`` of row ``r``, ``g_r = 2**(top_r - 142)`` being what the
    main loop multiplied it by (``w' = 2**-15``, its ``sm`` being 0, times the row's scale). With
    ``SPLIT_K``, only chunks ``split, split + n_splits, ...`` of ``EC`` escapes: the splits of a block share
    its chunks, so no one program waits through them all.

    A kernel calls this before its main loop: these few dependent loads then wait while the SM streams
    other programs' weights, instead of lengthening the kernel's tail. Two ways to scatter the terms:

    * ``DOT`` (the tile kernel, ``MB, EC, BP >= 16``, bf16 ``x``): two bf16 tensor-core products with fp32
      accumulation, ``x_e @ onehot * v`` and ``x_e @ onehot`` (then times ``g_r``), both exact per
      term since bf16 x bf16 fits fp32; registers stay ``O(MB EC + EC BP)`` for any ``MB``;
    * else broadcast products ``[MB, EC, BP]`` summed over ``EC`` (``MB <= 8``), selected after the
      product so that an inf in ``x`` at another row's escape column does not turn this row into NaN.
    """
    rows_a, rows_b, mask_a, mask_b = pair_rows(pair0, N, BP)
    m_mask = m_idx < M
    garbage_a = row_scale(top_ptr, rows_a, mask_a) * 3.0517578125e-05
    garbage_b = row_scale(top_ptr, rows_b, mask_b) * 3.0517578125e-05
    ya = tl.zeros([MB, BP], dtype=tl.float32)
    yb = tl.zeros([MB, BP], dtype=tl.float32)
    xa = tl.zeros([MB, BP], dtype=tl.float32)  # DOT: sum of x over the row's escape columns
    xb = tl.zeros([MB, BP], dtype=tl.float32)
    if SPLIT_K:
        chunk0, chunk_step = split, n_splits
    else:
        chunk0, chunk_step = 0, 1
    first_row = 2 * pair0
    e = tl.load(esc_ptr_ptr + first_row) + chunk0 * EC
    end = tl.load(esc_ptr_ptr + tl.minimum(first_row + 2 * BP, N))
    while e < end:  # a while loop: its bounds are data
        idx = e + tl.arange(0, EC)
        emask = idx < end
        entry = tl.load(esc_ptr + idx, mask=emask, other=0).to(tl.uint32)
        col = (entry & 0xFFFF).to(tl.int32)
        xe = tl.load(
            x_ptr + m_idx[:, None] * stride_xm + col[None, :],
            mask=m_mask[:, None] & emask[None, :],
            other=0.0,
        )
        mine_a = _mine(rows_a, mask_a, idx, emask, esc_ptr_ptr)
        mine_b = _mine(rows_b, mask_b, idx, emask, esc_ptr_ptr)
        if DOT:
            value = (entry >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)[:, None]
            ya = tl.dot(xe, tl.where(mine_a, value, 0.0).to(tl.bfloat16), ya)
            yb = tl.dot(xe, tl.where(mine_b, value, 0.0).to(tl.bfloat16), yb)
            # via fp32: Triton's interpreter would turn True into the bf16 with bits 1, not 1.0
            xa = tl.dot(xe, mine_a.to(tl.float32).to(tl.bfloat16), xa)
            xb = tl.dot(xe, mine_b.to(tl.float32).to(tl.bfloat16), xb)
        else:
            value = (entry & 0xFFFF0000).to(tl.float32, bitcast=True)[:, None]
            xe = xe.to(tl.float32)[:, :, None]
            terms_a = tl.where(mine_a[None, :, :], xe * (value - garbage_a[None, :])[None, :, :], 0.0)
            terms_b = tl.where(mine_b[None, :, :], xe * (value - garbage_b[None, :])[None, :, :], 0.0)
            ya += tl.sum(terms_a, axis=1)
            yb += tl.sum(terms_b, axis=1)
        e += chunk_step * EC
    if DOT:
        ya -= xa * garbage_a[None, :]
        yb -= xb * garbage_b[None, :]
    return ya, yb


@triton.jit
def finish(
    ya, yb, ca, cb, pair0, N, M, top_ptr, bias_ptr, y_ptr, stride_ym, m_idx,
    BP: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Store ``y`` for rows A (``2p``) and B (``2p + 1``) of pairs ``pair0 + [0, BP)``: the sums of
    ``x . w'`` (``ya``, ``yb``, ``[MB, BP]``) scaled per row, plus the escapes' terms (``ca``, ``cb``, from
    :func:`escape_sums`) and the bias."""
    rows_a, rows_b, mask_a, mask_b = pair_rows(pair0, N, BP)
    m_mask = m_idx < M
    ya = ya * row_scale(top_ptr, rows_a, mask_a)[None, :] + ca
    yb = yb * row_scale(top_ptr, rows_b, mask_b)[None, :] + cb
    if HAS_BIAS:
        ya += tl.load(bias_ptr + rows_a, mask=mask_a, other=0.0).to(tl.float32)[None, :]
        yb += tl.load(bias_ptr + rows_b, mask=mask_b, other=0.0).to(tl.float32)[None, :]
    out_a = y_ptr + m_idx[:, None] * stride_ym + rows_a[None, :]
    out_b = y_ptr + m_idx[:, None] * stride_ym + rows_b[None, :]
    tl.store(out_a, ya.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & mask_a[None, :])
    tl.store(out_b, yb.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & mask_b[None, :])


@triton.jit
def reduce_splits(
    ya, yb, ca, cb, pair0, N, M, ws_ptr, cnt_ptr, counter, split, n_splits, m_idx, BP: tl.constexpr
):
    """Split-K: store this split's partial sums, count the block in; the last one sums all splits.

    Protocol: every program of a block stores its ``[MB, 2 BP]`` partials to ``ws[split, m, row]`` and its
    share of the escape terms to ``ws[n_splits + split, m, row]``, waits at a CTA barrier (all its
    threads' stores issued), then one thread adds 1 to ``cnt[counter]`` with acquire-release semantics at
    GPU scope (publishing the stores). The program that reads ``n_splits - 1`` is the last: it reads every
    split's partials and escape terms (``.cg``: from L2, not a stale L1 line), sums each in split order
    (deterministic), stores 0 to the counter (ready for the next launch, no memset) and returns
    ``(ya, yb, ca, cb, True)``; the others return ``(..., False)`` and end.
    """
    rows_a, rows_b, exists_a, exists_b = pair_rows(pair0, N, BP)
    mask = (m_idx < M)[:, None]
    mask_a = mask & exists_a[None, :]
    mask_b = mask & exists_b[None, :]
    base = ws_ptr + m_idx[:, None] * N
    tl.store(base + split * M * N + rows_a[None, :], ya, mask=mask_a)
    tl.store(base + split * M * N + rows_b[None, :], yb, mask=mask_b)
    tl.store(base + (n_splits + split) * M * N + rows_a[None, :], ca, mask=mask_a)
    tl.store(base + (n_splits + split) * M * N + rows_b[None, :], cb, mask=mask_b)
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr + counter, 1, sem="acq_rel", scope="gpu")
    last = arrived == n_splits - 1
    if last:
        ya = tl.zeros_like(ya)
        yb = tl.zeros_like(yb)
        ca = tl.zeros_like(ca)
        cb = tl.zeros_like(cb)
        for s in range(n_splits):
            at = base + s * M * N
            ya += tl.load(at + rows_a[None, :], mask=mask_a, other=0.0, cache_modifier=".cg")
            yb += tl.load(at + rows_b[None, :], mask=mask_b, other=0.0, cache_modifier=".cg")
            at = base + (n_splits + s) * M * N
            ca += tl.load(at + rows_a[None, :], mask=mask_a, other=0.0, cache_modifier=".cg")
            cb += tl.load(at + rows_b[None, :], mask=mask_b, other=0.0, cache_modifier=".cg")
        tl.store(cnt_ptr + counter, 0)
    return ya, yb, ca, cb, last


@triton.jit
def store_result(
    ya, yb, ca, cb, pair0, N, M, top_ptr, bias_ptr, y_ptr, stride_ym, ws_ptr, cnt_ptr, counter, split,
    n_splits, m_idx, BP: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """A program's end: :func:`finish` directly, or with split-K through :func:`reduce_splits` (by the
    last program of the block only)."""
    if not SPLIT_K:
        finish(ya, yb, ca, cb, pair0, N, M, top_ptr, bias_ptr, y_ptr, stride_ym, m_idx, BP, HAS_BIAS)
    else:
        ya, yb, ca, cb, last = reduce_splits(
            ya, yb, ca, cb, pair0, N, M, ws_ptr, cnt_ptr, counter, split, n_splits, m_idx, BP
        )
        if last:
            finish(ya, yb, ca, cb, pair0, N, M, top_ptr, bias_ptr, y_ptr, stride_ym, m_idx, BP, HAS_BIAS)
