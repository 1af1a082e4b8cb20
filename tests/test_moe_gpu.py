"""Mixtures of experts on CUDA: reassembled blocks through the GPU decoders, and the expert hook with the
real ``grouped_mm`` / ``batched_mm`` kernels, bit-identical to the unoffloaded model."""

from __future__ import annotations

import copy

import pytest
import torch

from offload_runtime import dispatch_compressed
from offload_runtime.errors import BudgetError
from offload_runtime.experts import CopyProvider, attach_experts
from offload_runtime.loaders import pack
from offload_runtime.loaders.moe import find_expert_modules
from offload_runtime.scheduler.planner import GIB
from offload_runtime.scheduler.tiers import RESIDENT
from offload_runtime.tiny import TINY_MOE_ARCHITECTURES, tiny_model

pytestmark = pytest.mark.gpu


def _run(model, ids):
    kwargs = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": 4,
        "do_sample": False,
        "pad_token_id": 0,
    }
    with torch.no_grad():
        return model(ids).logits, model.generate(ids, **kwargs)


@pytest.mark.parametrize("codec", ["ans", "zstd"])
@pytest.mark.parametrize("arch", TINY_MOE_ARCHITECTURES)
def test_reassembled_blocks_stream_on_cuda_bit_identical(arch, codec, tmp_path):
    """Every block streamed from pinned RAM: each reassembled group decoded part by part on the GPU. Six
    blocks: with three, the minimum budget (two slots, staging, the decoder's workspace) held them all
    resident, and nothing streamed."""
    reference = tiny_model(arch, num_layers=6, dtype=torch.bfloat16)
    path = pack(reference, tmp_path / "m.ort", codec=codec, progress=False, device="cuda")
    reference = reference.to("cuda")
    with pytest.raises(BudgetError) as info:
        dispatch_compressed(
            copy.deepcopy(reference).cpu(), 1e-9, checkpoint=path, device="cuda", experts="block"
        )
    budget = info.value.expected / GIB
    model = dispatch_compressed(
        copy.deepcopy(reference).cpu(), budget, checkpoint=path, device="cuda", experts="block"
    )
    assert model.offload_plan.experts is None  # block granularity: reassembled blocks
    if codec == "ans":  # (nvCOMP Zstd's decode workspace can make keeping a tiny model resident cheaper)
        assert any(p.tier != RESIDENT for p in model.offload_plan.groups if ".layers." in p.name)
    for batch in (1, 3):
        ids = torch.randint(3, 256, (batch, 7), device="cuda")
        got, want = _run(model, ids), _run(reference, ids)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert model.offload_stats.peak_weight_bytes <= budget * GIB


class _Poisoning(CopyProvider):
    def make_ready(self, module, expert_ids):
        for tensor in self.slots[module].params.values():
            tensor.fill_(float("nan"))
        super().make_ready(module, expert_ids)


@pytest.mark.parametrize("implementation", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("arch", TINY_MOE_ARCHITECTURES)
def test_expert_hook_on_cuda_reads_only_routed_experts(arch, implementation):
    reference = tiny_model(arch, dtype=torch.bfloat16).to("cuda")
    reference.set_experts_implementation(implementation)
    model = copy.deepcopy(reference)
    sources = {
        m.path: {a: getattr(model.get_submodule(m.path), a).detach().clone() for a in m.params}
        for m in find_expert_modules(model)
    }
    provider = _Poisoning(sources)
    hooks = attach_experts(model, provider, device="cuda", fill=float("nan"))
    provider.slots = {p: h.slot for p, h in hooks.items()}
    for batch, length in ((1, 2), (3, 5)):
        ids = torch.randint(3, 256, (batch, length), device="cuda")
        got, want = _run(model, ids), _run(reference, ids)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
