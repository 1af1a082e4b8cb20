"""CPU engine overhead: loading a streamed ``raw`` group vs a bare copy of the same bytes (gate: >= 0.7x).

Runs in CI. The engine's per-load work on the CPU path with ``raw`` is one copy of the payload into the
slot plus bookkeeping (tickets, events, hooks); a bare ``copy_`` between two preallocated buffers of the
same size is the floor. Both are measured in the same run, so the gate is a ratio, not a wall-clock limit.
"""

import time

import pytest
import torch

import offload_runtime
from offload_runtime.tiny import tiny_model

GATE = 0.7


def _model():
    return tiny_model(
        "llama",
        num_layers=6,
        hidden_size=512,
        intermediate_size=1536,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=512,
    )


def _bare_copy_gbps(nbytes: int, sources: int, slots: int, repeats: int = 5) -> float:
    """A bare ``copy_`` of the same bytes the engine moves: one distinct source buffer per streamed group
    into ``slots`` rotating destinations, like the engine's host-tier payloads and slots (so neither side
    gets to reuse a cache-warm buffer)."""
    srcs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(sources)]
    dsts = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(slots)]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for i, src in enumerate(srcs):
            dsts[i % slots].copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes * sources / sorted(times[1:])[repeats // 2] / 1e9


def test_engine_load_throughput_vs_bare_copy(benchmark):
    torch.set_num_threads(1)  # the bare copy and the engine's copy both on one thread: like for like
    reference = _model()
    ids = torch.randint(0, 512, (1, 4))
    with torch.no_grad():
        expected = reference(ids).logits
    model = offload_runtime.dispatch_compressed(_model(), budget_gb=0.03, codec="raw", device="cpu")
    try:
        streamed = model.offload_plan.streamed
        assert len(streamed) >= 6, str(model.offload_plan)
        group_bytes = max(p.decoded_bytes for p in streamed)
        with torch.no_grad():
            model(ids)  # learn the order
            stats = model.offload_stats
            before = (stats.decode_bytes, stats.decode_seconds)

            def forward():
                with torch.no_grad():
                    return model(ids).logits

            logits = benchmark.pedantic(forward, rounds=10, iterations=1, warmup_rounds=1)
        assert torch.equal(logits, expected)  # what was timed is right
        loaded = stats.decode_bytes - before[0]
        engine_gbps = loaded / (stats.decode_seconds - before[1]) / 1e9
        bare_gbps = _bare_copy_gbps(group_bytes, len(streamed), model.offload_plan.nslots)
        benchmark.extra_info.update(
            engine_load_GBps=engine_gbps,
            bare_copy_GBps=bare_gbps,
            ratio=engine_gbps / bare_gbps,
            group_bytes=group_bytes,
        )
        assert engine_gbps >= GATE * bare_gbps, (
            f"engine loads at {engine_gbps:.2f} GB/s, a bare copy at {bare_gbps:.2f} GB/s "
            f"(ratio {engine_gbps / bare_gbps:.2f} < {GATE})"
        )
    finally:
        offload_runtime.remove_offload(model)


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
