"""``y = x W^T (+ b)`` on tensor cores straight from ``fused12`` planes (skinny GEMM and prefill).

Each program owns ``BM`` rows of ``x`` and ``BP`` row pairs of ``W``; per step it decodes a ``[2 BP,
4 BW]`` weight tile in registers exactly like the GEMV (:func:`~offload_runtime.native.fused12_bits.
decode_scaled`), converts ``w'`` to bf16 (exact: ``w'`` has 8 significant bits), puts the columns in
natural order (``tl.join``) and multiplies it with the ``[BM, 4 BW]`` tile of ``x`` by ``tl.dot``
(fp32 accumulation), once for the A rows and once for the B rows of the pairs. So each weight is read
and decoded once per ``BM`` rows of ``x``: with ``BM = 16`` the batch 2..16 case pays one decode for up
to 16 rows; for prefill ``BM`` of 64-128 makes the decode a small part of the tile's work.

Split-K (grid axis 2) and the epilogue are those of the GEMV (``reduce_splits`` and ``finish`` of
:mod:`~offload_runtime.native.fused12_bits`).
``x`` must be bf16 (tensor cores multiply bf16 by bf16).

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
    escape_sums,
    k_range,
    load_words,
    split_workspace,
    store_result,
)
from offload_runtime.native.fused12_format import Planes
from offload_runtime.native.layout import cdiv
from offload_runtime.native.triton_launch import Launch

DOT_ESCAPE_CHUNK = 32  # escapes per step of the escape terms' fp32 dot (>= 16 for tl.dot)


@dataclass(frozen=True)
class DotConfig(TileConfig):
    """Tile and launch parameters of :func:`dot`: :class:`TileConfig`'s (``block_pairs >= 16``) and

    Attributes:
        block_m: rows of ``x`` per program (``BM``, >= 16).
    """

    block_pairs: int = 32
    block_words: int = 16
    block_m: int = 16


@triton.jit
def _natural(c0, c1, c2, c3, BW: tl.constexpr):
    """bf16 ``[R, 4 BW]`` tile with columns in natural order from the four column classes ``[R, BW]``."""
    # join stacks on a new last axis: (c0, c2) x (c1, c3) flattens to c0, c1, c2, c3
    joined = tl.join(
        tl.join(c0.to(tl.bfloat16), c2.to(tl.bfloat16)), tl.join(c1.to(tl.bfloat16), c3.to(tl.bfloat16))
    )
    return tl.reshape(joined, [c0.shape[0], 4 * BW])


@triton.jit
def _dot_kernel(
    x_ptr, sm_ptr, codes_ptr, top_ptr, esc_ptr_ptr, esc_ptr, bias_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, pitch, nwords, words_per_split, iters, n_splits, stride_xm, stride_ym, exp_xor,
    BM: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr, SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_N: tl.constexpr, EC: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    pair0 = pid_n * BP
    m_idx = pid_m * BM + tl.arange(0, BM)
    m_mask = m_idx < M
    x_rows = x_ptr + m_idx.to(tl.int64)[:, None] * stride_xm
    # escapes first: their dependent loads overlap other programs' streaming
    ca, cb = escape_sums(
        pair0, N, M, top_ptr, esc_ptr_ptr, esc_ptr, x_ptr, stride_xm, m_idx, split, n_splits,
        BM, BP, EC, True, SPLIT_K,
    )  # fmt: skip
    acc_a = tl.zeros([BM, BP], dtype=tl.float32)
    acc_b = tl.zeros([BM, BP], dtype=tl.float32)
    w_begin = split * words_per_split
    w_end = tl.minimum(w_begin + words_per_split, nwords)
    for i in range(iters):  # counted: see the GEMV kernel
        w0 = tl.multiple_of(w_begin + i * BW, BW)
        words = w0 + tl.arange(0, BW)
        cols = 4 * w0 + tl.arange(0, 4 * BW)
        c, sa, sb = load_words(codes_ptr, sm_ptr, pair0, N, pitch, words, w_end, BP, EVEN_K, EVEN_N, False)
        if EVEN_K:  # every split full and K a multiple of 4: no column mask
            xt = tl.load(x_rows + cols[None, :], mask=m_mask[:, None], other=0.0)
        else:
            mask_x = m_mask[:, None] & (cols < 4 * w_end)[None, :] & (cols < K)[None, :]
            xt = tl.load(x_rows + cols[None, :], mask=mask_x, other=0.0)
        a0, a1, a2, a3, b0, b1, b2, b3 = decode_scaled(sa, sb, c, exp_xor)
        acc_a = tl.dot(xt, tl.trans(_natural(a0, a1, a2, a3, BW)), acc_a)
        acc_b = tl.dot(xt, tl.trans(_natural(b0, b1, b2, b3, BW)), acc_b)
    store_result(
        acc_a, acc_b, ca, cb, pair0, N, M, top_ptr, bias_ptr, y_ptr, stride_ym, ws_ptr, cnt_ptr,
        pid_m * tl.num_programs(1) + pid_n, split, n_splits, m_idx, BP, HAS_BIAS, SPLIT_K,
    )  # fmt: skip


def workspace_needs(rows_x: int, planes: Planes, config: DotConfig) -> tuple[int, int]:
    """``(fp32 partial sums, int32 counters)`` the split-K workspace must hold for this call."""
    if config.split == 1:
        return 0, 0
    blocks = cdiv(rows_x, config.block_m) * cdiv((planes.rows + 1) // 2, config.block_pairs)
    return 2 * config.split * rows_x * planes.rows, blocks  # per split: partial sums and escape terms


def dot(
    x: torch.Tensor,
    planes: Planes,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: DotConfig = DotConfig(),
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Enqueue ``out = x @ W^T (+ bias)`` on the current stream (tensor cores, fp32 accumulation).

    Args:
        x (`torch.Tensor`): ``[M, K]`` bf16, rows contiguous.
        planes (`Planes`): the weight ``[N, K]``.
        out (`torch.Tensor`): ``[M, N]``, rows contiguous.
        bias (`torch.Tensor`, *optional*): ``[N]``.
        config (`DotConfig`): tiles, split-K, warps, stages.
        workspace (`tuple`, *optional*): as for :func:`offload_runtime.native.fused12_gemv_kernel.gemv`.
    """
    dot_launch(x, planes, out, bias, config, workspace).run()
    return out


def dot_launch(
    x: torch.Tensor,
    planes: Planes,
    out: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: DotConfig = DotConfig(),
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Launch:
    """The launch of :func:`dot` (same arguments), for
    :class:`~offload_runtime.native.triton_launch.LaunchCache`: its per-call objects are ``x`` and ``out``."""
    rows_x, cols = x.shape
    if x.dtype != torch.bfloat16 or cols != planes.cols or x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError(f"dot takes bf16 x [M, {planes.cols}] and out with contiguous rows")
    if config.block_m < 16 or config.block_pairs < 16 or config.block_words < 4:
        raise ValueError(f"tl.dot needs block_m, block_pairs >= 16 and block_words >= 4, got {config}")
    k = k_range(cols, config.block_words, config.split)
    config = dataclasses.replace(config, split=k.split)  # a split past the end would have no words
    partials, counters = split_workspace(workspace_needs(rows_x, planes, config), workspace, k.split, out)
    grid = (
        cdiv(rows_x, config.block_m),
        cdiv((planes.rows + 1) // 2, config.block_pairs),
        k.split,
    )
    args = (
        x, planes.sm, planes.codes, planes.top, planes.esc_ptr, planes.esc,
        bias if bias is not None else out, out, partials, counters,
        rows_x, planes.rows, cols, planes.pitch, k.nwords, k.words_per_split, k.iters, k.split,
        x.stride(0), out.stride(0), SCALED_EXP_XOR,
    )  # fmt: skip
    constexprs = dict(
        BM=config.block_m, BP=config.block_pairs, BW=config.block_words, SPLIT_K=k.split > 1,
        EVEN_K=k.even and cols % 4 == 0, EVEN_N=planes.rows % (2 * config.block_pairs) == 0,
        EC=DOT_ESCAPE_CHUNK, HAS_BIAS=bias is not None,
    )  # fmt: skip
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return Launch(_dot_kernel, grid, args, constexprs, options, (x, out))
