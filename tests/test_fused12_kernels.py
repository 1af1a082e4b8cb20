"""The ``fused12`` Triton kernels against the torch reference, on shapes that divide no tile size.

On a machine without CUDA they run under Triton's interpreter (``triton_cpu``), so they are small; with
CUDA the same tests run the compiled kernels. The decode kernel must be bit-exact; the matmul kernels
must match an fp32 matmul of the exactly decoded weight up to summation order.
"""

from __future__ import annotations

import pytest
import torch
import triton_cpu  # selects the interpreter before the kernel modules below are imported

pytestmark = pytest.mark.skipif(not triton_cpu.AVAILABLE, reason="triton is not installed")

if triton_cpu.AVAILABLE:
    from offload_runtime.native import fused12_format as fmt
    from offload_runtime.native.fused12_decode_kernel import decode_into
    from offload_runtime.native.fused12_dot_kernel import DotConfig, dot
    from offload_runtime.native.fused12_dot_kernel import workspace_needs as dot_needs
    from offload_runtime.native.fused12_gemv_kernel import GemvConfig, gemv
    from offload_runtime.native.fused12_gemv_kernel import workspace_needs as gemv_needs
    from offload_runtime.native.fused12_wdot_kernel import WdotConfig, wdot
    from offload_runtime.native.fused12_wdot_kernel import workspace_needs as wdot_needs

DEVICE = triton_cpu.DEVICE


def _weight(rows: int, cols: int, seed: int, specials: bool = True) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(rows, cols, generator=generator) * 0.02).bfloat16()
    if specials and weight.numel() >= 8:
        flat = weight.view(-1)
        flat[0] = 0.0
        flat[3] = -0.0
        flat[5] = 1e-40  # subnormal
        flat[-1] = 3.0  # an outlier far above the row's window
    return weight.to(DEVICE)


def _workspace(need: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    partials = torch.zeros(max(need[0], 1), device=DEVICE)
    return partials, torch.zeros(max(need[1], 1), dtype=torch.int32, device=DEVICE)


def _assert_matmul_close(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias) -> None:
    """fp32 output within summation-order error of the fp32 matmul of the exact weight."""
    reference = x.float() @ weight.float().T + (bias.float() if bias is not None else 0)
    magnitude = x.float().abs() @ weight.float().abs().T + (bias.float().abs() if bias is not None else 0)
    error = (out.float() - reference).abs()
    assert torch.all(error <= magnitude * 2.0**-20 + 1e-30), float((error - magnitude * 2.0**-20).max())


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (7, 5), (33, 130), (3, 257), (6, 16)])
def test_decode_kernel_is_bit_exact(rows, cols):
    weight = _weight(rows, cols, seed=rows * 1000 + cols)
    if weight.numel() >= 8:
        weight.view(-1)[1] = float("nan")
        weight.view(-1)[2] = float("-inf")
        weight.view(-1)[4] = torch.tensor(0xFFC1, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    planes = fmt.encode(weight)
    out = torch.full((rows, cols), 3.0, dtype=torch.bfloat16, device=DEVICE)  # every element overwritten
    decode_into(planes, out, block_pairs=4, block_words=8)
    assert torch.equal(out.view(torch.int16), weight.view(torch.int16))


GEMV_CASES = [
    # rows, cols, M, split, bias, x dtype
    (1, 1, 1, 1, False, torch.bfloat16),
    (7, 5, 3, 1, True, torch.bfloat16),
    (33, 130, 1, 2, True, torch.bfloat16),  # odd N, K not a multiple of 4
    (64, 200, 8, 3, False, torch.bfloat16),  # x as 8-byte words (K % 4 == 0)
    (8, 64, 2, 2, False, torch.bfloat16),  # every split full: unmasked loads, the escapes' program reads none
    (5, 257, 2, 4, True, torch.float32),
    (16, 64, 5, 1, False, torch.float32),
]


@pytest.mark.parametrize("escape_program", [0, 1])
@pytest.mark.parametrize(("rows", "cols", "m", "split", "with_bias", "dtype"), GEMV_CASES)
def test_gemv_matches_the_reference(rows, cols, m, split, with_bias, dtype, escape_program):
    weight = _weight(rows, cols, seed=rows + cols)
    planes = fmt.encode(weight)
    x = torch.randn(m, cols, device=DEVICE).to(dtype)
    bias = torch.randn(rows, device=DEVICE).bfloat16() if with_bias else None
    config = GemvConfig(block_pairs=4, block_words=8, split=split, escape_program=escape_program)
    workspace = _workspace(gemv_needs(m, planes, config))
    out = torch.full((m, rows), 7.0, device=DEVICE)  # fp32 output: only the summation order may differ
    gemv(x, planes, out, bias, config, workspace)
    _assert_matmul_close(out, x, weight, bias)
    assert int(workspace[1].abs().sum()) == 0  # split-K counters re-armed for the next call


DOT_CASES = [
    (1, 1, 1, 1, False),
    (10, 64, 20, 2, True),  # every split full (EVEN_K: no column masks)
    (7, 5, 3, 1, True),
    (33, 130, 17, 2, True),
    (64, 200, 40, 1, False),
    (5, 257, 2, 4, True),
]


@pytest.mark.parametrize(("rows", "cols", "m", "split", "with_bias"), DOT_CASES)
def test_dot_matches_the_reference(rows, cols, m, split, with_bias):
    weight = _weight(rows, cols, seed=3 * rows + cols)
    planes = fmt.encode(weight)
    x = torch.randn(m, cols, device=DEVICE).bfloat16()
    bias = torch.randn(rows, device=DEVICE).bfloat16() if with_bias else None
    config = DotConfig(block_m=16, block_pairs=16, block_words=8, split=split)
    workspace = _workspace(dot_needs(m, planes, config))
    out = torch.full((m, rows), 7.0, device=DEVICE)
    dot(x, planes, out, bias, config, workspace)
    _assert_matmul_close(out, x, weight, bias)
    assert int(workspace[1].abs().sum()) == 0


WDOT_CASES = [
    (1, 1, 1, 1, False),
    (64, 128, 2, 2, True),  # every split full (EVEN_K), N a multiple of the tile (EVEN_N)
    (7, 5, 3, 1, True),
    (33, 130, 16, 2, True),  # odd N, K not a multiple of 4
    (70, 300, 8, 3, False),
    (5, 257, 5, 4, True),
]


WDOT_PREFETCH_CASES = [  # several steps per split: the prefetching loop runs, then its peeled last step
    (70, 300, 8, 1, False, 1),  # 5 steps, K not a multiple of the step
    (64, 256, 4, 2, True, 1),  # 2 steps per split, every split full
    (33, 520, 16, 3, True, 1),  # 3 steps per split, the last split short
]


@pytest.mark.parametrize(
    ("rows", "cols", "m", "split", "with_bias", "prefetch"),
    [(*case, 0) for case in WDOT_CASES] + WDOT_PREFETCH_CASES,
)
def test_wdot_matches_the_reference(rows, cols, m, split, with_bias, prefetch):
    weight = _weight(rows, cols, seed=5 * rows + cols)
    planes = fmt.encode(weight)
    x = torch.randn(m, cols, device=DEVICE).bfloat16()
    bias = torch.randn(rows, device=DEVICE).bfloat16() if with_bias else None
    config = WdotConfig(block_pairs=16, block_words=16, split=split, prefetch=prefetch)
    workspace = _workspace(wdot_needs(m, planes, config))
    out = torch.full((m, rows), 7.0, device=DEVICE)
    wdot(x, planes, out, bias, config, workspace)
    _assert_matmul_close(out, x, weight, bias)
    assert int(workspace[1].abs().sum()) == 0


def test_wdot_refuses_more_rows_than_one_product():
    planes = fmt.encode(_weight(8, 64, seed=1))
    with pytest.raises(ValueError, match="<= 16"):
        wdot(torch.randn(17, 64, device=DEVICE).bfloat16(), planes, torch.empty(17, 8, device=DEVICE))


def _matmul(kernel, x, planes, out, split=1):
    """``out = x W^T`` by ``kernel`` with small tiles (and a workspace when split)."""
    if kernel in ("gemv", "gemv+escape_program"):
        config = GemvConfig(block_pairs=4, block_words=8, split=split, escape_program=int(kernel != "gemv"))
        gemv(x, planes, out, None, config, _workspace(gemv_needs(x.shape[0], planes, config)))
    elif kernel == "dot":
        config = DotConfig(block_m=16, block_pairs=16, block_words=8, split=split)
        dot(x, planes, out, None, config, _workspace(dot_needs(x.shape[0], planes, config)))
    else:
        config = WdotConfig(block_pairs=16, block_words=16, split=split)
        wdot(x, planes, out, None, config, _workspace(wdot_needs(x.shape[0], planes, config)))


def test_bf16_output_is_the_rounded_fp32_result():
    weight = _weight(9, 40, seed=5)
    planes = fmt.encode(weight)
    x = torch.randn(2, 40, device=DEVICE).bfloat16()
    out = torch.empty(2, 9, dtype=torch.bfloat16, device=DEVICE)
    gemv(x, planes, out, None, GemvConfig(block_pairs=4, block_words=8))
    reference = x.float() @ weight.float().T
    ulp = torch.exp2(torch.floor(torch.log2(reference.abs().clamp_min(1e-30))) - 7)
    assert torch.all((out.float() - reference).abs() <= ulp)  # the interpreter truncates, the GPU rounds


@pytest.mark.parametrize("kernel", ["gemv", "dot", "wdot"])
def test_non_finite_weights_propagate_like_a_matmul(kernel):
    weight = _weight(6, 24, seed=11, specials=False)
    weight[1, 3] = float("inf")
    weight[4, 20] = float("nan")
    planes = fmt.encode(weight)
    x = torch.randn(3, 24, device=DEVICE).bfloat16()
    out = torch.empty(3, 6, device=DEVICE)
    _matmul(kernel, x, planes, out)
    reference = x.float() @ weight.float().T
    assert torch.equal(torch.isnan(out), torch.isnan(reference))
    assert torch.equal(torch.isinf(out), torch.isinf(reference))
    finite_rows = [0, 2, 3, 5]
    _assert_matmul_close(out[:, finite_rows], x, weight[finite_rows], None)


def test_split_k_without_a_workspace_is_refused():
    planes = fmt.encode(_weight(8, 64, seed=1))
    x = torch.randn(1, 64, device=DEVICE).bfloat16()
    with pytest.raises(ValueError, match="workspace"):
        gemv(
            x,
            planes,
            torch.empty(1, 8, device=DEVICE),
            None,
            GemvConfig(block_pairs=4, block_words=4, split=2),
        )


@pytest.mark.parametrize("kernel", ["gemv", "gemv+escape_program", "dot", "wdot"])
@pytest.mark.parametrize("split", [1, 3])
def test_many_escapes_are_shared_by_the_splits(kernel, split):
    """Blocks with several chunks of escapes: each split takes every n-th chunk, the reducer adds them all."""
    weight = _weight(40, 130, seed=7, specials=False)
    generator = torch.Generator().manual_seed(8)
    weight[torch.rand(40, 130, generator=generator).to(weight.device) < 0.12] = 0.0  # ~12 % escapes
    planes = fmt.encode(weight)
    assert planes.escapes > 500
    x = torch.randn(2, 130, device=DEVICE).bfloat16()
    out = torch.empty(2, 40, device=DEVICE)
    _matmul(kernel, x, planes, out, split)  # blocks of 8 rows (gemv: ~125 escapes) or 32 (~16 chunks)
    _assert_matmul_close(out, x, weight, None)
