"""Assemble a running scheduler for one container: plan, buffers, loader, engine.

``build_runtime`` allocates everything the steady state needs, once: resident groups (decoded now), the
slot pool, staging, host-tier copies. After it returns, a forward only enqueues work and waits on events.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from offload_runtime.native import get_codec
from offload_runtime.native.workspace import DecodeWorkspace
from offload_runtime.scheduler.arena import ARENA_ALIGN, DeviceArena, arena_size
from offload_runtime.scheduler.engine import Engine
from offload_runtime.scheduler.loader import CpuLoader, CudaLoader
from offload_runtime.scheduler.order import ExecutionOrder
from offload_runtime.scheduler.planner import GroupSize, Plan, Tier, plan_placement
from offload_runtime.scheduler.slots import Slot
from offload_runtime.scheduler.stats import OffloadStats

DECODER_DEVICE_ARRAYS = 8  # small device arrays per decoder (sizes, statuses, pointer tables), each rounded
SMALL_ALLOCATION = 1 << 20  # above this, the caching allocator may charge up to 1 MiB more


def allocator_size(nbytes: int) -> int:
    """What the CUDA caching allocator may charge for one allocation of ``nbytes`` (0 for none)."""
    if nbytes <= 0:
        return 0
    return arena_size(nbytes) + (SMALL_ALLOCATION if nbytes > SMALL_ALLOCATION else 0)


def _device_size(entry: Any, decoder: Any) -> GroupSize:
    """Sizes as the CUDA caching allocator will charge them, so the budget holds in memory_allocated().

    Group buffers come from the arena (512-byte pieces); each decoder allocates its own small arrays
    (``scratch_bytes``); the shared decode workspace is one allocation per kind (``workspace_needs``),
    which the planner charges once, at the largest need among streamed groups.
    """
    scratch = getattr(decoder, "scratch_bytes", 0)
    if scratch:
        scratch = allocator_size(scratch) + DECODER_DEVICE_ARRAYS * ARENA_ALIGN
    needs = getattr(decoder, "workspace_needs", None) or {}
    workspace = tuple(sorted((kind, allocator_size(n)) for kind, n in needs.items() if n > 0))
    return GroupSize(
        entry.name, arena_size(entry.decoded_size), arena_size(entry.stored_size), scratch, workspace
    )


@dataclass
class Runtime:
    """Everything the scheduler holds for one dispatched model.

    Attributes:
        plan: the placement.
        engine: the prefetch engine (streamed groups).
        stats: counters (``model.offload_stats``).
        views: group -> {stored tensor name -> typed view into its resident buffer or slot}.
        resident: group -> its decoded buffer on the device.
        slots: the slot pool.
        device: where weights are decoded to.
    """

    plan: Plan
    engine: Engine
    stats: OffloadStats
    views: dict[str, dict[str, torch.Tensor]]
    resident: dict[str, torch.Tensor]
    slots: list[Slot]
    device: torch.device
    source: Any
    streamed: set[str] = field(default_factory=set)

    def decode_fresh(self, name: str) -> dict[str, torch.Tensor]:
        """Decode group ``name`` into a new buffer and return its tensors (for ``remove_offload``)."""
        entry = self.source.group(name)
        buffer = torch.empty(entry.decoded_size, dtype=torch.uint8, device=self.device)
        self.engine.loader.decode_into(name, buffer)
        return entry.layout.views(buffer)

    def close(self) -> None:
        self.engine.close()


def build_runtime(
    source: Any,
    budget_bytes: int,
    *,
    device: torch.device,
    prefetch: int = 1,
    host_budget_bytes: int | None = None,
    keep_resident: Collection[str] = (),
    force_streamed: Collection[str] = (),
    threaded: bool | None = None,
) -> Runtime:
    """Plan and allocate the runtime of ``source`` (a ContainerReader or the like) on ``device``.

    Args:
        source: the container reader.
        budget_bytes (`int`): device budget for weights.
        device (`torch.device`): ``cpu`` or a CUDA device.
        prefetch (`int`, defaults to 1): groups decoded ahead.
        host_budget_bytes (`int`, *optional*): cap on compressed bytes copied into host RAM.
        keep_resident (`Collection[str]`): groups that must not be streamed.
        force_streamed (`Collection[str]`): groups that must be streamed even when they would fit.
        threaded (`bool`, *optional*): run loads on a prefetch thread; by default only when a load can
            block the host (CPU decodes, disk reads), else inline on the compute thread (see the engine).

    Raises:
        BudgetError: when the budget is below the minimum working set.
    """
    entries = list(source.groups)
    on_cuda = device.type == "cuda"
    decoders = {}
    if on_cuda:
        for e in entries:
            decoders[e.name] = get_codec(e.codec).gpu_decoder(e.chunks, e.params, e.layout, device)
    sizes = [
        _device_size(e, decoders.get(e.name)) if on_cuda else GroupSize(e.name, e.decoded_size, e.stored_size)
        for e in entries
    ]
    plan = plan_placement(
        sizes,
        budget_bytes,
        device=device.type,
        prefetch=prefetch,
        host_budget_bytes=host_budget_bytes,
        keep_resident=keep_resident,
        force_streamed=force_streamed,
    )
    stats = OffloadStats()
    streamed = {p.name for p in plan.streamed}
    arena = None
    if on_cuda:
        outside = plan.scratch_bytes + plan.workspace_bytes + plan.overhead_bytes  # allocated by torch
        arena = DeviceArena(plan.device_bytes - outside, device)
        kept = {n: d for n, d in decoders.items() if n in streamed}
        # one workspace for every streamed decoder: their decodes are serialised on the decode stream
        workspace = DecodeWorkspace(device)
        for decoder in kept.values():
            decoder.use_workspace(workspace)
        loader = CudaLoader(source, plan, device, kept, stats, arena, workspace=workspace)
    else:
        loader = CpuLoader(source, plan, stats)

    def allocate(nbytes: int) -> torch.Tensor:
        if arena is not None:
            return arena.take(nbytes)
        return torch.empty(nbytes, dtype=torch.uint8, device=device)

    decoders.clear()

    by_name = {e.name: e for e in entries}
    views: dict[str, dict[str, torch.Tensor]] = {}
    resident: dict[str, torch.Tensor] = {}
    for p in plan.groups:
        if p.tier == Tier.RESIDENT:
            buffer = allocate(p.decoded_bytes)
            loader.decode_into(p.name, buffer)
            resident[p.name] = buffer
            views[p.name] = by_name[p.name].layout.views(buffer)
    slots = []
    for index in range(plan.nslots):
        ready, release = loader.new_slot_events()
        buffer = allocate(plan.slot_bytes)
        slots.append(Slot(index, buffer, ready_event=ready, release_event=release))
    slot_of = {}
    for p in plan.streamed:
        slot_of[p.name] = p.slot
        views[p.name] = by_name[p.name].layout.views(slots[p.slot].buffer)
    if on_cuda:
        torch.cuda.current_stream(device).synchronize()  # resident decodes finished before anyone reads
    stats.peak_weight_bytes = sum(b.numel() for b in resident.values()) + plan.nslots * plan.slot_bytes
    stats.peak_weight_bytes += plan.staging_bytes + plan.scratch_bytes + plan.workspace_bytes
    stats.peak_weight_bytes += sum(p.stored_bytes for p in plan.groups if p.tier == Tier.DEVICE_COMPRESSED)
    order = ExecutionOrder([p.name for p in plan.streamed])
    if threaded is None:
        threaded = loader.blocks_host
    engine = Engine(slots, slot_of, loader, order, prefetch, stats, threaded=threaded)
    loader.follow(order)
    return Runtime(plan, engine, stats, views, resident, slots, device, source, streamed)
