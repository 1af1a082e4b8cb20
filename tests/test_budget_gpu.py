"""The plan owns every byte (CUDA): ``torch.cuda.max_memory_allocated()`` above the baseline stays within
``budget_gb`` while dispatching, and within ``budget_gb`` plus the unoffloaded model's own activation peak
while generating, for every codec, for plans that stream everything, keep payloads in VRAM, or keep
everything resident (where ``ans`` groups are decoded through the dispatch window)."""

from __future__ import annotations

import pytest
import torch

from offload_runtime import load_compressed
from offload_runtime.errors import BudgetError
from offload_runtime.loaders import pack
from offload_runtime.scheduler.arena import arena_size
from offload_runtime.scheduler.planner import GIB
from offload_runtime.tiny import tiny_model

pytestmark = pytest.mark.gpu


def model_and_ids():
    model = tiny_model(
        "llama",
        num_layers=6,
        dtype=torch.bfloat16,
        hidden_size=512,
        intermediate_size=1536,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
    )
    return model, torch.randint(3, 4096, (2, 24), device="cuda")


def activation_peak(model, ids) -> int:
    """What the unoffloaded model's generate allocates above its weights (activations, KV cache)."""
    resident = model.cuda()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    resident.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    peak = torch.cuda.max_memory_allocated() - before
    model.cpu()
    return peak


def unstored_buffer_bytes(model) -> int:
    """Device bytes of buffers a container does not store (rotary ``inv_freq``): the model's, not weights."""
    return sum(arena_size(b.numel() * b.element_size()) for n, b in model.named_buffers() if "inv_freq" in n)


@pytest.mark.parametrize("codec", ["raw", "zstd", "ans", "int8"])
@pytest.mark.parametrize("regime", ["stream", "half in VRAM", "all resident"])
def test_device_memory_stays_within_the_budget(tmp_path, codec, regime):
    model, ids = model_and_ids()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    activations = activation_peak(model, ids)
    path = pack(model, tmp_path / "model.safetensors", codec=codec, progress=False, device="cuda")
    with pytest.raises(BudgetError) as info:
        load_compressed(path, 1e-9, device="cuda")  # below any minimum: the BudgetError names it
    minimum = info.value.expected
    budget = {
        "stream": minimum,
        "half in VRAM": minimum + path.stat().st_size // 2,
        "all resident": 2 * weights,
    }[regime]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    offloaded = load_compressed(path, budget / GIB, device="cuda")
    torch.cuda.synchronize()
    extra = unstored_buffer_bytes(offloaded)
    assert torch.cuda.max_memory_allocated() - base - extra <= budget, str(offloaded.offload_plan)
    torch.cuda.reset_peak_memory_stats()
    offloaded.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base - extra <= budget + activations
    tiers = {p.tier.name for p in offloaded.offload_plan.groups}
    if regime == "all resident":
        assert tiers == {"resident"}
    elif regime == "stream":
        assert "host" in tiers, tiers
