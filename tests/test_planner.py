"""Placement from budgets: tiers, the minimum working set, small groups, printing."""

from __future__ import annotations

import pytest

from offload_runtime.errors import BudgetError
from offload_runtime.scheduler.planner import GIB, GroupSize, Tier, plan_placement

MIB = 1 << 20


def blocks(n: int, decoded: int = 100 * MIB, stored: int = 70 * MIB) -> list[GroupSize]:
    return [GroupSize(f"layers.{i}", decoded, stored) for i in range(n)]


def model_groups() -> list[GroupSize]:
    return [GroupSize("embed", 60 * MIB, 40 * MIB), *blocks(6), GroupSize("norm", 4096, 4096)]


def test_everything_resident_when_it_fits():
    plan = plan_placement(model_groups(), 1 * GIB, prefetch=1)
    assert all(p.tier == Tier.RESIDENT for p in plan.groups)
    assert plan.nslots == 0 and plan.slot_bytes == 0
    assert plan.device_bytes == sum(g.decoded_bytes for g in model_groups())


def test_minimum_budget_streams_everything_but_small_groups():
    groups = model_groups()
    minimum = 2 * 100 * MIB  # two slots of the largest block; the tiny norm is resident
    plan = plan_placement(groups, minimum + 4096, prefetch=1)
    tiers = {p.name: p.tier for p in plan.groups}
    assert tiers["norm"] == Tier.RESIDENT
    assert all(tiers[f"layers.{i}"] == Tier.HOST for i in range(6))
    assert plan.nslots == 2 and plan.slot_bytes == 100 * MIB
    assert plan.minimum_bytes == minimum + 4096
    assert plan.device_bytes <= plan.budget_bytes
    assert [p.slot for p in plan.streamed] == [i % 2 for i in range(len(plan.streamed))]


def test_half_resident():
    plan = plan_placement(model_groups(), 2 * 100 * MIB + 4096 + 3 * 100 * MIB + 60 * MIB, prefetch=1)
    resident = [p.name for p in plan.groups if p.tier == Tier.RESIDENT]
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
    assert plan.placement("embed").tier == Tier.RESIDENT
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
    assert tiers == [Tier.DEVICE_COMPRESSED] + [Tier.HOST] * 5
    assert plan.device_bytes <= plan.budget_bytes


def test_host_budget_sends_the_rest_to_disk():
    plan = plan_placement(blocks(6), 200 * MIB, prefetch=1, host_budget_bytes=150 * MIB)
    tiers = [p.tier for p in plan.groups]
    assert tiers.count(Tier.HOST) == 2 and tiers.count(Tier.DISK) == 4
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
    assert "resident" in text and "host" in text and "totals:" in text
    assert f"{plan.nslots} slots" in text


def test_prefetch_must_be_positive():
    with pytest.raises(ValueError, match="prefetch"):
        plan_placement(blocks(2), GIB, prefetch=0)
