"""GPU codec benchmarks: decode GB/s of ``ans`` and ``zstd`` (checked bit-exact), and how long one decode
call blocks the host while a large GEMM keeps the GPU busy (C API via ctypes vs nvCOMP's Python API).

Results go to ``record_property`` and, when ``OFFLOAD_BENCH_JSON`` names a file, into that JSON file.
Needs no pytest-benchmark: GPU time is measured with CUDA events.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

from offload_runtime.native import GroupLayout
from offload_runtime.native.ans import AnsCodec
from offload_runtime.native.zstd import ZstdCodec

pytestmark = pytest.mark.gpu
GROUP_MB = 128
_RESULTS: dict[str, dict] = {}


def _save(name: str, result: dict, record_property) -> None:
    _RESULTS[name] = result
    for key, value in result.items():
        record_property(f"{name}.{key}", value)
    path = os.environ.get("OFFLOAD_BENCH_JSON")
    if path:
        with open(path, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": _RESULTS}, f, indent=2)
    print(name, json.dumps(result))


@pytest.fixture(scope="module")
def weights() -> tuple[GroupLayout, np.ndarray]:
    """A bf16 group shaped like trained weights: Gaussian rows of varied scale (~GROUP_MB MB)."""
    rows = GROUP_MB * (1 << 20) // (2 * 4096)
    w = torch.randn(rows, 4096) * torch.linspace(0.005, 0.05, rows)[:, None]
    tensors = {"w": w.bfloat16()}
    layout = GroupLayout.from_tensors(tensors.items())
    return layout, layout.pack(tensors)


def _time_decodes(decoder, src, out, stream, repeats: int = 20) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    decoder.decode(src, out, stream)  # warm-up (pointer arrays)
    start.record(stream)
    for _ in range(repeats):
        decoder.decode(src, out, stream)
    end.record(stream)
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


@pytest.mark.parametrize("name", ["ans", "zstd"])
def test_gpu_decode_throughput(name, weights, record_property):
    layout, data = weights
    codec = AnsCodec() if name == "ans" else ZstdCodec()
    encoded = codec.encode(layout, data)
    decoder = codec.gpu_decoder(encoded.chunks, encoded.params, layout, torch.device("cuda"))
    src = torch.from_numpy(encoded.payload).cuda()
    out = torch.empty(layout.size, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    seconds = _time_decodes(decoder, src, out, stream, repeats=20 if name == "ans" else 3)
    assert torch.equal(out.cpu(), torch.from_numpy(data))  # what was timed is bit-exact
    _save(
        f"decode_{name}",
        {
            "decoded_bytes": layout.size,
            "ratio": data.size / encoded.payload.size,
            "GBps": layout.size / seconds / 1e9,
        },
        record_property,
    )


class _GilProbe(threading.Thread):
    """Spins in Python, recording the longest gap between iterations: how long the GIL was held elsewhere."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.longest = 0.0

    def run(self) -> None:
        last = time.perf_counter()
        while not self.stop.is_set():
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now


def _host_block(call, n_calls: int = 8) -> dict:
    """Host ms per ``call()`` while GEMMs queued on the default stream keep the GPU busy."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    call()  # warm-up
    torch.cuda.synchronize()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    probe = _GilProbe()
    try:
        for _ in range(40):  # ~40 x 1.1 TFLOP: tens of ms of queued GPU work
            a @ a
        probe.start()
        times = []
        for _ in range(n_calls):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        probe.stop.set()
        probe.join()
    finally:
        sys.setswitchinterval(old)
    torch.cuda.synchronize()
    ms = [1e3 * t for t in times]
    return {
        "first_ms": ms[0],
        "median_ms": float(np.median(ms)),
        "max_ms": max(ms),
        "gil_gap_ms": 1e3 * probe.longest,
    }


def test_host_blocking_of_a_decode_during_gemm(weights, record_property):
    layout, data = weights
    encoded = AnsCodec().encode(layout, data)
    src = torch.from_numpy(encoded.payload).cuda()
    out = torch.empty(layout.size, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    decoder = AnsCodec().gpu_decoder(encoded.chunks, encoded.params, layout, torch.device("cuda"))
    result = {"capi": _host_block(lambda: decoder.decode(src, out, stream))}
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), torch.from_numpy(data))

    try:  # the same decode through nvCOMP's Python API, for comparison; report failures, do not hide them
        import nvidia.nvcomp as nvcomp

        from offload_runtime.native.nvcomp_backend import install_torch_allocator

        install_torch_allocator()
        codec = nvcomp.Codec(
            algorithm="ANS",
            bitstream_kind=nvcomp.BitstreamKind.RAW,
            data_type="<f2",
            uncomp_chunk_size=256 << 10,
            cuda_stream=stream.cuda_stream,
        )
        starts = [c.offset for c in encoded.chunks]
        out_starts = list(np.cumsum([0] + [c.decoded_size for c in encoded.chunks])[:-1].tolist())
        srcs = nvcomp.as_arrays(src, starts, [c.size for c in encoded.chunks], stream.cuda_stream)
        py_out = torch.zeros_like(out)
        outs = nvcomp.as_arrays(
            py_out, out_starts, [c.decoded_size for c in encoded.chunks], stream.cuda_stream
        )
        config = codec.decompression_config(srcs)  # syncs once: built up front, as a GpuDecoder would
        result["python_api"] = _host_block(lambda: codec.decode(srcs, out=outs, decompression_config=config))
        torch.cuda.synchronize()
        result["python_api"]["bit_exact"] = bool(torch.equal(py_out.cpu(), torch.from_numpy(data)))
    except Exception as exc:  # recorded in the results; the C-API numbers still count
        result["python_api"] = {"error": f"{type(exc).__name__}: {exc}"}
    _save("host_block_during_gemm", result, record_property)
