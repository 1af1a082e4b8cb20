"""Assemble a running scheduler for one group source: plan, arena, tier stores, loader, slots, engine.

``build_runtime`` allocates everything the steady state needs, once, and all of it as the plan sized it:
one arena (the device budget) holds, in this order, the streaming region (slots, staging, and the dispatch
window that overlaps them), every slot group's decoder arrays, the shared decode workspace, and what each
tier keeps for its groups (resident groups decoded now, payloads kept in VRAM). Host-tier copies and the
host ring are host RAM. After it returns, a forward only enqueues work and waits on events.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from offload_runtime.loaders.format import GroupEntry
from offload_runtime.loaders.source import GroupSource
from offload_runtime.native import GpuDecoder, get_codec
from offload_runtime.native.workspace import DecodeWorkspace
from offload_runtime.scheduler.arena import BumpAllocator, DeviceArena
from offload_runtime.scheduler.cuda_loader import CudaLoader
from offload_runtime.scheduler.engine import Engine
from offload_runtime.scheduler.loader import CpuLoader, Loader
from offload_runtime.scheduler.order import ExecutionOrder
from offload_runtime.scheduler.pcie import PcieStager
from offload_runtime.scheduler.pinning import pin_by_registering
from offload_runtime.scheduler.planner import Plan, plan_placement
from offload_runtime.scheduler.sizes import measure_groups
from offload_runtime.scheduler.slots import Slot
from offload_runtime.scheduler.stats import OffloadStats
from offload_runtime.scheduler.tiers import Tier, TierContext, TierStore
from offload_runtime.scheduler.timing import GpuTimer


@dataclass
class Runtime:
    """Everything the scheduler holds for one dispatched model.

    Attributes:
        plan: the placement.
        engine: the prefetch engine (slot groups).
        stats: counters (``model.offload_stats``).
        views: group -> {stored tensor name -> typed view into its resident buffer or slot, or the compute
            format's object (fused12 planes) for a group executed compressed}.
        stores: tier -> its store (what the tier holds for its groups).
        slots: the slot pool.
        device: where weights are decoded to.
        source: where the groups come from.
        arena: the one device allocation.
        streamed: groups that use a slot (acquired and released around their forwards).
    """

    plan: Plan
    engine: Engine
    stats: OffloadStats
    views: dict[str, dict[str, torch.Tensor]]
    stores: dict[Tier, TierStore]
    slots: list[Slot]
    device: torch.device
    source: GroupSource
    arena: DeviceArena
    streamed: set[str] = field(default_factory=set)
    experts: Any = None  # the ExpertRuntime, when experts stream on their own

    def decode_fresh(self, name: str) -> dict[str, torch.Tensor]:
        """Decode group ``name`` into a new buffer and return its tensors (for ``remove_offload``)."""
        entry = self.source.group(name)
        buffer = torch.empty(entry.decoded_size, dtype=torch.uint8, device=self.device)
        self.engine.loader.decode_into(entry, buffer)
        return entry.layout.views(buffer)

    def close(self) -> None:
        self.engine.close()
        if self.experts is not None:
            self.experts.close()


def build_runtime(
    source: GroupSource,
    budget_bytes: int,
    *,
    device: torch.device,
    prefetch: int = 1,
    host_budget_bytes: int | None = None,
    keep_resident: Collection[str] = (),
    force_streamed: Collection[str] = (),
    threaded: bool | None = None,
    executable: Collection[str] = (),
) -> Runtime:
    """Plan and allocate the runtime of ``source`` on ``device``.

    Args:
        source (`GroupSource`): the container reader (or a synthetic source).
        budget_bytes (`int`): device budget for weights.
        device (`torch.device`): ``cpu`` or a CUDA device.
        prefetch (`int`, defaults to 1): groups decoded ahead.
        host_budget_bytes (`int`, *optional*): cap on compressed bytes copied into host RAM.
        keep_resident (`Collection[str]`): groups that must not be streamed.
        force_streamed (`Collection[str]`): groups that must be streamed even when they would fit.
        threaded (`bool`, *optional*): run loads on a prefetch thread; by default only when a load can
            block the host (CPU decodes, disk reads), else inline on the compute thread (see the engine).
        executable (`Collection[str]`): groups whose linear layers may compute from their payload (the
            ``executed_compressed`` tier takes them when it fits).

    Raises:
        BudgetError: when the budget is below the minimum working set.
    """
    plan = plan_placement(
        measure_groups(source.groups, device, executable),
        budget_bytes,
        device=device.type,
        prefetch=prefetch,
        host_budget_bytes=host_budget_bytes,
        keep_resident=keep_resident,
        force_streamed=force_streamed,
    )
    stats = OffloadStats()
    if device.type == "cuda":
        pin_by_registering()  # before anything is pinned: host-tier payloads, rings (pinning.py says why)
    arena = DeviceArena(plan.arena_bytes, device)
    streaming = arena.take(plan.buffers.streaming_region_bytes)  # slots, staging, dispatch window
    region = BumpAllocator(streaming)
    slot_buffers = [region.take(plan.slot_bytes) for _ in range(plan.nslots)]
    loader_ref: list[Loader] = []

    def decode_resident(entry: GroupEntry, out: torch.Tensor) -> None:
        loader_ref[0].decode_into(entry, out, streaming)  # before any load: the region is free

    ctx = TierContext(source, device, arena, stats, decode_resident, pinned=device.type == "cuda")
    stores = {tier: tier.open(ctx) for tier in plan.tiers}
    store_of = {p.name: stores[p.tier] for p in plan.groups}
    loader = _make_loader(source, plan, device, arena, region, stats, store_of)
    loader_ref.append(loader)
    _place_groups(source, plan, store_of, loader)
    slots = _make_slots(plan, slot_buffers, loader)
    views = _bind_views(source, plan, store_of, slots)
    stats.peak_weight_bytes = plan.groups_device_bytes
    order = ExecutionOrder([p.name for p in plan.streamed])
    engine = Engine(
        slots,
        {p.name: p.slot for p in plan.streamed},
        loader,
        order,
        prefetch,
        stats,
        threaded=loader.blocks_host if threaded is None else threaded,
    )
    loader.follow(order)
    streamed = {p.name for p in plan.streamed}
    return Runtime(plan, engine, stats, views, stores, slots, device, source, arena, streamed)


def _make_loader(
    source: GroupSource,
    plan: Plan,
    device: torch.device,
    arena: DeviceArena,
    region: BumpAllocator,
    stats: OffloadStats,
    store_of: dict[str, TierStore],
) -> Loader:
    """The CPU loader, or the CUDA loader with its stager, decoders and shared workspace (from the arena)."""
    if device.type != "cuda":
        return CpuLoader(source, plan, stats, store_of)
    timer = GpuTimer(stats)
    decode_stream = torch.cuda.Stream(device)
    over_pcie = [p.name for p in plan.streamed if p.tier.crosses_pcie("cuda")]
    pcie = PcieStager(over_pcie, plan.buffers, region, device, timer)
    # one workspace for every decoder: their decodes are serialised on the decode stream
    workspace = DecodeWorkspace(device, allocate=arena.take)
    workspace.reserve(dict(plan.buffers.workspace))
    workspace.allocate(decode_stream)  # now, not in the first forward
    decoders = {p.name: _decoder(source.group(p.name), device, arena, workspace) for p in plan.streamed}
    return CudaLoader(source, device, store_of, decoders, workspace, pcie, timer, stats, decode_stream)


def _decoder(
    entry: GroupEntry, device: torch.device, arena: DeviceArena, workspace: DecodeWorkspace
) -> GpuDecoder:
    codec = get_codec(entry.codec)
    decoder = codec.gpu_decoder(entry.chunks, entry.params, entry.layout, device, arena.take)
    decoder.use_workspace(workspace)
    return decoder


def _place_groups(source: GroupSource, plan: Plan, store_of: dict[str, TierStore], loader: Loader) -> None:
    """Each tier keeps what it holds for its groups: resident groups are decoded now (through the dispatch
    window), payloads copied into VRAM or pinned host RAM."""
    for p in plan.groups:
        store_of[p.name].place(source.group(p.name))
    for store in set(store_of.values()):
        store.finish_placing()
    loader.finish_dispatch()  # resident decodes finished before anyone reads


def _make_slots(plan: Plan, buffers: list[torch.Tensor], loader: Loader) -> list[Slot]:
    slots = []
    for index, buffer in enumerate(buffers):
        ready, release = loader.new_slot_events()
        slots.append(Slot(index, buffer, ready_event=ready, release_event=release))
    return slots


def _bind_views(
    source: GroupSource, plan: Plan, store_of: dict[str, TierStore], slots: list[Slot]
) -> dict[str, dict[str, torch.Tensor]]:
    """Every group's tensors as views: into its tier's buffer, or into its slot (permanent views); a group
    kept in a compute format gives its tensors in that format (planes for its linear layers)."""
    views = {}
    for p in plan.groups:
        computed = None if p.streamed else store_of[p.name].compute_views(p.name)
        if computed is not None:
            views[p.name] = computed
            continue
        buffer = slots[p.slot].buffer if p.streamed else store_of[p.name].buffer(p.name)
        views[p.name] = source.group(p.name).layout.views(buffer)
    return views
