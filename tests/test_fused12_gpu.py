"""``fused12`` on a GPU: the decode-to-slot decoder (exact, checked, allocation-free) and the compiled
kernels on Llama-sized shapes. (``test_fused12_kernels.py`` also runs compiled when CUDA is present.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload_runtime.errors import CorruptCheckpointError
from offload_runtime.native import GroupLayout, get_codec
from offload_runtime.native import fused12_format as fmt
from offload_runtime.native.fused12 import parse_params

pytestmark = pytest.mark.cuda  # Triton kernels: CUDA, no nvCOMP


def _group():
    tensors = {
        "q.weight": (torch.randn(512, 384) * 0.02).bfloat16(),
        "down.weight": (torch.randn(385, 1030) * 0.02).bfloat16(),  # odd shape
        "norm.weight": torch.ones(384, dtype=torch.bfloat16),
        "bias": torch.randn(385),
    }
    tensors["q.weight"][0, :3] = torch.tensor([0.0, float("nan"), float("inf")])
    layout = GroupLayout.from_tensors(tensors.items())
    data = layout.pack(tensors)
    return layout, data, get_codec("fused12").encode(layout, data)


def test_gpu_decoder_is_exact_checked_and_allocation_free():
    layout, data, encoded = _group()
    device = torch.device("cuda")
    decoder = get_codec("fused12").gpu_decoder(encoded.chunks, encoded.params, layout, device)
    src = torch.from_numpy(encoded.payload).to(device)
    out = torch.full((layout.size,), 0xAB, dtype=torch.uint8, device=device)
    stream = torch.cuda.Stream()
    decoder.decode(src, out, stream, check=True).result()
    assert torch.equal(out.cpu(), torch.from_numpy(data))
    out.fill_(0xCD)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    check = decoder.decode(src, out, stream, check=True)
    assert torch.cuda.memory_allocated() == before  # steady state: nothing allocated
    check.result()
    assert torch.equal(out.cpu(), torch.from_numpy(data))


def test_gpu_decoder_check_names_the_damaged_chunk():
    layout, _, encoded = _group()
    device = torch.device("cuda")
    entries = parse_params(encoded.params, layout, encoded.chunks)
    payload = encoded.payload.copy()
    payload[entries[1].offsets["sm"] + 40] ^= 0x10  # a mantissa bit of down.weight (chunk 1)
    decoder = get_codec("fused12").gpu_decoder(encoded.chunks, encoded.params, layout, device)
    out = torch.empty(layout.size, dtype=torch.uint8, device=device)
    check = decoder.decode(torch.from_numpy(payload).to(device), out, torch.cuda.Stream(), check=True)
    with pytest.raises(CorruptCheckpointError, match="chunk=1"):
        check.result()


@pytest.mark.parametrize(("rows", "cols"), [(8192, 8192), (1024, 8192), (4097, 4100), (1, 28672)])
def test_kernels_on_llama_shapes(rows, cols):
    from offload_runtime.native.fused12_decode_kernel import decode_into
    from offload_runtime.native.fused12_linear import fused_linear

    torch.backends.cuda.matmul.allow_tf32 = False
    weight = (torch.randn(rows, cols, device="cuda") * 0.02).bfloat16()
    weight.view(-1)[::9973] = 0.0
    planes = fmt.encode(weight)
    decoded = torch.empty_like(weight)
    decode_into(planes, decoded)
    assert torch.equal(decoded.view(torch.int16), weight.view(torch.int16))
    for m in (1, 4, 8, 96):
        x = torch.randn(m, cols, device="cuda").bfloat16()
        reference = x.float() @ weight.float().T
        magnitude = x.float().abs() @ weight.float().abs().T
        paths = ["gemv", "dot", "decode"] if m <= 8 else ["dot", "decode"]
        for path in paths:
            out = torch.empty(m, rows, device="cuda")
            y = (
                fused_linear(x, planes, out=out, path=path)
                if path != "decode"
                else fused_linear(x, planes, path=path)
            )
            error = float(((y.float() - reference).abs() / magnitude.clamp_min(1e-30)).max())
            assert error <= (2.0**-16 if path != "decode" else 2.0**-7), (path, m, error)


def test_fused_linear_is_capturable_in_a_cuda_graph():
    from offload_runtime.native.fused12_linear import fused_linear

    weight = (torch.randn(2048, 4096, device="cuda") * 0.02).bfloat16()
    planes = fmt.encode(weight)
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    y = torch.empty(1, 2048, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fused_linear(x, planes, out=y)  # compile and allocate this stream's workspace outside the capture
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fused_linear(x, planes, out=y)
    expected = y.clone()
    y.zero_()
    graph.replay()
    graph.replay()  # split-K counters re-armed by every launch
    torch.cuda.synchronize()
    assert torch.equal(y, expected)
    assert np.isfinite(y.float().cpu().numpy()).all()


@pytest.mark.parametrize("bias", [False, True])
def test_replayed_launches_equal_standard_ones(bias):
    """A LaunchCache replay runs the kernel Triton's own launch runs, with *this* call's x and out: each
    call gets new x values (the earlier x kept alive, so a replay that read it would give its product), for
    every path, row count and alignment of x (each its own key)."""
    from offload_runtime.native.fused12_linear import fused_linear
    from offload_runtime.native.triton_launch import LaunchCache

    weight = (torch.randn(1024, 4100, device="cuda") * 0.02).bfloat16()
    planes = fmt.encode(weight)
    b = torch.randn(1024, device="cuda").bfloat16() if bias else None
    cache = LaunchCache()
    kept = []
    for m in (1, 5, 8, 16):
        for offset in (0, 1):  # x 16-byte aligned (gemv loads it as 8-byte words), then 2 bytes past it
            for path in ("gemv", "dot") if m <= 8 else ("dot",):
                for _ in range(3):  # the first call launches, the others replay
                    x = torch.randn(m * 4100 + 1, device="cuda").bfloat16()[offset : offset + m * 4100]
                    x = x.view(m, 4100)
                    kept.append(x)
                    expected = fused_linear(x.clone(), planes, b, path=path)
                    got = fused_linear(x, planes, b, path=path, launches=cache)
                    assert torch.equal(got, expected), (m, offset, path)
    assert cache.launches == len(cache) == 14 and cache.replays == 28  # one key per (m, offset, path)


def test_the_decode_step_path_replays_exactly():
    """``fused_linear`` as a bound linear layer calls it (no path, no out, a launch cache), with x of the
    shapes a model passes: [1, 1, K], [2, 3, K], 2 bytes past an aligned address, and a strided x whose rows
    are copied per call. Each case thrice with new values: equal to the standard launch, replayed twice."""
    from offload_runtime.native.fused12_linear import fused_linear
    from offload_runtime.native.triton_launch import LaunchCache

    planes = fmt.encode((torch.randn(1024, 4096, device="cuda") * 0.02).bfloat16())
    bias = torch.randn(1024, device="cuda").bfloat16()
    cases = {
        "one token": lambda: torch.randn(1, 1, 4096, device="cuda").bfloat16(),
        "batch of rows": lambda: torch.randn(2, 3, 4096, device="cuda").bfloat16(),
        "unaligned": lambda: torch.randn(4097, device="cuda").bfloat16()[1:].view(1, 1, 4096),
        "strided": lambda: torch.randn(1, 1, 8192, device="cuda").bfloat16()[..., ::2],
    }
    cache, kept = LaunchCache(), []
    for name, make_x in cases.items():
        for _ in range(3):
            x = make_x()
            kept.append(x)  # an earlier x stays alive: a replay that read it would give its product
            got = fused_linear(x, planes, bias, launches=cache)
            expected = fused_linear(x.contiguous().clone(), planes, bias)
            assert got.shape == (*x.shape[:-1], 1024) and torch.equal(got, expected), name
    assert cache.launches == len(cache) == len(cases) and cache.replays == 2 * len(cases)


@pytest.mark.parametrize("block_m", [16, 64])
@pytest.mark.parametrize("m", [17, 32, 64])
def test_dot_tiles_of_more_rows_than_one_mma(m, block_m):
    """The tensor-core kernel with 16-row tiles (mma.sync) and 64-row ones (warpgroup MMA on sm_90), on
    row counts that fill, straddle and half-fill them, against the fp32 product of the exact weights. (Both
    pass on the H200: the 66-72% top-1 agreement of a 70 B forward of 32 rows is not a tile defect.)"""
    from offload_runtime.native.fused12_linear import fused_linear

    weight = (torch.randn(1024, 4096, device="cuda") * 0.02).bfloat16()
    planes = fmt.encode(weight)
    x = torch.randn(m, 4096, device="cuda").bfloat16()
    reference = x.float() @ weight.float().T
    magnitude = x.float().abs() @ weight.float().abs().T
    config = {"block_m": block_m, "block_pairs": 32, "block_words": 16, "split": 1, "num_warps": 4}
    out = torch.empty(m, 1024, device="cuda")
    y = fused_linear(x, planes, out=out, path="dot", config={**config, "num_stages": 2})
    error = float(((y - reference).abs() / magnitude.clamp_min(1e-30)).max())
    assert error <= 2.0**-16, error


def test_packing_for_a_gpu_encodes_there_and_writes_the_cpu_encoders_container(tmp_path, monkeypatch):
    """pack(device="cuda") encodes fused12 groups on the GPU (encode_tensor), and the file is the one the CPU
    encoder writes, byte for byte."""
    import filecmp

    from offload_runtime.loaders import pack
    from offload_runtime.native.fused12 import Fused12Codec
    from offload_runtime.tiny import tiny_model

    model = tiny_model("llama", num_layers=2, dtype=torch.bfloat16)
    on_cpu = pack(model, tmp_path / "cpu.ort", codec="fused12", progress=False, device="cpu")
    seen = []
    encode_tensor = Fused12Codec.encode_tensor

    def spy(self, layout, held, *args, **kwargs):
        seen.append(held[0].device.type)
        return encode_tensor(self, layout, held, *args, **kwargs)

    monkeypatch.setattr(Fused12Codec, "encode_tensor", spy)
    on_gpu = pack(model, tmp_path / "gpu.ort", codec="fused12", progress=False, device="cuda")
    assert seen and set(seen) == {"cuda"}
    assert filecmp.cmp(on_cpu, on_gpu, shallow=False)
