"""The plan owns every byte (CPU): every weight the runtime holds lives in its one arena, which is exactly the
plan's device bytes and never above the budget; the pieces handed out add up to the plan."""

from __future__ import annotations

import copy

import pytest
import torch

from offload_runtime import dispatch_compressed, remove_offload
from offload_runtime.errors import BudgetError
from offload_runtime.scheduler.planner import GIB
from offload_runtime.tiny import tiny_model

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 11]])


def minimum_gb(model, codec: str) -> float:
    with pytest.raises(BudgetError) as info:
        dispatch_compressed(copy.deepcopy(model), 1e-9, device="cpu", codec=codec)  # below any minimum
    return info.value.expected / GIB


def _within(tensor: torch.Tensor, arena: torch.Tensor) -> bool:
    start, end = arena.data_ptr(), arena.data_ptr() + arena.numel()
    return start <= tensor.data_ptr() and tensor.data_ptr() + tensor.numel() * tensor.element_size() <= end


@pytest.mark.parametrize("codec", ["raw", "zstd", "int8"])
@pytest.mark.parametrize("extra", [0.0, 0.5])  # the minimum (all streamed), and room for half the weights
def test_every_weight_lives_in_the_arena_and_the_arena_is_the_plan(codec, extra):
    reference = tiny_model("llama", num_layers=5)
    weights = sum(p.numel() * p.element_size() for p in reference.parameters())
    budget = minimum_gb(reference, codec) + extra * weights / GIB
    model = dispatch_compressed(copy.deepcopy(reference), budget, device="cpu", codec=codec)
    runtime = model._offload_runtime.runtime
    plan = model.offload_plan
    arena = runtime.arena
    assert arena.buffer.numel() == plan.device_bytes <= round(budget * GIB)
    assert arena.used == arena.buffer.numel()  # the pieces handed out add up to the plan, exactly
    for name, tensor in model.state_dict().items():
        if name.endswith("inv_freq"):
            continue  # computed buffers the container does not store
        assert _within(tensor, arena.buffer), name
    model.generate(IDS, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert arena.used == arena.buffer.numel()  # nothing was taken while running
    assert model.offload_stats.peak_weight_bytes == plan.device_bytes
    remove_offload(model)
