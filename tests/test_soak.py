"""Many consecutive generate() calls: no growth in RSS (CPU, CI) or in VRAM and pinned memory (GPU, slow)."""

import gc
import threading

import psutil
import pytest
import torch

import offload_runtime
from offload_runtime.tiny import tiny_model


def _generate_many(model, ids, calls: int) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for _ in range(calls):
            # kept on the CPU: 1000 CUDA outputs would themselves be 1000 x 512 bytes of "growth"
            outs.append(model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).cpu())
    return outs


def test_repeated_generate_does_not_grow_rss_or_threads():
    reference = tiny_model("llama", num_layers=4, hidden_size=256, intermediate_size=512)
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        expected = reference.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    model = offload_runtime.dispatch_compressed(
        tiny_model("llama", num_layers=4, hidden_size=256, intermediate_size=512),
        budget_gb=0.004,
        codec="zstd",
        device="cpu",
    )
    try:
        assert len(model.offload_plan.streamed) >= 4, str(model.offload_plan)
        process = psutil.Process()
        _generate_many(model, ids, 20)  # warm-up: allocator pools, execution order
        gc.collect()
        rss_before, threads_before = process.memory_info().rss, threading.active_count()
        outs = _generate_many(model, ids, 150)
        gc.collect()
        growth = process.memory_info().rss - rss_before
        assert all(torch.equal(out, expected) for out in outs)
        assert threading.active_count() == threads_before
        # 150 calls x 4 tokens x ~6 streamed loads: a leak of even one slot-sized buffer per load would
        # add hundreds of MB; allow a few MB of allocator noise
        assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 150 generate() calls"
    finally:
        offload_runtime.remove_offload(model)


def _pinned_bytes() -> int:
    """Bytes of pinned host memory torch's pinned allocator holds (its caching pool included)."""
    stats = torch.cuda.host_memory_stats()
    value = stats.get("allocated_bytes.current")
    assert value is not None, f"no pinned-memory statistics in this torch: {sorted(stats)[:8]}"
    return value


@pytest.mark.gpu
@pytest.mark.slow
def test_thousand_generates_on_cuda_do_not_grow_vram_pinned_or_rss():
    reference = tiny_model(
        "llama", num_layers=4, hidden_size=256, intermediate_size=512, dtype=torch.bfloat16
    )
    ids = torch.randint(0, 256, (1, 6), device="cuda")
    with torch.no_grad():
        expected = reference.cuda().generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    model = offload_runtime.dispatch_compressed(
        tiny_model("llama", num_layers=4, hidden_size=256, intermediate_size=512, dtype=torch.bfloat16),
        budget_gb=0.004,
        codec="ans",
        device="cuda",
    )
    try:
        process = psutil.Process()
        _generate_many(model, ids, 20)
        torch.cuda.synchronize()
        gc.collect()
        vram, rss = torch.cuda.memory_allocated(), process.memory_info().rss
        pinned_before = _pinned_bytes()
        outs = _generate_many(model, ids, 1000)
        torch.cuda.synchronize()
        gc.collect()
        assert all(torch.equal(out, expected.cpu()) for out in outs[::50])
        assert torch.cuda.memory_allocated() == vram
        assert _pinned_bytes() == pinned_before
        assert process.memory_info().rss - rss < 32 * 2**20
    finally:
        offload_runtime.remove_offload(model)
