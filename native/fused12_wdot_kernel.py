"""``y = x W^T (+ b)`` for 2 to 16 rows of ``x`` on tensor cores, the weight as the left operand.

The skinny-batch case (decoding 2..16 sequences) is memory-bound like batch 1, but an FMA GEMV pays one
FMA per weight *per row* of ``x`` (8 at batch 8: the SMs' issue budget, not HBM, sets the speed), and
:mod:`~offload_runtime.native.fused12_dot_kernel` puts the decoded weight on the *right* of ``tl.dot``:
joined to natural column order, transposed, so the tile goes through shared memory every step.

Here each program computes ``y^T`` for ``2 BP`` output features: ``acc [BP, 16] += w' [BP, BW] @ x_q^T
[BW, 16]`` per column class ``q`` (columns ``4j + q`` of the step's words ``j``), once for rows A and once
for rows B of its row pairs: 8 products per step, no join, no transpose, the decoded tile in the left
operand's registers. The order of the columns within the reduction is the words' (``q`` outer), which only
changes the summation order; ``x`` is loaded in the same order. The weight tiles are bf16 straight from the
decoded pairs (``w'`` has 8 significant bits: exact), and products accumulate in fp32 (tensor cores).

``x`` is loaded as one 8-byte word per 4 columns and row when its layout allows (bf16 rows of a multiple
of 4 elements, 8-byte aligned: coalesced, a quarter of the load instructions of 2-byte gathers), split
into the four classes with shifts. ``x`` rows beyond ``M`` are masked to 0 (the product's N is 16, tensor
cores' minimum in Triton). The escapes, split-K and the epilogue are the tile kernel's
(:mod:`~offload_runtime.native.fused12_bits`), on ``y = acc^T``.

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
    escape_sums,
    k_range,
    load_words,
    rotl8,
    rotr8,
    scaled_bits,
    split_workspace,
    store_result,
)
from offload_runtime.native.fused12_format import Planes
from offload_runtime.native.fused12_gemv_kernel import _x_words
from offload_runtime.native.layout import cdiv
from offload_runtime.native.triton_launch import Launch

ROWS = 16  # rows of x per program: the product's N (tl.dot's minimum)
WDOT_ESCAPE_CHUNK = 32  # as the tile kernel's (>= 16 for the escape terms' tl.dot)


@dataclass(frozen=True)
class WdotConfig(TileConfig):
    """Tile and launch parameters of :func:`wdot` (:class:`TileConfig`'s; ``block_pairs``,
    ``block_words >= 16``).

    Attributes:
        prefetch: 1 loads the next step's words and ``x`` before this step's decode and products (a
            software pipeline by hand: Triton pipelines only loads that feed ``tl.dot`` directly, and
            Nsight Compute found this kernel waiting on its loads; it costs a second set of registers).
    """

    block_pairs: int = 64
    block_words: int = 16
    prefetch: int = 0


@triton.jit
def _scaled_bf16(s, c, exp_xor):
    """bf16 ``w'`` of lanes 0 and 1 of a pair (:func:`~offload_runtime.native.fused12_bits.scaled_bits`),
    as two tiles."""
    p = scaled_bits(s, c, exp_xor)
    lo = p.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    hi = (p >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return lo, hi


@triton.jit
def _x_tiles(x_cols, x64_rows, words, w_end, K, m_mask, X_WORDS: tl.constexpr, EVEN_K: tl.constexpr):
    """The four column classes of ``x`` for a step's words, ``[BW, 16]`` bf16 each."""
    at = x_cols + 4 * words[:, None]
    if X_WORDS:  # one coalesced 8-byte word per (word j, row m): columns 4j..4j+3, split by shifts
        xw = tl.load(x64_rows + words[:, None], mask=m_mask[None, :] & (words < w_end)[:, None], other=0)
        x0 = xw.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        x1 = (xw >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        x2 = (xw >> 32).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        x3 = (xw >> 48).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    elif EVEN_K:  # every split full and K a multiple of 4: rows are the only mask
        x0 = tl.load(at, mask=m_mask[None, :], other=0.0)
        x1 = tl.load(at + 1, mask=m_mask[None, :], other=0.0)
        x2 = tl.load(at + 2, mask=m_mask[None, :], other=0.0)
        x3 = tl.load(at + 3, mask=m_mask[None, :], other=0.0)
    else:
        mask_x = m_mask[None, :] & (words < w_end)[:, None]
        x0 = tl.load(at, mask=mask_x & (4 * words < K)[:, None], other=0.0)
        x1 = tl.load(at + 1, mask=mask_x & (4 * words + 1 < K)[:, None], other=0.0)
        x2 = tl.load(at + 2, mask=mask_x & (4 * words + 2 < K)[:, None], other=0.0)
        x3 = tl.load(at + 3, mask=mask_x & (4 * words + 3 < K)[:, None], other=0.0)
    return x0, x1, x2, x3


@triton.jit
def _products(acc_a, acc_b, c, sa, sb, x0, x1, x2, x3, exp_xor):
    """One step: decode the words into ``w'`` tiles (rows A and B, four column classes) and accumulate
    their 8 products with ``x``."""
    a0, a1 = _scaled_bf16(sa, c, exp_xor)
    a2, a3 = _scaled_bf16(rotr8(sa), c << 4, exp_xor)
    b0, b1 = _scaled_bf16(sb, c >> 4, exp_xor)
    b2, b3 = _scaled_bf16(rotr8(sb), rotl8(c), exp_xor)
    acc_a = tl.dot(a0, x0, acc_a)
    acc_a = tl.dot(a1, x1, acc_a)
    acc_a = tl.dot(a2, x2, acc_a)
    acc_a = tl.dot(a3, x3, acc_a)
    acc_b = tl.dot(b0, x0, acc_b)
    acc_b = tl.dot(b1, x1, acc_b)
    acc_b = tl.dot(b2, x2, acc_b)
    acc_b = tl.dot(b3, x3, acc_b)
    return acc_a, acc_b


@triton.jit
def _wdot_kernel(
    x_ptr, x64_ptr, sm_ptr, codes_ptr, top_ptr, esc_ptr_ptr, esc_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, pitch, nwords, words_per_split, iters, n_splits, stride_xm, stride_ym, exp_xor,
    BP: tl.constexpr, BW: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr, EC: tl.constexpr, HAS_BIAS: tl.constexpr, X_WORDS: tl.constexpr,
    PREFETCH: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pair0 = pid_n * BP
    m_idx = tl.arange(0, 16)
    m_mask = m_idx < M
    # escapes first: their dependent loads overlap other programs' streaming
    ca, cb = escape_sums(
        pair0, N, M, top_ptr, esc_ptr_ptr, esc_ptr, x_ptr, stride_xm, m_idx, split, n_splits,
        16, BP, EC, True, SPLIT_K,
    )  # fmt: skip
    acc_a = tl.zeros([BP, 16], dtype=tl.float32)
    acc_b = tl.zeros([BP, 16], dtype=tl.float32)
    w_begin = split * words_per_split
    w_end = tl.minimum(w_begin + words_per_split, nwords)
    x_cols = x_ptr + m_idx[None, :] * stride_xm
    x64_rows = x64_ptr + m_idx[None, :] * (stride_xm // 4)
    if PREFETCH:  # step i + 1's loads are issued before step i's decode and products (the last one peeled)
        words = tl.multiple_of(w_begin, BW) + tl.arange(0, BW)
        c, sa, sb = load_words(codes_ptr, sm_ptr, pair0, N, pitch, words, w_end, BP, EVEN_K, EVEN_N, False)
        x0, x1, x2, x3 = _x_tiles(x_cols, x64_rows, words, w_end, K, m_mask, X_WORDS, EVEN_K)
        for i in range(iters - 1):
            words = tl.multiple_of(w_begin + (i + 1) * BW, BW) + tl.arange(0, BW)
            cn, san, sbn = load_words(
                codes_ptr, sm_ptr, pair0, N, pitch, words, w_end, BP, EVEN_K, EVEN_N, False
            )  # fmt: skip
            xn0, xn1, xn2, xn3 = _x_tiles(x_cols, x64_rows, words, w_end, K, m_mask, X_WORDS, EVEN_K)
            acc_a, acc_b = _products(acc_a, acc_b, c, sa, sb, x0, x1, x2, x3, exp_xor)
            c, sa, sb, x0, x1, x2, x3 = cn, san, sbn, xn0, xn1, xn2, xn3
        acc_a, acc_b = _products(acc_a, acc_b, c, sa, sb, x0, x1, x2, x3, exp_xor)
    else:
        for i in range(iters):  # counted: see the GEMV kernel
            w0 = tl.multiple_of(w_begin + i * BW, BW)
            words = w0 + tl.arange(0, BW)
            c, sa, sb = load_words(
                codes_ptr, sm_ptr, pair0, N, pitch, words, w_end, BP, EVEN_K, EVEN_N, False
            )  # fmt: skip
            x0, x1, x2, x3 = _x_tiles(x_cols, x64_rows, words, w_end, K, m_mask, X_WORDS, EVEN_K)
            acc_a, acc_b = _products(acc_a, acc_b, c, sa, sb, x0, x1, x2, x3, exp_xor)
    store_result(
        tl.trans(acc_a), tl.trans(acc_b), ca, cb, pair0, N, M, top_ptr, bias_ptr, y_ptr, stride_ym, ws_ptr,
        cnt_ptr, pid_n, split, n_splits, m_idx, BP, HAS_BIAS, SPLIT_K,
    )  # fmt: skip


def workspace_needs(rows_x: int, planes: Planes, config: WdotConfig) -> tuple[int, int]:
    """``(fp32 partial sums, int32 counters)`` the split-K workspace must hold for this call."""
    if config.split == 1:
        return 0, 0
    return 2 * config.split * rows_x * planes.rows, cdiv((planes.rows + 1) // 2, config.block_pairs)


def wdot(
    x: torch.Tensor,
    planes: Planes,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: WdotConfig = WdotConfig(),
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Enqueue ``out = x @ W^T (+ bias)`` on the current stream (tensor cores, fp32 accumulation).

    Args:
        x (`torch.Tensor`): ``[M, K]`` bf16 with ``M <= 16``, rows contiguous.
        planes (`Planes`): the weight ``[N, K]``.
        out (`torch.Tensor`): ``[M, N]``, rows contiguous.
        bias (`torch.Tensor`, *optional*): ``[N]``.
        config (`WdotConfig`): tiles, split-K, warps, stages.
        workspace (`tuple`, *optional*): as for :func:`offload_runtime.native.fused12_gemv_kernel.gemv`.
    """
    wdot_launch(x, planes, out, bias, config, workspace).run()
    return out


def wdot_launch(
    x: torch.Tensor,
    planes: Planes,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: WdotConfig = WdotConfig(),
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Launch:
    """The launch of :func:`wdot` (same arguments), for
    :class:`~offload_runtime.native.triton_launch.LaunchCache`: its per-call objects are ``x``, its 8-byte
    word view (or ``x``) and ``out``."""
    rows_x, cols = x.shape
    if rows_x > ROWS or x.dtype != torch.bfloat16 or cols != planes.cols or x.stride(1) != 1:
        raise ValueError(f"wdot takes bf16 x [<= {ROWS}, {planes.cols}] with contiguous rows")
    if out.stride(1) != 1:
        raise ValueError("wdot takes out with contiguous rows")
    if config.block_pairs < 16 or config.block_words < 16:
        raise ValueError(f"tl.dot needs block_pairs and block_words >= 16, got {config}")
    k = k_range(cols, config.block_words, config.split)
    config = dataclasses.replace(config, split=k.split)  # a split past the end would have no words
    partials, counters = split_workspace(workspace_needs(rows_x, planes, config), workspace, k.split, out)
    grid = (cdiv((planes.rows + 1) // 2, config.block_pairs), k.split)
    x64 = x.view(torch.int64) if _x_words(x) else x
    args = (
        x, x64, planes.sm, planes.codes, planes.top, planes.esc_ptr, planes.esc,
        bias if bias is not None else out, out, partials, counters,
        rows_x, planes.rows, cols, planes.pitch, k.nwords, k.words_per_split, k.iters, k.split,
        x.stride(0), out.stride(0), SCALED_EXP_XOR,
    )  # fmt: skip
    constexprs = dict(
        BP=config.block_pairs, BW=config.block_words, SPLIT_K=k.split > 1,
        EVEN_K=k.even and cols % 4 == 0, EVEN_N=planes.rows % (2 * config.block_pairs) == 0,
        EC=WDOT_ESCAPE_CHUNK, HAS_BIAS=bias is not None, X_WORDS=x64 is not x,
        PREFETCH=bool(config.prefetch) and k.iters > 1,
    )  # fmt: skip
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return Launch(_wdot_kernel, grid, args, constexprs, options, (x, x64, out))
