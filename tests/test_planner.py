"""Placement from budgets: tiers, the minimum working set, small groups, printing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from offload_runtime.errors import BudgetError
from offload_runtime.scheduler.planner import GIB, GroupSize, plan_placement
from offload_runtime.scheduler.tiers import DEVICE_COMPRESSED, DISK, HOST, RESIDENT

MIB = 1 << 20


def blocks(n: int, decoded: int = 100 * MIB, stored: int = 70 * MIB) -> list[GroupSize]:
    return [GroupSize(f"layers.{i}", decoded, stored) for i in range(n)]


def model_groups() -> list[GroupSize]:
    return [GroupSize("embed", 60 * MIB, 40 * MIB), *blocks(6), GroupSize("norm", 4096, 4096)]


def test_everything_resident_when_it_fits():
    plan = plan_placement(model_groups(), 1 * GIB, prefetch=1)
    assert all(p.tier == RESIDENT for p in plan.groups)
    assert plan.nslots == 0 and plan.slot_bytes == 0
    assert plan.device_bytes == sum(g.decoded_bytes for g in model_groups())


def test_minimum_budget_streams_everything_but_small_groups():
    groups = model_groups()
    minimum = 2 * 100 * MIB  # two slots of the largest block; the tiny norm is resident
    plan = plan_placement(groups, minimum + 4096, prefetch=1)
    tiers = {p.name: p.tier for p in plan.groups}
    assert tiers["norm"] == RESIDENT
    assert all(tiers[f"layers.{i}"] == HOST for i in range(6))
    assert plan.nslots == 2 and plan.slot_bytes == 100 * MIB
    assert plan.minimum_bytes == minimum + 4096
    assert plan.device_bytes <= plan.budget_bytes
    assert [p.slot for p in plan.streamed] == [i % 2 for i in range(len(plan.streamed))]


def test_half_resident():
    plan = plan_placement(model_groups(), 2 * 100 * MIB + 4096 + 3 * 100 * MIB + 60 * MIB, prefetch=1)
    resident = [p.name for p in plan.groups if p.tier == RESIDENT]
    streamed = [p.name for p in plan.streamed]
    assert len(streamed) >= 2 and "embed" in resident and "norm" in resident
    assert [n for n in resident if n.startswith("layers.")] == ["layers.0", "layers.1", "layers.2"]
    assert plan.device_bytes <= plan.budget_bytes


def test_budget_error_names_largest_group_and_numbers():
    groups = model_groups()
    with pytest.raises(BudgetError) as info:
        plan_placement(groups, 150 * MIB, prefetch=2)
    err = info.value
    assert err.expected == 3 * 100 * MIB + 4096  # three slots for prefetch=2, plus the resident norm
    assert err.actual == 150 * MIB
    assert err.group == "layers.0"
    assert "layers.0" in str(err) and "3 slots" in str(err) and "budget_gb" in str(err)


def test_huge_embedding_is_made_resident_to_shrink_slots():
    # an embedding 10x a block: streaming it would need 2 slots of its size; keeping it resident is cheaper
    groups = [GroupSize("embed", 1000 * MIB, 900 * MIB), *blocks(4)]
    plan = plan_placement(groups, 1300 * MIB, prefetch=1)
    assert plan.placement("embed").tier == RESIDENT
    assert plan.slot_bytes == 100 * MIB
    assert plan.minimum_bytes == 1000 * MIB + 2 * 100 * MIB


def test_cuda_counts_staging_and_scratch_and_keeps_payloads_on_device():
    groups = [GroupSize(f"layers.{i}", 100 * MIB, 70 * MIB, scratch_bytes=MIB) for i in range(6)]
    # slots, staging, every streamed decoder's scratch, and the allocator slack (1 MiB) on CUDA
    minimum = 2 * 100 * MIB + 2 * 70 * MIB + 6 * MIB + MIB
    with pytest.raises(BudgetError) as info:
        plan_placement(groups, minimum - 1, device="cuda", prefetch=1)
    assert info.value.expected == minimum
    plan = plan_placement(groups, minimum + 90 * MIB, device="cuda", prefetch=1)
    tiers = [p.tier for p in plan.groups]  # 90 MiB left: no room for a decoded block, room for one payload
    assert sorted(t.name for t in tiers) == ["device_compressed"] + ["host"] * 5
    assert plan.device_bytes <= plan.budget_bytes


@pytest.mark.parametrize("in_vram", [1, 20, 40, 59, 77])
def test_payloads_crossing_pcie_are_spread_over_the_pass(in_vram):
    # 80 equal blocks, room for ``in_vram`` payloads on the device: the rest, copied ahead over PCIe while the
    # others decode from VRAM, must not be bunched together (a run of them would serialise on the copy engine)
    groups = [GroupSize(f"layers.{i}", 100 * MIB, 70 * MIB) for i in range(80)]
    slots_staging_slack = 2 * 100 * MIB + 2 * 70 * MIB + MIB
    plan = plan_placement(groups, slots_staging_slack + in_vram * 70 * MIB, device="cuda", prefetch=1)
    host = [i for i, p in enumerate(plan.groups) if p.tier == HOST]
    assert len(host) == 80 - in_vram
    gaps = [(b - a) % 80 for a, b in zip(host, host[1:] + host[:1], strict=True)] if len(host) > 1 else [80]
    assert max(gaps) <= 2 * -(-80 // len(host)), host


def test_host_budget_sends_the_rest_to_disk():
    plan = plan_placement(blocks(6), 200 * MIB, prefetch=1, host_budget_bytes=150 * MIB)
    tiers = [p.tier for p in plan.groups]
    assert tiers.count(HOST) == 2 and tiers.count(DISK) == 4
    cuda = plan_placement(blocks(6), 400 * MIB, device="cuda", prefetch=1, host_budget_bytes=0)
    assert cuda.host_staging_bytes == 2 * 70 * MIB  # pinned ring for disk reads


def test_depth_larger_than_streamed_groups_caps_slots():
    plan = plan_placement(
        blocks(3), 300 * MIB, prefetch=8, force_streamed={"layers.0", "layers.1", "layers.2"}
    )
    assert plan.nslots == 3
    assert [p.slot for p in plan.groups] == [0, 1, 2]


def test_plan_prints_every_group_with_tier_and_totals():
    plan = plan_placement(model_groups(), 350 * MIB, prefetch=1)
    text = str(plan)
    for p in plan.groups:
        assert p.name in text
    assert "resident" in text and "host" in text and "totals (decoded / stored):" in text
    assert f"{plan.nslots} slots" in text


def test_plan_header_and_totals_say_whether_they_count_decoded_or_stored_bytes():
    plan = plan_placement(model_groups(), 350 * MIB, prefetch=1, host_budget_bytes=150 * MIB)
    lines = str(plan).splitlines()
    host = [p for p in plan.groups if p.tier == HOST]
    host_stored = f"{sum(p.stored_bytes for p in host) / MIB:.2f} MiB"
    host_decoded = f"{sum(p.decoded_bytes for p in host) / MIB:.2f} MiB"
    assert host and host_stored != host_decoded
    ring = f"{plan.host_staging_bytes / MIB:.2f} MiB"
    assert f"host RAM, outside the budget: {plan.host_bytes / MIB:.2f} MiB" in lines[2]
    assert f"host tier groups {host_stored} stored + staging ring {ring}" in lines[2]
    assert f"host {len(host)} groups {host_decoded} / {host_stored}" in lines[-1]
    assert f"{plan.nslots} slots x {plan.slot_bytes / MIB:.2f} MiB decoded" in lines[1]


def test_prefetch_must_be_positive():
    with pytest.raises(ValueError, match="prefetch"):
        plan_placement(blocks(2), GIB, prefetch=0)


def test_shared_decode_workspace_is_charged_once_per_kind():
    """Per-group arrays count for every streamed group; the shared workspace once, at the largest need."""
    need = {i: (20 + i) * MIB for i in range(6)}  # nvCOMP temp space, larger than a group's own arrays
    groups = [
        GroupSize(
            f"layers.{i}", 100 * MIB, 70 * MIB, scratch_bytes=MIB, workspace=(("nvcomp-zstd", need[i]),)
        )
        for i in range(6)
    ]
    fixed = 2 * 100 * MIB + 2 * 70 * MIB + 6 * MIB + MIB  # slots, staging, per-group arrays, allocator slack
    with pytest.raises(BudgetError) as info:
        plan_placement(groups, 0, device="cuda", prefetch=1)
    assert info.value.expected == fixed + need[5]  # not sum(need.values()): one buffer, reused by all
    plan = plan_placement(groups, fixed + need[5], device="cuda", prefetch=1)
    assert plan.workspace_bytes == need[5] and plan.scratch_bytes == 6 * MIB
    assert plan.device_bytes == fixed + need[5] <= plan.budget_bytes
    assert "shared workspace 25.00 MiB" in str(plan)
    # two kinds (int8's stored bytes and nvCOMP's temp space) are two buffers: the largest of each
    mixed = [GroupSize("a", 100 * MIB, 70 * MIB, 0, (("int8-stored", 50 * MIB), ("nvcomp-ans", MIB)))]
    mixed += [GroupSize("b", 100 * MIB, 70 * MIB, 0, (("int8-stored", 40 * MIB), ("nvcomp-ans", 3 * MIB)))]
    plan = plan_placement(mixed, GIB, device="cuda", prefetch=1, force_streamed={"a", "b"})
    assert plan.workspace_bytes == 50 * MIB + 3 * MIB


def test_shared_workspace_counts_only_streamed_groups():
    # the workspace of a group that ends up resident is not needed: a large one must not inflate the plan
    groups = [GroupSize("embed", 300 * MIB, 200 * MIB, 0, (("nvcomp-zstd", 90 * MIB),))]
    groups += [
        GroupSize(f"layers.{i}", 100 * MIB, 70 * MIB, 0, (("nvcomp-zstd", 10 * MIB),)) for i in range(4)
    ]
    plan = plan_placement(groups, 300 * MIB + 2 * 100 * MIB + 2 * 70 * MIB + 10 * MIB + MIB, device="cuda")
    assert plan.placement("embed").tier == RESIDENT
    assert plan.workspace_bytes == 10 * MIB


def test_streaming_zstd_is_cheaper_than_resident_with_a_shared_workspace():
    """The reason for sharing: per-group nvCOMP Zstd scratch made streaming cost more than residency."""
    blocks = [
        GroupSize(f"layers.{i}", 100 * MIB, 70 * MIB, 0, (("nvcomp-zstd", 60 * MIB),)) for i in range(8)
    ]
    plan = plan_placement(blocks, 8 * 100 * MIB - 1, device="cuda", prefetch=1)
    assert plan.streamed and plan.workspace_bytes == 60 * MIB
    # slots + staging + one workspace + slack; charged per group it would be 821 MiB, above all-resident
    assert plan.minimum_bytes == (2 * 100 + 2 * 70 + 60 + 1) * MIB < 8 * 100 * MIB


def test_group_sizes_come_from_the_codecs_size_query(monkeypatch):
    """Per-group decoder arrays and the shared workspace are measured by the codec's pure size query (no
    allocation), each piece rounded as the arena will hand it out; on the CPU a group has neither."""
    import torch

    from offload_runtime.native.base import DecoderSizes
    from offload_runtime.native.raw import RawCodec
    from offload_runtime.scheduler.arena import ARENA_ALIGN, arena_size
    from offload_runtime.scheduler.sizes import measure_group

    def sizes(self, chunks, params, layout):
        return DecoderSizes(pieces=(4096, 100), workspace=(("nvcomp-zstd", 30 * MIB + 5), ("int8-stored", 0)))

    monkeypatch.setattr(RawCodec, "gpu_decoder_sizes", sizes)
    entry = SimpleNamespace(
        name="layers.0",
        codec="raw",
        params={},
        chunks=[],
        layout=None,
        decoded_size=100 * MIB + 1,
        stored_size=70 * MIB + 3,
    )
    size = measure_group(entry, torch.device("cuda"))  # a size query: no CUDA needed
    assert size.scratch_bytes == 4096 + ARENA_ALIGN
    assert size.workspace == (("nvcomp-zstd", 30 * MIB + ARENA_ALIGN),)
    assert (size.decoded_bytes, size.stored_bytes) == (arena_size(100 * MIB + 1), arena_size(70 * MIB + 3))
    on_cpu = measure_group(entry, torch.device("cpu"))
    assert on_cpu.workspace == () and on_cpu.scratch_bytes == 0


def test_decode_workspace_reserves_the_largest_need_of_each_kind():
    from offload_runtime.native.workspace import DecodeWorkspace

    workspace = DecodeWorkspace("cpu")  # reservation is host bookkeeping: no device touched
    workspace.reserve({"nvcomp-ans": 5 * MIB})
    workspace.reserve({"nvcomp-ans": 3 * MIB, "int8-stored": 7 * MIB})
    assert workspace.sizes == {"nvcomp-ans": 5 * MIB, "int8-stored": 7 * MIB}
    assert workspace.nbytes == 12 * MIB
    assert "nvcomp-ans" in repr(workspace)


def test_a_workspace_kind_that_needs_nothing_takes_nothing_from_the_arena():
    """nvCOMP's ANS decode needs no temp space: the plan charges 0 for the kind, so the fixed workspace must
    take 0 bytes for it (a 1-byte piece costs 512 in the arena and overflows a plan sized to the byte)."""
    import torch

    from offload_runtime.native.workspace import DecodeWorkspace
    from offload_runtime.scheduler.arena import DeviceArena

    arena = DeviceArena(1024, torch.device("cpu"))
    workspace = DecodeWorkspace("cpu", allocate=arena.take)
    workspace.reserve({"nvcomp-ans": 0, "int8-stored": 1000})
    for kind in ("nvcomp-ans", "int8-stored"):
        workspace._buffer(kind, None)  # what allocate(stream) does per kind
    assert arena.used == 1024


def test_cuda_keeps_payloads_in_vram_before_making_groups_resident():
    # 24 blocks of 100 MiB compressing to 66 MiB: a budget of 3/4 of the weights holds every payload on the
    # device plus two slots (no staging: nothing crosses PCIe per token); the leftover makes some resident
    groups = blocks(24, decoded=100 * MIB, stored=66 * MIB)
    budget = int(0.75 * 24 * 100 * MIB)
    plan = plan_placement(groups, budget, device="cuda", prefetch=1)
    tiers = [p.tier for p in plan.groups]
    assert HOST not in tiers and DISK not in tiers, str(plan)
    assert tiers.count(DEVICE_COMPRESSED) >= 1
    assert plan.staging_bytes == 0 and plan.device_bytes <= budget


def test_cuda_prefers_more_groups_in_vram_over_more_resident_bytes():
    # when not everything fits, compressed payloads in VRAM save more PCIe traffic per budget byte
    groups = blocks(12, decoded=100 * MIB, stored=50 * MIB)
    budget = 610 * MIB  # 10 MiB of room for the allocator slack
    plan = plan_placement(groups, budget, device="cuda", prefetch=1)
    in_vram = [p for p in plan.groups if p.tier in (RESIDENT, DEVICE_COMPRESSED)]
    over_pcie = sum(p.stored_bytes for p in plan.groups if p.tier in (HOST, DISK))
    # slots (2 x 100) + staging (2 x 50) leave ~300 MiB: six payloads of 50, not three resident blocks
    assert len(in_vram) == 6 and over_pcie == 6 * 50 * MIB, str(plan)
    assert all(p.tier == DEVICE_COMPRESSED for p in in_vram)


def _terms_total(message: str) -> int:
    """Sum of the terms a BudgetError lists after '='; 'N slots x S' counts N * S."""
    import re

    total = 0
    for term in message.split(" = ", 1)[1].split(" [")[0].split(" + "):
        numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", term.split("(")[0])]
        total += numbers[0] * numbers[1] if "slots x" in term else numbers[-1]
    return total


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("prefetch", [1, 2])
def test_budget_error_terms_add_up_to_the_minimum(device, prefetch):
    groups = [GroupSize("embed", 40 * MIB, 30 * MIB, MIB, (("nvcomp-ans", 3 * MIB),))]
    groups += [
        GroupSize(f"layers.{i}", 100 * MIB, 70 * MIB, MIB, (("nvcomp-ans", 5 * MIB),)) for i in range(8)
    ]
    groups += [GroupSize("norm", 4096, 4096)]
    with pytest.raises(BudgetError) as info:
        plan_placement(groups, 10 * MIB, device=device, prefetch=prefetch)
    assert "0 slots" not in str(info.value)  # streaming is the cheapest structure here
    message = str(info.value)
    assert _terms_total(message) == info.value.expected
    for word in (
        "slots x",
        "resident groups",
        "staging",
        "codec scratch",
        "decode workspace",
        "dispatch window",
        "allocator slack",
    ):
        assert word in message
    assert f"{info.value.expected:,} bytes" in message and f"budget {10 * MIB:,} bytes" in message
    # the hint's budget passes: it is rounded up, not down
    need = float(message.split("raise budget_gb to at least ")[1].split(",")[0])
    plan_placement(groups, round(need * GIB), device=device, prefetch=prefetch)
    assert ("lower prefetch" in message) == (prefetch > 1)


def test_budget_error_terms_add_up_with_an_executed_layers_scratch():
    """A group kept executed compressed brings its layers' kernel scratch into the minimum: named, counted."""
    blocks = [
        GroupSize(f"layers.{i}", 100 * MIB, 75 * MIB, executable=True, compute_scratch_bytes=(20 + i) * MIB)
        for i in range(4)
    ]
    with pytest.raises(BudgetError) as info:
        plan_placement(blocks, MIB, device="cuda", keep_resident={"layers.3"})
    message = str(info.value)
    assert f"scratch of the layers executed compressed {23 * MIB:,}" in message
    assert _terms_total(message) == info.value.expected


def test_budget_error_does_not_suggest_lowering_prefetch_that_cannot_help():
    with pytest.raises(BudgetError) as info:
        plan_placement(blocks(2), MIB, prefetch=4)  # 2 streamed groups: 2 slots whatever the prefetch
    assert "prefetch" not in info.value.hint


def test_budget_error_when_everything_resident_is_the_minimum():
    with pytest.raises(BudgetError) as info:
        plan_placement(
            [GroupSize("a", 100 * MIB, 70 * MIB), GroupSize("b", 100 * MIB, 70 * MIB)], MIB, device="cuda"
        )
    assert "0 slots (every group resident)" in str(info.value)
    assert _terms_total(str(info.value)) == info.value.expected == 200 * MIB + MIB  # + allocator slack
