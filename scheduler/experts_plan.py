"""The expert part of a plan: one expert slot, a cache of experts in the budget, a home for every expert.

In an expert-granular runtime the routed experts of a mixture of experts are groups of their own; the plan
of the other groups (attention, norms, routers, shared experts: used by every token) is made first by
:func:`~offload_runtime.scheduler.planner.plan_placement`, and what it leaves of the budget goes here:

* **the expert slot**: one buffer holding an experts module's stacked parameters at full shape; every
  experts module's parameters are permanent views into it (they run one after another), and only the routed
  experts' slices are written before each forward (``offload_runtime/experts.py``);
* **the cache**: ``capacity`` entries of ``entry_bytes`` each. In ``"compressed"`` mode (CUDA) an entry holds
  an expert's payload, decoded into the slot on every use (a miss copies the payload over PCIe straight into
  its entry); in ``"decoded"`` mode it holds the decoded expert, copied into the slot on use (a miss is copied
  into a staging buffer and decoded into its entry). The CPU always uses ``"decoded"`` entries (its device
  is RAM holding decoded weights);
* what loads need: staging buffers (experts that find no entry, decoded-mode fills), the batched decoder's
  arrays, the decode workspace, a scratch buffer for experts whose chunks straddle tensors, the allocator
  slack of the arena;
* **homes**: each expert's payload is kept in (pinned) host RAM while the host budget lasts, else read from
  the container on a miss (through a pinned ring on CUDA). When the cache holds every expert, payloads are
  placed in it at dispatch and no home is kept.

Everything above the cache is fixed; the cache takes whatever budget is left, so ``device_bytes`` never
exceeds the budget, and a budget that cannot hold the fixed part and one entry is a ``BudgetError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from offload_runtime.display import mib
from offload_runtime.errors import BudgetError
from offload_runtime.scheduler.arena import arena_size
from offload_runtime.scheduler.planner import (
    CUDA_ALLOCATOR_SLACK,
    DEVICE_STAGING_BUFFERS,
    GIB,
    HOST_RING_BUFFERS,
)
from offload_runtime.scheduler.sizes import arena_decoder_sizes

ENTRY_MODES = ("compressed", "decoded")
BATCH_EXPERTS = 16  # experts per batched decode call (a step routing more makes several calls)


@dataclass(frozen=True)
class ExpertSize:
    """One expert group, as the expert plan needs it.

    Attributes:
        name: the group.
        module: its experts module.
        index: the expert.
        decoded_bytes, stored_bytes: arena-rounded sizes.
        chunks: how many chunks its payload has.
        max_chunk: its largest decoded chunk.
    """

    name: str
    module: str
    index: int
    decoded_bytes: int
    stored_bytes: int
    chunks: int
    max_chunk: int


@dataclass
class ExpertPlan:
    """Where the experts live and what their runtime holds (see the module docstring).

    Attributes:
        device: ``"cpu"`` or ``"cuda"``.
        budget_bytes: what the expert part may hold on the device.
        mode: ``"compressed"`` or ``"decoded"`` cache entries.
        policy: the cache's replacement policy (``"layer-lru"``, ``"lru"`` or ``"lfu"``).
        slot_bytes: the expert slot (the largest experts module's stacked parameters).
        entry_bytes: one cache entry.
        capacity: cache entries.
        staging_count, staging_each: device staging buffers for loads that have no entry to land in.
        batch_chunks: chunks per batched decode call.
        decoder_bytes: the batched decoder's own arrays.
        workspace: ``(kind, bytes)`` of the decode workspace.
        scratch_bytes: one expert decoded, for experts whose chunks cannot decode straight into the slot.
        host_ring_count, host_ring_each: host buffers disk reads land in (pinned on CUDA).
        overhead_bytes: allocator slack of the expert arena (CUDA).
        homes: expert group -> ``"host"``, ``"disk"``, or ``"cache"`` (all experts fit: placed at dispatch).
        experts: every expert group's size, in group order.
    """

    device: str
    budget_bytes: int
    mode: str
    policy: str
    slot_bytes: int
    entry_bytes: int
    capacity: int
    staging_count: int = 0
    staging_each: int = 0
    batch_chunks: int = 0
    decoder_bytes: int = 0
    workspace: tuple[tuple[str, int], ...] = ()
    scratch_bytes: int = 0
    host_ring_count: int = 0
    host_ring_each: int = 0
    overhead_bytes: int = 0
    homes: dict[str, str] = field(default_factory=dict)
    experts: list[ExpertSize] = field(default_factory=list)

    @property
    def fixed_bytes(self) -> int:
        """Device bytes besides the cache entries."""
        workspace = sum(n for _, n in self.workspace)
        staging = self.staging_count * self.staging_each
        return (
            self.slot_bytes
            + staging
            + self.decoder_bytes
            + workspace
            + self.scratch_bytes
            + self.overhead_bytes
        )

    @property
    def device_bytes(self) -> int:
        return self.fixed_bytes + self.capacity * self.entry_bytes

    @property
    def host_bytes(self) -> int:
        homes = sum(e.stored_bytes for e in self.experts if self.homes.get(e.name) == "host")
        return homes + self.host_ring_count * self.host_ring_each

    def summary(self) -> str:
        counts = {
            home: sum(1 for h in self.homes.values() if h == home) for home in ("cache", "host", "disk")
        }
        homes = ", ".join(f"{home} {n}" for home, n in counts.items() if n)
        return (
            f"experts: {len(self.experts)} groups (homes: {homes}); cache {self.capacity} {self.mode} "
            f"entries x {mib(self.entry_bytes)} ({self.policy}), slot {mib(self.slot_bytes)}, "
            f"{mib(self.device_bytes)} of {mib(self.budget_bytes)}"
        )

    def __str__(self) -> str:
        return (
            f"expert plan on {self.device}: {self.summary()}\n"
            f"  fixed {mib(self.fixed_bytes)} (slot {mib(self.slot_bytes)}, staging "
            f"{self.staging_count} x {mib(self.staging_each)}, decoder {mib(self.decoder_bytes)}, "
            f"workspace {mib(sum(n for _, n in self.workspace))}, scratch {mib(self.scratch_bytes)}), host "
            f"{mib(self.host_bytes)}"
        )


def plan_experts(
    experts: Sequence[ExpertSize],
    slot_bytes: int,
    budget_bytes: int,
    *,
    device: str,
    host_budget_bytes: int | None = None,
    mode: str | None = None,
    policy: str = "layer-lru",
    decoder_sizes=None,
) -> ExpertPlan:
    """Size the expert part of a runtime (see the module docstring).

    Args:
        experts: every expert group.
        slot_bytes: the largest experts module's stacked parameters (arena-rounded).
        budget_bytes: what the expert part may hold on the device.
        device: ``"cpu"`` or ``"cuda"``.
        host_budget_bytes: cap on payload bytes kept in host RAM (``None``: unbounded).
        mode: ``"compressed"`` or ``"decoded"`` entries; default: compressed on CUDA, decoded on the CPU.
        policy: ``"layer-lru"``, ``"lru"`` or ``"lfu"``.
        decoder_sizes: ``(max_chunks, max_chunk_bytes) -> DecoderSizes`` of the codec's batched decoder
            (CUDA only).

    Raises:
        BudgetError: the budget cannot hold the fixed part and one cache entry.
        ValueError: an unknown mode.
    """
    on_cuda = device == "cuda"
    mode = mode or ("compressed" if on_cuda else "decoded")
    if mode not in ENTRY_MODES:
        raise ValueError(f"expert cache mode must be one of {ENTRY_MODES}, got {mode!r}")
    if not on_cuda and mode != "decoded":
        raise ValueError("on the CPU expert cache entries hold decoded experts (mode='decoded')")
    largest_stored = max(e.stored_bytes for e in experts)
    largest_decoded = max(e.decoded_bytes for e in experts)
    entry = largest_stored if mode == "compressed" else largest_decoded
    plan = ExpertPlan(device, budget_bytes, mode, policy, arena_size(slot_bytes), entry, 0)
    if on_cuda:
        plan.staging_count, plan.staging_each = DEVICE_STAGING_BUFFERS, largest_stored
        plan.batch_chunks = BATCH_EXPERTS * max(e.chunks for e in experts)
        max_chunk = max(e.max_chunk for e in experts)
        sizes = decoder_sizes(plan.batch_chunks, max_chunk) if decoder_sizes else None
        if sizes is not None:
            plan.decoder_bytes, plan.workspace = arena_decoder_sizes(sizes)
        plan.scratch_bytes = largest_decoded  # experts whose chunks straddle tensors decode here first
        plan.overhead_bytes = CUDA_ALLOCATOR_SLACK
    left = budget_bytes - plan.fixed_bytes
    if left < entry:
        minimum = plan.fixed_bytes + entry
        raise BudgetError(
            f"budget leaves {max(left, 0) / GIB:.4f} GiB for experts, below their minimum "
            f"{minimum / GIB:.4f} GiB "
            f"(an expert slot of {plan.slot_bytes} bytes and one cache entry of {entry} bytes)",
            group=experts[0].module,
            expected=minimum,
            actual=budget_bytes,
            hint="raise budget_gb, or load the model at block granularity (experts='block')",
        )
    plan.capacity = min(len(experts), left // entry)
    plan.experts = list(experts)
    if plan.capacity == len(experts) and mode == "compressed":
        plan.homes = {e.name: "cache" for e in experts}  # every payload fits: placed at dispatch, no home
        return plan
    host_left = host_budget_bytes if host_budget_bytes is not None else float("inf")
    for e in experts:
        if e.stored_bytes <= host_left:
            plan.homes[e.name] = "host"
            host_left -= e.stored_bytes
        else:
            plan.homes[e.name] = "disk"
    if any(h == "disk" for h in plan.homes.values()):
        plan.host_ring_count = HOST_RING_BUFFERS if on_cuda else 1
        plan.host_ring_each = largest_stored
    return plan
