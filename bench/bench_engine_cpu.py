"""CPU engine overhead: loading a streamed ``raw`` group vs a bare copy of the same bytes (gate: >= 0.7x).

Runs in CI. The engine's per-load work on the CPU path with ``raw`` is one copy of the payload into the
slot plus bookkeeping (tickets, events, hooks); a bare ``copy_`` between two preallocated buffers of the
same size is the floor. Both are measured in the same run, so the gate is a ratio, not a wall-clock limit.
"""

import time

import numpy as np
import pytest
import torch

import offload_runtime
from offload_runtime.tiny import tiny_model

GATE = 0.7


def _model():
    # ~50 MB groups: the size class of real decoder blocks (hundreds of MB) is what the engine's fixed
    # per-group cost (two thread hand-offs) must be small against
    return tiny_model(
        "llama",
        num_layers=6,
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=512,
    )


class _BareCopy:
    """A bare copy of the same bytes the engine moves: one distinct source buffer per streamed group
    into ``slots`` rotating destinations, like the engine's host-tier payloads and slots (so neither side
    gets to reuse a cache-warm buffer)."""

    def __init__(self, nbytes: int, sources: int, slots: int) -> None:
        self.srcs = [torch.randint(0, 255, (nbytes,), dtype=torch.uint8) for _ in range(sources)]
        self.dsts = [torch.empty(nbytes, dtype=torch.uint8) for _ in range(slots)]

    def one_pass(self) -> float:
        start = time.perf_counter()
        for i, src in enumerate(self.srcs):
            # the same primitive as the raw codec's CPU decode (one memcpy per group)
            np.copyto(self.dsts[i % len(self.dsts)].numpy(), src.numpy())
        return time.perf_counter() - start


def test_engine_load_throughput_vs_bare_copy(benchmark):
    """Pass after pass over the streamed groups through the engine alone (acquire -> load on the worker
    thread -> handshake -> release), without the model's compute competing for memory bandwidth: the
    engine's own cost per group against the bare copy of the same bytes."""
    torch.set_num_threads(1)  # the bare copy and the engine's copy both on one thread: like for like
    reference = _model()
    ids = torch.randint(0, 512, (1, 4))
    with torch.no_grad():
        expected = reference(ids).logits
    model = offload_runtime.dispatch_compressed(_model(), budget_gb=0.072, codec="raw", device="cpu")
    try:
        plan = model.offload_plan
        streamed = [p.name for p in plan.streamed]
        assert len(streamed) >= 6, str(plan)
        streamed_bytes = sum(p.decoded_bytes for p in plan.streamed)
        engine = model._offload_runtime.runtime.engine
        with torch.no_grad():
            model(ids)  # learn the execution order
        bare = _BareCopy(max(p.decoded_bytes for p in plan.streamed), len(streamed), plan.nslots)
        passes: list[float] = []
        bare_passes: list[float] = []

        stats = model.offload_stats
        loaded: list[int] = []

        def one_pass() -> None:
            # engine pass and bare pass back to back, so both see the same interference from the machine;
            # the engine window ends when every queued load (the next pass's first group, prefetched at
            # the end of this one) is done, so no engine work spills into the bare pass, and its bytes are
            # the bytes actually loaded inside the window
            before = stats.decode_bytes
            start = time.perf_counter()
            engine.begin_pass()
            for group in streamed:
                engine.acquire(group)
                engine.release(group)
            engine.end_pass()
            for slot in engine.slots:
                if slot.current is not None:
                    slot.current.done.wait()
            passes.append(time.perf_counter() - start)
            loaded.append(stats.decode_bytes - before)
            bare_passes.append(bare.one_pass())

        benchmark.pedantic(one_pass, rounds=15, iterations=1, warmup_rounds=1)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, expected)  # the slots still hold the right weights
        # best pass of each: on a shared machine the least disturbed one
        engine_gbps = max(nbytes / seconds for nbytes, seconds in zip(loaded, passes, strict=True)) / 1e9
        bare_gbps = streamed_bytes / min(bare_passes) / 1e9
        benchmark.extra_info.update(
            engine_load_GBps=engine_gbps, bare_copy_GBps=bare_gbps, ratio=engine_gbps / bare_gbps
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
