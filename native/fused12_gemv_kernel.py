"""``y = x W^T (+ b)`` for 1 to 8 rows of ``x`` straight from ``fused12`` planes (decode-phase GEMV).

Each program owns ``BP`` row pairs (``2 BP`` output features) and one K-split; per step it loads ``BW``
words of the pair's code plane and of both rows' ``sm`` plane (16-byte loads), decodes them to ``w'`` in
registers (:func:`~offload_runtime.native.fused12_bits.decode_scaled`: on sm_90, 2.1 integer and 1.8
FMA-pipe instructions per weight, FMA with x included, ``bench/fused_kernels_NOTES.md``) and accumulates
``x . w'`` with one fp32 FMA per weight into a ``[BP, BW]`` (``[MB, BP, BW]`` for several rows of x)
register tile per row class, so the reduction across the tile happens once, after the loop. Triton does
not pipeline these loads (they feed no ``tl.dot``): the other programs resident on the SM hide latency.
``x`` is loaded per step in the same column order as the words (``x[4j + i]``), either as four strided
loads or, when it is bf16 with rows of a multiple of 4 elements (``X_WORDS``), as one 8-byte word per 4
columns split with the same shift/mask as the weights.

Split-K (grid axis 1) lets a tall, skinny weight (N=8192, K=28672) fill every SM; the splits' partial sums
meet in a workspace (:func:`~offload_runtime.native.fused12_bits.reduce_splits`). The epilogue scales
each row, adds its escapes and the bias (:func:`~offload_runtime.native.fused12_bits.finish`).

Escapes: by default a program sums its block's escape terms (its split's share of them) before its main
loop, where their chain of dependent loads (row pointers, entries, ``x`` at their columns: three round
trips to memory) waits while the SM streams other programs' weights. When the grid is small (a k/v
projection: 32 row blocks), every program is in the first wave and that chain sits on each program's
critical path; there ``escape_program=1`` gives each block one extra program (the last index of axis 1)
that sums the escapes while the others stream and hands them to the reduction as its "partial" (the H200
sweep of 2026-11-30: k/v projections 16-30 % faster, 70 B k/v 8.6 us against cuBLAS's 8.7; some large
grids 10-20 % slower).

The oracle its tests use: the exactly decoded weight, multiplied in fp32 by torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from offload_runtime.native.fused12_bits import (
    SCALED_EXP_XOR,
    TileConfig,
    decode_scaled,
    escape_chunk,
    escape_sums,
    k_range,
    load_words,
    split_workspace,
    store_result,
)
from offload_runtime.native.fused12_format import Planes
from offload_runtime.native.layout import cdiv
from offload_runtime.native.triton_launch import Launch

MAX_ROWS = 8  # rows of x this kernel takes (its register tile grows with them)


@dataclass(frozen=True)
class GemvConfig(TileConfig):
    """Tile and launch parameters of :func:`gemv`: :class:`TileConfig`'s and

    Attributes:
        escape_program: with split-K, 1 gives each row block one more program that sums its escapes while
            the others stream (faster for small grids: k/v projections), 0 shares them out among the
            splits' prologues (faster for large grids, where other programs hide that chain).
    """

    escape_program: int = 0


@triton.jit
def _x_columns(x_ptr, x64_ptr, m_idx, m_mask, stride_xm, words, word_mask, K, X_WORDS: tl.constexpr):
    """fp32 ``x[m, 4j + i]`` for i = 0..3, each ``[MB, BW]`` (``word_mask``: ``[MB, BW]`` or ``[MB, 1]``)."""
    if X_WORDS:  # bf16 x: one 8-byte word holds columns 4j..4j+3, split like a weight pair
        xw = tl.load(x64_ptr + m_idx[:, None] * (stride_xm // 4) + words[None, :], mask=word_mask, other=0)
        lo = xw.to(tl.uint32)
        hi = (xw >> 32).to(tl.uint32)
        x0 = (lo << 16).to(tl.float32, bitcast=True)
        x1 = (lo & 0xFFFF0000).to(tl.float32, bitcast=True)
        x2 = (hi << 16).to(tl.float32, bitcast=True)
        x3 = (hi & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        base = x_ptr + m_idx[:, None] * stride_xm + 4 * words[None, :]
        cols = 4 * words[None, :]
        row_ok = m_mask[:, None]
        x0 = tl.load(base, mask=row_ok & (cols < K), other=0.0).to(tl.float32)
        x1 = tl.load(base + 1, mask=row_ok & (cols + 1 < K), other=0.0).to(tl.float32)
        x2 = tl.load(base + 2, mask=row_ok & (cols + 2 < K), other=0.0).to(tl.float32)
        x3 = tl.load(base + 3, mask=row_ok & (cols + 3 < K), other=0.0).to(tl.float32)
    return x0, x1, x2, x3


@triton.jit
def _fma4(acc, w0, w1, w2, w3, x0, x1, x2, x3):
    acc = tl.fma(w0, x0, acc)
    acc = tl.fma(w1, x1, acc)
    acc = tl.fma(w2, x2, acc)
    return tl.fma(w3, x3, acc)


@triton.jit
def _gemv_kernel(
    x_ptr, x64_ptr, sm_ptr, codes_ptr, top_ptr, esc_ptr_ptr, esc_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, pitch, nwords, words_per_split, iters, n_splits, stride_xm, stride_ym, exp_xor,
    MB: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, EC: tl.constexpr, HAS_BIAS: tl.constexpr,
    X_WORDS: tl.constexpr, ESC_PROGRAM: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pair0 = pid_n * BP
    m_idx = tl.arange(0, MB)
    m_mask = m_idx < M
    if ESC_PROGRAM:  # the block's last program sums its escapes and streams no weight (see the module doc)
        escapes_here = split == n_splits - 1
        ca = tl.zeros([MB, BP], dtype=tl.float32)
        cb = tl.zeros([MB, BP], dtype=tl.float32)
        if escapes_here:
            ca, cb = escape_sums(
                pair0, N, M, top_ptr, esc_ptr_ptr, esc_ptr, x_ptr, stride_xm, m_idx, 0, 1,
                MB, BP, EC, False, False,
            )  # fmt: skip
        iters = tl.where(escapes_here, 0, iters)
    else:  # escapes first: their dependent loads overlap other programs' streaming
        ca, cb = escape_sums(
            pair0, N, M, top_ptr, esc_ptr_ptr, esc_ptr, x_ptr, stride_xm, m_idx, split, n_splits,
            MB, BP, EC, False, SPLIT_K,
        )  # fmt: skip
    if MB == 1:  # one row of x: 2-D accumulators, x broadcast along the tile's rows
        acc_a = tl.zeros([BP, BW], dtype=tl.float32)
        acc_b = tl.zeros([BP, BW], dtype=tl.float32)
    else:
        acc_a = tl.zeros([MB, BP, BW], dtype=tl.float32)
        acc_b = tl.zeros([MB, BP, BW], dtype=tl.float32)
    w_begin = split * words_per_split
    w_end = tl.minimum(w_begin + words_per_split, nwords)
    # a counted loop (iters is an argument): the compiler sees w0's alignment (16-byte loads)
    for i in range(iters):
        w0 = tl.multiple_of(w_begin + i * BW, BW)
        words = w0 + tl.arange(0, BW)
        c, sa, sb = load_words(codes_ptr, sm_ptr, pair0, N, pitch, words, w_end, BP, EVEN_K, EVEN_N, MB > 1)
        mask_x = m_mask[:, None] if EVEN_K else m_mask[:, None] & (words < w_end)[None, :]
        x0, x1, x2, x3 = _x_columns(x_ptr, x64_ptr, m_idx, m_mask, stride_xm, words, mask_x, K, X_WORDS)
        a0, a1, a2, a3, b0, b1, b2, b3 = decode_scaled(sa, sb, c, exp_xor)
        # one FMA per weight into the accumulator (a sum of four products first would cost a mul and an add)
        if MB > 1:
            x0 = x0[:, None, :]
            x1 = x1[:, None, :]
            x2 = x2[:, None, :]
            x3 = x3[:, None, :]
        acc_a = _fma4(acc_a, a0, a1, a2, a3, x0, x1, x2, x3)
        acc_b = _fma4(acc_b, b0, b1, b2, b3, x0, x1, x2, x3)
    if MB == 1:
        ya = tl.sum(acc_a, axis=1)[None, :]
        yb = tl.sum(acc_b, axis=1)[None, :]
    else:
        ya = tl.sum(acc_a, axis=2)
        yb = tl.sum(acc_b, axis=2)
    store_result(
        ya, yb, ca, cb, pair0, N, M, top_ptr, bias_ptr, y_ptr, stride_ym, ws_ptr, cnt_ptr, pid_n, split,
        n_splits, m_idx, BP, HAS_BIAS, SPLIT_K,
    )  # fmt: skip


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def workspace_needs(rows_x: int, planes: Planes, config: GemvConfig) -> tuple[int, int]:
    """``(fp32 partial sums, int32 counters)`` the split-K workspace must hold for this call."""
    if config.split == 1:
        return 0, 0
    programs = config.split + (1 if config.escape_program else 0)  # the splits and the escapes' program
    partials = 2 * programs * rows_x * planes.rows  # per program: partial sums and escape terms
    return partials, cdiv((planes.rows + 1) // 2, config.block_pairs)


def gemv(
    x: torch.Tensor,
    planes: Planes,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig = GemvConfig(),
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Enqueue ``out = x @ W^T (+ bias)`` on the current stream.

    Args:
        x (`torch.Tensor`): ``[M, K]`` with ``M <= 8``, rows contiguous (any float dtype).
        planes (`Planes`): the weight ``[N, K]``.
        out (`torch.Tensor`): ``[M, N]``, rows contiguous; gets ``x``'s dtype values.
        bias (`torch.Tensor`, *optional*): ``[N]``.
        config (`GemvConfig`): tiles, split-K, warps, stages.
        workspace (`tuple`, *optional*): ``(fp32 partials, int32 counters, all 0)`` of at least
            :func:`workspace_needs`; required when ``config.split > 1``. The counters are 0 again when
            the kernel ends, so one workspace serves every call in stream order.
    """
    gemv_launch(x, planes, out, bias, config, workspace).run()
    return out


def _x_words(x: torch.Tensor) -> bool:
    """bf16 ``x`` whose rows load as 8-byte words (4 columns each)."""
    bf16 = x.dtype == torch.bfloat16
    return bf16 and x.shape[1] % 4 == 0 and x.stride(0) % 4 == 0 and x.data_ptr() % 8 == 0


def gemv_launch(
    x: torch.Tensor,
    planes: Planes,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig = GemvConfig(),
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Launch:
    """The launch of :func:`gemv` (same arguments), for
    :class:`~offload_runtime.native.triton_launch.LaunchCache`: its per-call objects are ``x``, its 8-byte
    word view (or ``x``) and ``out``."""
    rows_x, cols = x.shape
    if rows_x > MAX_ROWS or cols != planes.cols or x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError(f"gemv takes x [<= {MAX_ROWS}, {planes.cols}] and out with contiguous rows")
    k = k_range(cols, config.block_words, config.split)
    config = dataclasses.replace(config, split=k.split)  # a split past the end would have no words
    partials, counters = split_workspace(workspace_needs(rows_x, planes, config), workspace, k.split, out)
    x64 = x.view(torch.int64) if _x_words(x) else x
    own_program = bool(config.escape_program) and k.split > 1
    programs = k.split + 1 if own_program else k.split
    grid = (cdiv((planes.rows + 1) // 2, config.block_pairs), programs)
    args = (
        x, x64, planes.sm, planes.codes, planes.top, planes.esc_ptr, planes.esc,
        bias if bias is not None else out, out, partials, counters,
        rows_x, planes.rows, cols, planes.pitch, k.nwords, k.words_per_split, k.iters, programs,
        x.stride(0), out.stride(0), SCALED_EXP_XOR,
    )  # fmt: skip
    constexprs = dict(
        MB=_next_pow2(rows_x), BP=config.block_pairs, BW=config.block_words, SPLIT_K=k.split > 1,
        EVEN_K=k.even, EVEN_N=planes.rows % (2 * config.block_pairs) == 0,
        EC=escape_chunk(_next_pow2(rows_x), config.block_pairs), HAS_BIAS=bias is not None,
        X_WORDS=x64 is not x, ESC_PROGRAM=own_program,
    )  # fmt: skip
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return Launch(_gemv_kernel, grid, args, constexprs, options, (x, x64, out))
