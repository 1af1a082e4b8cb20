"""The expert runtime on the CPU: only routed experts move, through a cache sized by the plan, bit-identical.

Budgets force experts through every path: the minimum (the other groups stream too; the cache has one
entry, so steps routing several experts decode the rest uncached), a budget with a partial cache (hits,
misses, evictions), payload homes in RAM and on disk; batch 1 and 3, prefill and greedy decoding, both
replacement policies; the cache filled at dispatch; every architecture of the tiny MoE configs."""

from __future__ import annotations

import copy
import re

import pytest
import torch

from offload_runtime import dispatch_compressed, load_compressed, remove_offload
from offload_runtime.errors import BudgetError
from offload_runtime.loaders import pack
from offload_runtime.scheduler.planner import GIB
from offload_runtime.tiny import TINY_MOE_ARCHITECTURES, tiny_model


@pytest.fixture(scope="module", params=TINY_MOE_ARCHITECTURES)
def packed(request, tmp_path_factory):
    model = tiny_model(request.param)
    path = pack(
        model, tmp_path_factory.mktemp(request.param) / "model.safetensors", codec="zstd", progress=False
    )
    with pytest.raises(BudgetError) as info:
        load_compressed(path, 1e-9, device="cpu")  # below any minimum: the BudgetError names it
    return request.param, model, path, info.value.expected


def outputs(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
    tokens = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    return logits, tokens


def half_cache_budget(path) -> int:
    """Room for every other group resident (every token uses them: they come first), the experts' fixed
    part, and half the experts in the cache."""
    plan = load_compressed(path, 1.0, device="cpu").offload_plan  # everything fits: the sizes
    experts = plan.experts
    return plan.groups_device_bytes + experts.fixed_bytes + len(experts.experts) // 2 * experts.entry_bytes


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    ("regime", "policy", "host"),
    [
        ("minimum", "lru", None),
        ("half the experts", "lfu", None),
        ("half the experts", "lru", 0.0),
        ("half the experts", "layer-lru", None),
    ],
)
def test_routed_experts_stream_bit_identical_within_budget(packed, batch, regime, policy, host):
    _arch, reference, path, minimum = packed
    budget = minimum if regime == "minimum" else half_cache_budget(path)
    ids = torch.randint(3, 200, (batch, 6), generator=torch.Generator().manual_seed(batch))
    want_logits, want_tokens = outputs(reference, ids)
    model = load_compressed(path, budget / GIB, device="cpu", expert_policy=policy, host_budget_gb=host)
    plan = model.offload_plan
    assert plan.experts is not None, "the container's experts were not streamed on their own"
    got_logits, got_tokens = outputs(model, ids)
    assert torch.equal(got_logits, want_logits)
    assert torch.equal(got_tokens, want_tokens)
    runtime = model._offload_runtime.runtime
    # the plan owns every byte: both arenas are exactly their plans, and together within the budget
    assert runtime.arena.buffer.numel() == plan.groups_device_bytes
    assert runtime.experts.arena.buffer.numel() == plan.experts.device_bytes
    assert plan.device_bytes <= round(budget / GIB * GIB)
    stats = model.offload_stats.experts
    assert stats.requested == stats.hits + stats.misses and stats.misses > 0 and stats.steps > 0
    if regime == "minimum":
        assert plan.experts.capacity == 1 and stats.uncached > 0
        assert any(p.streamed for p in plan.groups)  # the other groups stream as well
    else:
        assert 1 < plan.experts.capacity < len(plan.experts.experts)
        cache = runtime.experts.cache.stats
        assert cache.evictions > 0  # a partial cache: experts come and go
        if batch == 1:  # (batch 3 routes every expert of a layer each step: a cycle the cache cannot hold)
            assert stats.hits > 0
    homes = set(plan.experts.homes.values())
    assert homes == ({"disk"} if host == 0.0 else {"host"})
    if host == 0.0:
        assert stats.disk_bytes > 0
    remove_offload(model)
    assert torch.equal(outputs(model, ids)[0], want_logits)  # whole again, ordinary parameters


def test_the_cache_is_full_at_dispatch_and_the_first_forward_hits(packed):
    """Dispatch fills every entry with experts in execution order, read from their homes (on disk here),
    without counting those bytes as a step's; the first forward then hits the first layer's experts."""
    _arch, reference, path, _minimum = packed
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(7))
    want_logits = outputs(reference, ids)[0]
    model = load_compressed(path, half_cache_budget(path) / GIB, device="cpu", host_budget_gb=0.0)
    runtime, plan = model._offload_runtime.runtime.experts, model.offload_plan.experts
    stats = model.offload_stats.experts
    assert stats.warmed == plan.capacity == len(runtime.cache) > 1
    assert (stats.requested, stats.disk_bytes, stats.h2d_bytes) == (0, 0, 0)
    first = runtime.modules[0]
    in_first_layer = min(plan.capacity, first.num_experts)
    assert sum((first.path, e) in runtime.cache for e in range(first.num_experts)) == in_first_layer
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want_logits)
    assert stats.hits > 0 and stats.requested == stats.hits + stats.misses


def test_block_granularity_on_request(packed):
    _arch, reference, path, _minimum = packed
    ids = torch.randint(3, 200, (2, 5))
    want_logits, want_tokens = outputs(reference, ids)
    model = load_compressed(path, 1.0, device="cpu", experts="block")
    assert model.offload_plan.experts is None and model.offload_stats.experts is None
    got_logits, got_tokens = outputs(model, ids)
    assert torch.equal(got_logits, want_logits) and torch.equal(got_tokens, want_tokens)


def test_dispatch_compressed_streams_experts_too():
    reference = tiny_model("qwen3_moe")
    model = copy.deepcopy(reference)
    ids = torch.randint(3, 200, (1, 6))
    want = outputs(reference, ids)
    from offload_runtime import dispatch_compressed

    dispatch_compressed(model, 0.0015, device="cpu", codec="zstd")
    assert model.offload_plan.experts is not None
    got = outputs(model, ids)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert "experts:" in str(model.offload_stats) and "experts:" in str(model.offload_plan)


def test_chunks_decode_straight_into_the_slot_when_each_lies_inside_a_tensor(tmp_path):
    """The GPU path points each chunk's output at its place in the slot (no copy) when every chunk's decoded
    bytes lie inside one tensor; emulated here with verbatim chunks: the slot then holds exactly the
    expert's slices. A chunk straddling two tensors makes the expert take the decode-then-copy path."""
    from dataclasses import replace

    from offload_runtime.experts import ExpertSlot
    from offload_runtime.loaders import ContainerReader
    from offload_runtime.loaders.moe import find_expert_modules
    from offload_runtime.native.base import Chunk
    from offload_runtime.scheduler.expert_runtime import _Expert, slot_layout

    model = tiny_model("qwen3_moe")
    path = pack(model, tmp_path / "m.safetensors", codec="raw", progress=False)
    module = find_expert_modules(model)[1]
    layout = slot_layout(model, module)
    buffer = torch.full((layout.size,), 0xFF, dtype=torch.uint8)
    slot = ExpertSlot(module.path, module.num_experts, buffer, layout, layout.views(buffer))
    with ContainerReader(path, granularity="expert") as reader:
        entry = next(
            g for g in reader.groups if g.expert and g.expert.module == module.path and g.expert.index == 5
        )
        decoded = reader.decode_cpu(entry.name, torch.empty(entry.decoded_size, dtype=torch.uint8))
    # verbatim chunks of 8 KiB: gate_up_proj[5] (16 KiB) is two, down_proj[5] (8 KiB) one
    chunks = [Chunk(o, 8192, 8192, 0, 0) for o in range(0, entry.decoded_size, 8192)]
    expert = _Expert(replace(entry, chunks=chunks), slot)
    item = expert.direct
    assert item is not None and item.num_chunks == 3
    for off, n, dst in zip(item.offsets, item.decoded, item.out_offsets, strict=True):
        buffer[int(dst) : int(dst) + int(n)] = decoded[int(off) : int(off) + int(n)]
    owner = model.get_submodule(module.path)
    for attr in module.params:
        assert torch.equal(slot.params[attr][5], owner._parameters[attr][5].detach())
    one_chunk = [Chunk(0, entry.decoded_size, entry.decoded_size, 0, 0)]
    assert _Expert(replace(entry, chunks=one_chunk), slot).direct is None


def test_budget_error_names_both_parts_of_the_minimum(packed):
    _arch, _reference, path, minimum = packed
    with pytest.raises(BudgetError) as info:
        load_compressed(path, (minimum - 1) / GIB, device="cpu")
    message = str(info.value)
    assert info.value.expected == minimum and "groups other than the experts" in message
    assert "for the experts (their slot and one cache entry)" in message
    other, experts = (int(n) for n in re.findall(r"(\d+) bytes for", message))
    assert other + experts == minimum  # the terms add up


def _suggested_gb(error: BudgetError) -> float:
    return float(re.search(r"raise budget_gb to at least ([0-9.]+)", str(error)).group(1))


def test_budget_error_suggests_a_budget_that_passes(packed):
    """The hint rounds the minimum up: 4 decimals of GiB rounded to nearest can fall below it."""
    arch, _reference, path, minimum = packed
    with pytest.raises(BudgetError) as info:
        load_compressed(path, (minimum - 1) / GIB, device="cpu")
    suggested = _suggested_gb(info.value)
    assert round(suggested * GIB) >= minimum
    remove_offload(load_compressed(path, suggested, device="cpu"))
    with pytest.raises(BudgetError) as info:  # checkpoint=None: refused before packing, the same hint
        dispatch_compressed(tiny_model(arch), (minimum - 1) / GIB, device="cpu", codec="zstd")
    assert _suggested_gb(info.value) == suggested
    remove_offload(dispatch_compressed(tiny_model(arch), suggested, device="cpu", codec="zstd"))


def test_expert_granularity_reads_the_index_once(packed, monkeypatch):
    """Switching a container to expert granularity re-views the index it read; it does not open and
    validate the file again, and the view equals a reader opened at that granularity."""
    from offload_runtime import api
    from offload_runtime.expert_dispatch import ExpertOptions
    from offload_runtime.loaders import reader as reader_module
    from offload_runtime.loaders.reader import ContainerReader

    _arch, _model, path, _minimum = packed
    calls = []
    real = reader_module.read_container_header
    monkeypatch.setattr(reader_module, "read_container_header", lambda *a: calls.append(1) or real(*a))
    reader = api._open(path, "once", torch.device("cpu"), ExpertOptions())
    assert reader.granularity == "expert" and len(calls) == 1
    monkeypatch.undo()
    with ContainerReader(path, granularity="expert") as direct:
        assert [(g.name, g.expert) for g in reader.groups] == [(g.name, g.expert) for g in direct.groups]
    reader.close()
