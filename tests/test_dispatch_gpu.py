"""The runtime on CUDA: bit-identical outputs with nvCOMP codecs, the budget held, stats, overlap trace.

Set ``OFFLOAD_TRACE_DIR`` to save a torch.profiler (Chrome) trace of streamed forwards of the larger model.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

from offload_runtime import dispatch_compressed, remove_offload
from offload_runtime.errors import BudgetError
from offload_runtime.loaders import pack
from offload_runtime.scheduler.planner import GIB
from offload_runtime.scheduler.tiers import DISK, HOST, RESIDENT
from offload_runtime.tiny import tiny_model

pytestmark = pytest.mark.gpu

CODECS = ["ans", "zstd"]


def minimum_gb(model, path: Path, prefetch: int = 1) -> float:
    """The smallest budget the runtime accepts for the container at ``path`` (from the BudgetError)."""
    with pytest.raises(BudgetError) as info:
        dispatch_compressed(copy.deepcopy(model), 1e-9, checkpoint=path, device="cuda", prefetch=prefetch)
    return info.value.expected / GIB


def larger_llama():
    return tiny_model(
        "llama",
        num_layers=8,
        dtype=torch.bfloat16,
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=4096,
    )


def unstored_buffer_bytes(model) -> int:
    """Device bytes of non-weight buffers (rotary inv_freq, ...): moved by dispatch, not budgeted."""
    weights = {id(t) for t in model.state_dict(keep_vars=True).values()}
    return sum(-(-b.nbytes // 512) * 512 for b in model.buffers() if id(b) not in weights and b.is_cuda)


def run_and_measure(model, reference, path, budget_gb, prefetch, ids):
    """Dispatch a CPU copy of ``model`` on CUDA; return (logits, generated, steady bytes, forward peak)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    dispatch_compressed(model, budget_gb, checkpoint=path, device="cuda", prefetch=prefetch)
    torch.cuda.synchronize()
    steady = torch.cuda.memory_allocated() - base - unstored_buffer_bytes(model)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        logits = model(ids).logits
    torch.cuda.synchronize()
    forward_peak = torch.cuda.max_memory_allocated() - base
    generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    again = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    return logits, generated, again, steady, forward_peak


def reference_run(reference, ids):
    torch.cuda.synchronize()
    weights = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        logits = reference(ids).logits
    torch.cuda.synchronize()
    activations = torch.cuda.max_memory_allocated() - weights
    generated = reference.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False
    )
    return logits, generated, activations


@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "build", [lambda: tiny_model("llama", dtype=torch.bfloat16), larger_llama], ids=["tiny", "larger"]
)
def test_bit_identical_on_cuda_within_budget(tmp_path, build, codec, prefetch):
    model = build()
    path = pack(model, tmp_path / "model.safetensors", codec=codec, progress=False)
    reference = copy.deepcopy(model).cuda()
    ids = torch.randint(3, model.config.vocab_size, (2, 16), device="cuda")
    want_logits, want_tokens, activations = reference_run(reference, ids)
    budget = minimum_gb(model, path, prefetch)
    logits, tokens, again, steady, forward_peak = run_and_measure(
        model, reference, path, budget, prefetch, ids
    )
    assert torch.equal(logits, want_logits)
    assert torch.equal(tokens, want_tokens)
    assert torch.equal(again, want_tokens)
    limit = budget * GIB
    assert steady <= limit
    assert model.offload_plan.device_bytes <= limit
    # the forward's peak is the weights' budget plus what the unoffloaded forward needs for activations
    assert forward_peak <= limit + activations + (1 << 20)
    plan = model.offload_plan
    if not plan.streamed:  # all resident: only right when streaming would not have been cheaper
        assert plan.minimum_bytes == sum(p.decoded_bytes for p in plan.groups) + plan.overhead_bytes
    if codec == "ans" and model.config.num_hidden_layers == 8:
        assert len(plan.streamed) >= 8  # at the minimum budget the blocks stream
    stats = model.offload_stats
    assert stats.peak_weight_bytes <= limit
    if plan.streamed:
        assert stats.loads > 0 and stats.h2d_bytes > 0 and stats.decode_bytes > 0
        assert stats.h2d_gbps > 0 and stats.decode_gbps > 0
    remove_offload(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want_logits)


def test_mixed_tiers_on_cuda(tmp_path):
    model = larger_llama()
    path = pack(model, tmp_path / "model.safetensors", codec="ans", progress=False)
    reference = copy.deepcopy(model).cuda()
    ids = torch.randint(3, model.config.vocab_size, (1, 12), device="cuda")
    want, _, _ = reference_run(reference, ids)
    budget = minimum_gb(model, path) + 0.02  # room for some resident groups
    dispatch_compressed(model, budget, checkpoint=path, device="cuda", host_budget_gb=0.03)
    tiers = {p.tier for p in model.offload_plan.groups}
    assert {RESIDENT, HOST, DISK} <= tiers
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
        assert torch.equal(model(ids).logits, want)


def decode_overlaps_compute(trace: dict) -> bool:
    """True when a kernel of a side stream (decode) runs while a kernel of the compute stream runs.

    The compute stream is the one with the most kernels; every other stream with kernels is a side stream.
    """
    kernels = [
        (e["ts"], e["ts"] + e.get("dur", 0), e.get("args", {}).get("stream"))
        for e in trace.get("traceEvents", [])
        if e.get("cat") == "kernel" and e.get("ph") == "X"
    ]
    counts: dict = {}
    for _, _, stream in kernels:
        counts[stream] = counts.get(stream, 0) + 1
    if len(counts) < 2:
        return False
    compute = max(counts, key=counts.get)
    main = [(s, e) for s, e, st in kernels if st == compute]
    side = [(s, e) for s, e, st in kernels if st != compute]
    return any(s < me and ms < e for s, e in side for ms, me in main)


def test_profiler_trace_shows_decode_overlapping_compute(tmp_path):
    trace_dir = os.environ.get("OFFLOAD_TRACE_DIR")
    if not trace_dir:
        pytest.skip("set OFFLOAD_TRACE_DIR to record a trace")
    model = larger_llama()
    path = pack(model, tmp_path / "model.safetensors", codec="ans", progress=False)
    dispatch_compressed(model, minimum_gb(model, path, 2), checkpoint=path, device="cuda", prefetch=2)
    ids = torch.randint(3, model.config.vocab_size, (4, 256), device="cuda")
    with torch.no_grad():
        model(ids)  # learn the order, build decoders
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                model(ids)
            torch.cuda.synchronize()
    out = Path(trace_dir) / "offload_forward_trace.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out))
    assert decode_overlaps_compute(json.loads(out.read_text()))
