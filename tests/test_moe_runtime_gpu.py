"""The expert runtime on CUDA: routed experts through the compressed (or decoded) cache, bit-identical to the
unoffloaded model on the GPU, within the budget; chunks decoded straight into the slot where they align
with tensors, through the scratch buffer where they do not; speculation changes bytes moved, never results."""

from __future__ import annotations

import copy

import pytest
import torch

from offload_runtime import load_compressed
from offload_runtime.errors import BudgetError
from offload_runtime.loaders import pack
from offload_runtime.scheduler.planner import GIB
from offload_runtime.tiny import TINY_MOE_ARCHITECTURES, tiny_model

pytestmark = pytest.mark.gpu

# a Qwen3-MoE whose expert tensors are whole 256 KiB ANS chunks (gate_up 512 KiB, down 256 KiB): direct path
ALIGNED = {"hidden_size": 512, "moe_intermediate_size": 256, "intermediate_size": 1024, "head_dim": 64}


def build(arch: str):
    overrides = ALIGNED if arch == "qwen3_moe-aligned" else {}
    return tiny_model(arch.removesuffix("-aligned"), dtype=torch.bfloat16, **overrides)


def run(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
    return logits, model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("arch", [*TINY_MOE_ARCHITECTURES, "qwen3_moe-aligned"])
@pytest.mark.parametrize(
    ("regime", "cache", "speculate"),
    [("minimum", "compressed", False), ("half", "compressed", True), ("half", "decoded", False)],
)
def test_experts_stream_bit_identical_on_cuda(tmp_path, arch, regime, cache, speculate):
    model = build(arch)
    path = pack(model, tmp_path / "m.safetensors", codec="ans", progress=False, device="cuda")
    ids = torch.randint(3, 200, (3, 7), device="cuda")
    reference = copy.deepcopy(model).cuda()
    want_logits, want_tokens = run(reference, ids)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run(reference, ids)
    activations = torch.cuda.max_memory_allocated() - base
    del reference
    torch.cuda.empty_cache()
    with pytest.raises(BudgetError) as info:
        load_compressed(path, 1e-9, device="cuda")  # below any minimum: the BudgetError names it
    budget = info.value.expected
    if regime == "half":
        full = load_compressed(path, 1.0, device="cuda").offload_plan
        experts = full.experts
        half = len(experts.experts) // 2 * experts.entry_bytes
        budget = full.groups_device_bytes + experts.fixed_bytes + half
        del full
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    offloaded = load_compressed(path, budget / GIB, device="cuda", expert_cache=cache, speculate=speculate)
    got_logits, got_tokens = run(offloaded, ids)
    torch.cuda.synchronize()
    assert torch.equal(got_logits, want_logits)
    assert torch.equal(got_tokens, want_tokens)
    plan = offloaded.offload_plan
    assert plan.experts is not None and plan.experts.mode == cache
    assert plan.device_bytes <= budget
    assert torch.cuda.max_memory_allocated() - base <= budget + activations + (1 << 20)
    stats = offloaded.offload_stats.experts
    assert stats.misses > 0 and stats.h2d_bytes > 0 and stats.requested == stats.hits + stats.misses
    runtime = offloaded._offload_runtime.runtime.experts
    direct = sum(1 for e in runtime.experts.values() if e.direct is not None)
    if arch == "qwen3_moe-aligned":
        assert direct == len(runtime.experts)  # every expert decodes straight into the slot
    if speculate:
        assert stats.speculated >= 0 and stats.speculated_used <= stats.speculated
