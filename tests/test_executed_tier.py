"""The executed_compressed tier (CPU): fused12 groups kept compressed, their linear layers computing from
the planes; the planner puts them there when asked, ahead of decoded residency and of slots; weights exact."""

from __future__ import annotations

import copy

import pytest
import torch

from offload_runtime import dispatch_compressed, remove_offload
from offload_runtime.errors import BudgetError
from offload_runtime.native.fused12_linear import split_workspace_bound
from offload_runtime.scheduler.arena import arena_size
from offload_runtime.scheduler.planner import GIB, plan_placement
from offload_runtime.scheduler.sizes import GroupSize
from offload_runtime.scheduler.tiers import DEVICE_COMPRESSED, EXECUTED_COMPRESSED, HOST, RESIDENT
from offload_runtime.tiny import tiny_model

MIB = 1 << 20


def test_planner_keeps_executable_groups_compressed_without_a_slot():
    blocks = [GroupSize(f"layers.{i}", 100 * MIB, 75 * MIB, executable=True) for i in range(4)]
    other = [GroupSize("embed", 60 * MIB, 45 * MIB)]
    plan = plan_placement([*other, *blocks], 4 * 75 * MIB + 60 * MIB + 2 * MIB, device="cuda")
    tiers = {p.name: p.tier for p in plan.groups}
    assert all(tiers[f"layers.{i}"] is EXECUTED_COMPRESSED for i in range(4)), str(plan)
    assert tiers["embed"] is RESIDENT and plan.nslots == 0
    assert plan.device_bytes <= plan.budget_bytes
    # less room than every block executed compressed (10 x 75 MiB): some stream from host RAM through two
    # slots (+ staging), the rest are still executed compressed
    many = [GroupSize(f"layers.{i}", 100 * MIB, 75 * MIB, executable=True) for i in range(10)]
    tight = plan_placement([*other, *many], 500 * MIB, device="cuda")
    tiers = [p.tier for p in tight.groups]
    assert EXECUTED_COMPRESSED in tiers and HOST in tiers and tight.device_bytes <= tight.budget_bytes
    # not executable: the same budget keeps payloads in slots' VRAM tier instead
    plain = [GroupSize(g.name, g.decoded_bytes, g.stored_bytes) for g in many]
    tiers = {p.tier for p in plan_placement([*other, *plain], tight.budget_bytes, device="cuda").groups}
    assert EXECUTED_COMPRESSED not in tiers and DEVICE_COMPRESSED in tiers


def test_the_plan_leaves_room_for_the_largest_executed_layers_scratch():
    """Executed groups share one kernel scratch (their layers run one after another): the plan charges the
    largest once, and only for groups it executes compressed."""
    blocks = [
        GroupSize(f"layers.{i}", 100 * MIB, 75 * MIB, executable=True, compute_scratch_bytes=(20 + i) * MIB)
        for i in range(4)
    ]
    other = [GroupSize("embed", 60 * MIB, 45 * MIB)]
    roomy = plan_placement([*other, *blocks], GIB, device="cuda")
    assert all(p.tier is EXECUTED_COMPRESSED for p in roomy.groups if p.name.startswith("layers."))
    assert roomy.buffers.compute_scratch_bytes == 23 * MIB
    assert roomy.arena_bytes == roomy.groups_device_bytes - roomy.buffers.overhead_bytes - 23 * MIB
    # 4 x 75 MiB executed + 60 MiB embedding + slack fit, but not with the scratch: two blocks stream
    tight = plan_placement([*other, *blocks], 4 * 75 * MIB + 60 * MIB + 2 * MIB, device="cuda")
    assert tight.device_bytes <= tight.budget_bytes and tight.streamed
    executed = [
        g for g in blocks if any(p.name == g.name and p.tier is EXECUTED_COMPRESSED for p in tight.groups)
    ]
    assert tight.buffers.compute_scratch_bytes == max((g.compute_scratch_bytes for g in executed), default=0)


def test_linear_layers_compute_from_planes_and_come_back_exact():
    reference = tiny_model("llama", num_layers=4, dtype=torch.bfloat16)
    model = copy.deepcopy(reference)
    ids = torch.randint(3, 200, (2, 6))
    with torch.no_grad():
        want = reference(ids).logits
    dispatch_compressed(model, 1.0, device="cpu", codec="fused12", execute_compressed=True)
    plan = model.offload_plan
    executed = plan.in_tier(EXECUTED_COMPRESSED)
    assert {p.name for p in executed} >= {f"model.layers.{i}" for i in range(4)}
    runtime = model._offload_runtime.runtime
    # the plan leaves room for one weight decoded to bf16 (a long input's path), the largest executed one,
    # and for the split-K partials of the widest; the kernels' wrapper allocates them, not the arena
    linears = {n: m for n, m in reference.named_modules() if isinstance(m, torch.nn.Linear)}

    def group_scratch(group: str) -> int:
        weights = [m.weight for n, m in linears.items() if f"{n}.".startswith(f"{group}.")]
        largest = max(w.numel() * w.element_size() for w in weights)
        return arena_size(largest + max(split_workspace_bound(w.shape[0]) for w in weights))

    scratch = max(group_scratch(p.name) for p in executed)
    assert plan.buffers.compute_scratch_bytes == scratch > 0
    assert runtime.arena.buffer.numel() == plan.groups_device_bytes - scratch <= GIB
    assert "executed layers' scratch" in str(plan)
    proj = model.model.layers[1].self_attn.q_proj
    assert (
        proj.weight.stride() == (0, 0)
        and proj.weight.shape == reference.model.layers[1].self_attn.q_proj.weight.shape
    )
    with torch.no_grad():
        got = model(ids).logits
    assert torch.equal(got, want)  # on the CPU the planes are decoded exactly, then F.linear: same kernel
    remove_offload(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert "forward" not in model.model.layers[1].self_attn.q_proj.__dict__


def test_without_the_option_fused12_groups_decode_like_any_codec():
    reference = tiny_model("llama", num_layers=4, dtype=torch.bfloat16)
    model = copy.deepcopy(reference)
    with pytest.raises(BudgetError) as info:
        dispatch_compressed(copy.deepcopy(reference), 1e-9, device="cpu", codec="fused12")
    dispatch_compressed(model, info.value.expected / GIB, device="cpu", codec="fused12")
    assert not model.offload_plan.in_tier(EXECUTED_COMPRESSED) and model.offload_plan.streamed
    ids = torch.randint(3, 200, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
