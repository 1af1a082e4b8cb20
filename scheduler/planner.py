"""Placement: which tier each group lives in, given a device budget, and every buffer the runtime needs.

Tiers are objects (:mod:`offload_runtime.scheduler.tiers`); the planner reads only their planning face:
what a group costs there on the device and in host RAM, whether it needs a slot, whether each use crosses
PCIe. With today's tiers, fastest first: ``resident`` (decoded once, no slot), ``device_compressed``
(payload in VRAM, decoded into a slot on use; CUDA only), ``host`` (payload in pinned RAM, bounded by the
host budget), ``disk`` (read from the container on every use).

The budget caps every byte the runtime holds on the device, and the plan sizes each of them once
(:class:`Buffers`): the groups' own tier bytes, the ``nslots`` decode slots (each as large as the largest
slot group), the device staging buffers that receive payloads crossing PCIe, every slot group's decoder
arrays (``scratch``), the decode workspace all decoders share (one buffer per kind, the largest need),
the *dispatch window* that resident groups without a CPU decoder are decoded through at dispatch (it
overlaps the slots and staging, which are unused then; only what exceeds them is charged), and the CUDA
allocator's slack for the one arena allocation. On the CPU the "device" is host RAM holding *decoded*
weights: the budget caps resident groups plus slots; compressed bytes in RAM are the host tier.

Algorithm. Structures "the k largest groups in the slotless tier, the rest in slots" are tried for every k
(making a huge embedding resident shrinks every slot). Within a structure, the leftover budget first moves
payloads that would cross PCIe into a slot tier that keeps them in VRAM (every byte kept there is a byte
PCIe no longer carries per token; when not all fit, the ones left are spread over the pass), then promotes
groups that cross nothing to the slotless tier, in group order. The structure moving the fewest bytes over
PCIe per token wins, then the one with the most resident bytes. Groups still off the device go to the first
slot tier with room in the host budget (``host``), else the next (``disk``).

The plan is plain data, printable with ``print(plan)``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from offload_runtime.display import mib
from offload_runtime.errors import BudgetError, PlanError
from offload_runtime.scheduler.sizes import GroupSize
from offload_runtime.scheduler.tiers import RESIDENT, Tier, tiers_on

if TYPE_CHECKING:
    from offload_runtime.scheduler.experts_plan import ExpertPlan

T = TypeVar("T")

__all__ = [
    "CUDA_ALLOCATOR_SLACK",
    "DEVICE_STAGING_BUFFERS",
    "GIB",
    "Buffers",
    "GroupPlacement",
    "GroupSize",
    "Plan",
    "plan_placement",
    "shared_workspace_bytes",
    "spread_order",
]

GIB = 1 << 30
SMALL_GROUP_FRACTION = (
    0.01  # groups below 1% of the largest stay resident: streaming them costs more than it saves
)
DEVICE_STAGING_BUFFERS = 2  # H2D of the next payload overlaps the decode of the current one
HOST_RING_BUFFERS = 2  # CUDA: the next disk read overlaps the H2D copy of the current one
# CUDA: the caching allocator may charge up to 1 MiB beyond a large request (an unsplit segment tail); the
# runtime makes one allocation (its arena), so this is charged once
CUDA_ALLOCATOR_SLACK = 1 << 20


@dataclass(frozen=True)
class Buffers:
    """The runtime's shared buffers, sized once by the planner (the runtime allocates exactly these).

    Attributes:
        nslots: decode slots (``min(prefetch + 1, slot groups)``); ``slot_bytes`` each.
        staging_count: device staging buffers receiving payloads that cross PCIe; ``staging_each`` bytes each.
        scratch_bytes: every slot group's own decoder arrays, summed (CUDA).
        workspace: ``(kind, bytes)``: the decode workspace shared by all decoders, one buffer per kind.
        window_bytes: device bytes beyond the slots and staging needed to decode resident groups that have
            no CPU decoder at dispatch (payload + decoder arrays of the largest one).
        host_ring_count: host buffers disk reads land in (pinned on CUDA); ``host_ring_each`` bytes each.
        overhead_bytes: allocator slack (CUDA): charged once for the one arena allocation.
        compute_scratch_bytes: the largest kernel scratch of the groups executed compressed (a long input
            decodes one weight to bf16 for cuBLAS; split-K partial sums); the kernels' wrapper allocates it
            on first use, not the arena, so the plan leaves room for it.
    """

    nslots: int = 0
    slot_bytes: int = 0
    staging_count: int = 0
    staging_each: int = 0
    scratch_bytes: int = 0
    workspace: tuple[tuple[str, int], ...] = ()
    window_bytes: int = 0
    host_ring_count: int = 0
    host_ring_each: int = 0
    overhead_bytes: int = 0
    compute_scratch_bytes: int = 0

    @property
    def staging_bytes(self) -> int:
        return self.staging_count * self.staging_each

    @property
    def workspace_bytes(self) -> int:
        return sum(n for _, n in self.workspace)

    @property
    def streaming_region_bytes(self) -> int:
        """Slots, staging and the window: one contiguous arena region, the dispatch window at build time."""
        return self.nslots * self.slot_bytes + self.staging_bytes + self.window_bytes

    @property
    def device_bytes(self) -> int:
        """Device bytes of all shared buffers (the arena holds these but the executed layers' scratch, plus
        the groups' tier bytes)."""
        shared = self.streaming_region_bytes + self.scratch_bytes + self.workspace_bytes
        return shared + self.overhead_bytes + self.compute_scratch_bytes

    @property
    def host_bytes(self) -> int:
        return self.host_ring_count * self.host_ring_each


@dataclass(frozen=True)
class GroupPlacement:
    """The plan for one group: its tier, sizes and (when it uses a slot) the slot it decodes into."""

    name: str
    tier: Tier
    decoded_bytes: int
    stored_bytes: int
    slot: int | None = None

    @property
    def streamed(self) -> bool:
        return self.tier.uses_slot

    @property
    def size(self) -> GroupSize:
        return GroupSize(self.name, self.decoded_bytes, self.stored_bytes)

    @property
    def device_bytes(self) -> int:
        """Bytes this group holds on the device outside the shared buffers."""
        return self.tier.device_bytes(self.size)

    @property
    def host_bytes(self) -> int:
        return self.tier.host_bytes(self.size)


@dataclass
class Plan:
    """Where every group lives, and the fixed buffers of the runtime.

    Attributes:
        device: ``"cpu"`` or ``"cuda"`` (the device type that decodes and runs the model).
        budget_bytes: the device budget the plan fits in.
        minimum_bytes: the smallest budget any plan of this model fits in.
        prefetch: how many slot groups are decoded ahead of the one running.
        buffers: the shared buffers (:class:`Buffers`).
        groups: one placement per group, in group order.
    """

    device: str
    budget_bytes: int
    minimum_bytes: int
    prefetch: int
    buffers: Buffers
    groups: list[GroupPlacement] = field(default_factory=list)
    experts: ExpertPlan | None = None  # the expert part, when experts stream on their own

    # the buffers' sizes under the names the rest of the code reads
    nslots = property(lambda self: self.buffers.nslots)
    slot_bytes = property(lambda self: self.buffers.slot_bytes)
    staging_bytes = property(lambda self: self.buffers.staging_bytes)
    scratch_bytes = property(lambda self: self.buffers.scratch_bytes)
    workspace_bytes = property(lambda self: self.buffers.workspace_bytes)
    overhead_bytes = property(lambda self: self.buffers.overhead_bytes)
    host_staging_bytes = property(lambda self: self.buffers.host_bytes)

    def placement(self, name: str) -> GroupPlacement:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def streamed(self) -> list[GroupPlacement]:
        return [g for g in self.groups if g.streamed]

    def in_tier(self, tier: Tier) -> list[GroupPlacement]:
        return [g for g in self.groups if g.tier is tier]

    @property
    def tiers(self) -> list[Tier]:
        """The tiers this plan uses, fastest first."""
        return [t for t in tiers_on(self.device) if self.in_tier(t)]

    @property
    def groups_device_bytes(self) -> int:
        """What the groups' runtime holds on the device (its arena): shared buffers and tier bytes."""
        return self.buffers.device_bytes + sum(g.device_bytes for g in self.groups)

    @property
    def arena_bytes(self) -> int:
        """The groups' runtime's one device allocation: its device bytes less the allocator slack and the
        executed layers' scratch (allocated by their kernels' wrapper, on first use)."""
        return self.groups_device_bytes - self.buffers.overhead_bytes - self.buffers.compute_scratch_bytes

    @property
    def device_bytes(self) -> int:
        """Everything the runtime holds on the device, experts included (never above ``budget_bytes``)."""
        return self.groups_device_bytes + (self.experts.device_bytes if self.experts else 0)

    @property
    def host_bytes(self) -> int:
        """Compressed bytes held in host RAM (host tier, expert homes) plus the host staging rings."""
        experts = self.experts.host_bytes if self.experts else 0
        return self.buffers.host_bytes + sum(g.host_bytes for g in self.groups) + experts

    def tier_bytes(self, tier: Tier) -> int:
        return sum(g.decoded_bytes for g in self.in_tier(tier))

    def summary(self) -> str:
        """One line: groups per tier, device bytes against the budget, slots (for logs)."""
        tiers = ", ".join(f"{t.name} {len(self.in_tier(t))}" for t in self.tiers)
        b = self.buffers
        experts = f"; {self.experts.summary()}" if self.experts is not None else ""
        return (
            f"{len(self.groups)} groups ({tiers}) on {self.device}: {mib(self.device_bytes)} of "
            f"{mib(self.budget_bytes)} budget, {b.nslots} slots x {mib(b.slot_bytes)}, "
            f"{mib(self.host_bytes)} in host RAM{experts}"
        )

    def __str__(self) -> str:
        # the header says what each number counts: decoded bytes (slots, resident groups) or stored
        # (compressed) bytes (payloads kept in VRAM, in host RAM, on disk); the totals line shows both
        b = self.buffers
        held = [
            f"{b.nslots} slots x {mib(b.slot_bytes)} decoded",
            f"resident {mib(self.tier_bytes(RESIDENT))} decoded",
        ]
        if self.device == "cpu":
            where = "CPU RAM holding decoded weights"
        else:
            where = "device memory"
            in_vram = sum(g.device_bytes for g in self.groups if g.tier.payload_in_vram)  # slot or executed
            held += [
                f"compressed in VRAM {mib(in_vram)} stored",
                f"staging {mib(b.staging_bytes)}",
                f"scratch {mib(b.scratch_bytes)} + shared workspace {mib(b.workspace_bytes)}",
                f"dispatch window {mib(b.window_bytes)}",
                f"allocator slack {mib(b.overhead_bytes)}",
            ]
        if b.compute_scratch_bytes:  # room the kernels of executed layers take on a long input
            held.append(f"executed layers' scratch {mib(b.compute_scratch_bytes)}")
        lines = [
            f"offload plan on {self.device}: {mib(self.device_bytes)} of {mib(self.budget_bytes)} budget "
            f"(minimum {mib(self.minimum_bytes)}), prefetch={self.prefetch}",
            f"  in the budget ({where}): {', '.join(held)}",
            f"  host RAM, outside the budget: {mib(self.host_bytes)} = compressed payloads of host tier "
            f"groups {mib(self.host_bytes - b.host_bytes)} stored + staging ring {mib(b.host_bytes)}",
            f"  {'group':<40} {'tier':<18} {'decoded':>12} {'stored':>12} {'slot':>5}",
        ]
        for g in self.groups:
            slot = "-" if g.slot is None else str(g.slot)
            lines.append(
                f"  {g.name:<40} {g.tier.name:<18} {mib(g.decoded_bytes):>12} "
                f"{mib(g.stored_bytes):>12} {slot:>5}"
            )
        totals = ", ".join(
            f"{t.name} {len(self.in_tier(t))} groups {mib(self.tier_bytes(t))} / "
            f"{mib(sum(g.stored_bytes for g in self.in_tier(t)))}"
            for t in tiers_on(self.device)
        )
        lines.append(f"  totals (decoded / stored): {totals}")
        if self.experts is not None:
            lines.append(f"  {self.experts}")
        return "\n".join(lines)


def budget_gb_for(nbytes: int) -> float:
    """The smallest budget in GiB, to 4 decimals, that covers ``nbytes`` (rounded up, so it passes)."""
    return math.ceil(nbytes / GIB * 1e4) / 1e4


def shared_workspace_bytes(groups: Sequence[GroupSize]) -> int:
    """Bytes of the decode workspace ``groups`` share: per kind the largest need, summed."""
    return sum(n for _, n in _workspace(groups))


def _workspace(groups: Sequence[GroupSize]) -> tuple[tuple[str, int], ...]:
    largest: dict[str, int] = {}
    for g in groups:
        for kind, nbytes in g.workspace:
            largest[kind] = max(largest.get(kind, 0), nbytes)
    return tuple(sorted(largest.items()))


def size_buffers(
    slot_groups: Sequence[GroupSize],
    prefetch: int,
    device: str,
    over_pcie: Sequence[GroupSize] | None = None,
    dispatch_decoded: Sequence[GroupSize] = (),
    disk: Sequence[GroupSize] = (),
    executed: Sequence[GroupSize] = (),
) -> Buffers:
    """The shared buffers of a runtime whose ``slot_groups`` decode into slots.

    Args:
        slot_groups: groups in slot tiers.
        prefetch: slot groups decoded ahead.
        device: ``"cpu"`` or ``"cuda"``.
        over_pcie: the slot groups whose payloads cross PCIe per use (default: all of them); device staging
            is sized by these, the others decode straight from VRAM.
        dispatch_decoded: resident groups decoded on the device at dispatch (no CPU decoder).
        disk: slot groups read from the container on each use (host ring).
        executed: groups in a tier whose layers compute from the payload (their kernels' scratch).
    """
    on_cuda = device == "cuda"
    nslots = min(prefetch + 1, len(slot_groups)) if slot_groups else 0
    slot = max((g.decoded_bytes for g in slot_groups), default=0)
    ring_each = max((g.stored_bytes for g in disk), default=0)
    compute = max((g.compute_scratch_bytes for g in executed), default=0)
    if not on_cuda:  # the CPU decodes disk payloads from one staging buffer; nothing else is shared
        ring = 1 if disk else 0
        return Buffers(
            nslots, slot, host_ring_count=ring, host_ring_each=ring_each, compute_scratch_bytes=compute
        )
    over_pcie = slot_groups if over_pcie is None else over_pcie
    staging_each = max((g.stored_bytes for g in over_pcie), default=0)
    staging_count = min(DEVICE_STAGING_BUFFERS, nslots) if staging_each else 0
    window_need = max((g.stored_bytes + g.scratch_bytes for g in dispatch_decoded), default=0)
    window = max(0, window_need - nslots * slot - staging_count * staging_each)
    return Buffers(
        nslots=nslots,
        slot_bytes=slot,
        staging_count=staging_count,
        staging_each=staging_each,
        scratch_bytes=sum(g.scratch_bytes for g in slot_groups),  # each decoder keeps its own arrays
        workspace=_workspace([*slot_groups, *dispatch_decoded]),
        window_bytes=window,
        host_ring_count=HOST_RING_BUFFERS if disk else 0,
        host_ring_each=ring_each,
        overhead_bytes=CUDA_ALLOCATOR_SLACK,
        compute_scratch_bytes=compute,
    )


def spread_order(items: Sequence[T]) -> list[T]:
    """``items`` reordered so that every prefix is spread evenly over the original positions (bit-reversal
    order): the first ``m`` taken are about ``len(items) / m`` apart."""
    n = len(items)
    bits = max(n - 1, 0).bit_length()
    order = []
    for i in range(1 << bits):
        j = int(format(i, f"0{bits}b")[::-1], 2) if bits else 0
        if j < n:
            order.append(items[j])
    return order


class _Placer:
    """The steps of :func:`plan_placement` over one model, budget and device."""

    def __init__(
        self,
        groups: Sequence[GroupSize],
        budget: int,
        device: str,
        prefetch: int,
        keep_resident: Collection[str],
        force_streamed: Collection[str],
        small_fraction: float,
    ) -> None:
        self.groups, self.budget, self.device, self.prefetch = list(groups), budget, device, prefetch
        self.force_streamed = set(force_streamed)
        tiers = tiers_on(device)
        self.slotless_tiers = [t for t in tiers if not t.uses_slot]
        self.in_vram_tiers = [t for t in tiers if t.uses_slot and t.payload_in_vram]
        self.off_device_tiers = [t for t in tiers if t.uses_slot and not t.payload_in_vram]
        largest = max((g.decoded_bytes for g in groups), default=0)
        self.forced = [
            g
            for g in groups
            if g.name in keep_resident
            or (g.decoded_bytes < small_fraction * largest and g.name not in self.force_streamed)
        ]
        forced_names = {g.name for g in self.forced}
        # candidates for streaming, largest first (the structures make the k largest resident)
        self.candidates = sorted(
            (g for g in groups if g.name not in forced_names), key=lambda g: -g.decoded_bytes
        )

    def slotless(self, g: GroupSize) -> Tier:
        """The tier a group goes to when it takes no slot: the first slotless tier that accepts it."""
        return next((t for t in self.slotless_tiers if t.accepts(g)), RESIDENT)

    # -- costs ---------------------------------------------------------------------------------------
    def buffers(self, resident: set[str], in_vram: set[str]) -> Buffers:
        slot_groups = [g for g in self.candidates if g.name not in resident]
        over_pcie = [g for g in slot_groups if g.name not in in_vram]
        resident_groups = [*self.forced, *(g for g in self.candidates if g.name in resident)]
        return size_buffers(
            slot_groups,
            self.prefetch,
            self.device,
            over_pcie,
            self.dispatch(resident_groups),
            executed=self.executed(resident_groups),
        )

    def executed(self, slotless_groups: Sequence[GroupSize]) -> list[GroupSize]:
        """The groups among ``slotless_groups`` whose tier computes from their payloads."""
        return [g for g in slotless_groups if self.slotless(g).computes_compressed]

    def dispatch(self, resident_groups: Sequence[GroupSize]) -> list[GroupSize]:
        """Resident groups decoded on the device at dispatch: CUDA, decoded resident, no CPU decoder."""
        return [
            g
            for g in resident_groups
            if self.device == "cuda" and not g.decodes_on_cpu and self.slotless(g) is RESIDENT
        ]

    def cost(self, resident: set[str], in_vram: frozenset[str] | set[str] = frozenset()) -> int:
        """Device bytes when ``resident`` are resident and ``in_vram`` payloads stay on the device."""
        held = sum(self.slotless(g).device_bytes(g) for g in self.forced)
        for g in self.candidates:
            if g.name in resident:
                held += self.slotless(g).device_bytes(g)
            elif g.name in in_vram:
                held += self.in_vram_tiers[0].device_bytes(g)
        return held + self.buffers(resident, set(in_vram)).device_bytes

    def pcie_bytes(self, resident: set[str], in_vram: set[str]) -> int:
        return sum(
            g.stored_bytes for g in self.candidates if g.name not in resident and g.name not in in_vram
        )

    # -- steps ---------------------------------------------------------------------------------------
    def structures(self) -> list[set[str]]:
        """Resident sets "the k largest promotable groups", k = 0 .. all."""
        promotable = [g for g in self.candidates if g.name not in self.force_streamed]
        return [{g.name for g in promotable[:k]} for k in range(len(promotable) + 1)]

    def refuse_below_minimum(self, minimum: int, base: set[str]) -> None:
        """Raise the BudgetError when the budget is below ``minimum``, the cost of structure ``base``:
        its message lists every term of that cost, so they add up to it."""
        if self.budget >= minimum:
            return
        b = self.buffers(base, set())
        slot_groups = [g for g in self.candidates if g.name not in base]
        resident = [*self.forced, *(g for g in self.candidates if g.name in base)]
        biggest = slot_groups[0] if slot_groups else max(self.groups, key=lambda g: g.decoded_bytes)
        slots_term = (
            f"{b.nslots} slots x {b.slot_bytes:,} (prefetch={self.prefetch}; each slot holds the largest "
            f"streamed group, {biggest.name!r})"
            if slot_groups
            else "0 slots (every group resident)"
        )
        terms = [
            slots_term,
            f"resident groups {sum(self.slotless(g).device_bytes(g) for g in resident):,} "
            f"({len(resident)} of {len(self.groups)} groups)",
            f"staging {b.staging_bytes:,}",
            f"codec scratch {b.scratch_bytes:,}",
            f"decode workspace {b.workspace_bytes:,}",
            f"dispatch window {b.window_bytes:,}",
            f"allocator slack {b.overhead_bytes:,}",
        ]
        if b.compute_scratch_bytes:
            terms.append(f"scratch of the layers executed compressed {b.compute_scratch_bytes:,}")
        # prefetch=1 needs min(2, streamed) slots: naming prefetch only makes sense when that is fewer
        fewer = f", or lower prefetch (now {self.prefetch})" if b.nslots > min(2, len(slot_groups)) else ""
        raise BudgetError(
            f"budget {self.budget:,} bytes ({self.budget / GIB:.4f} GiB) is below the minimum working set "
            f"of {minimum:,} bytes ({minimum / GIB:.4f} GiB) on {self.device} = " + " + ".join(terms),
            group=biggest.name,
            expected=minimum,
            actual=self.budget,
            hint=f"raise budget_gb to at least {budget_gb_for(minimum)}{fewer}",
        )

    def keep_payloads_in_vram(self, resident: set[str], streamed: list[GroupSize]) -> set[str]:
        """Payloads that stay on the device: all when they fit (then nothing needs staging), else as many as
        the leftover allows, spread over the pass so the ones left to cross PCIe are not bunched together
        (their copies, made ahead, overlap the groups decoded from VRAM)."""
        if not self.in_vram_tiers:
            return set()
        # a group a slotless tier keeps compressed (executed_compressed) is kept there rather than in a slot
        executed = {g.name for g in streamed if self.slotless(g).payload_in_vram}
        everything = {g.name for g in streamed} - executed
        if self.cost(resident | executed, everything) <= self.budget:
            resident |= executed
            return everything
        in_vram: set[str] = set()
        leftover = self.budget - self.cost(resident)
        for g in reversed(spread_order([g for g in self.groups if g in streamed])):
            size = (
                self.slotless(g).device_bytes(g)
                if g.name in executed
                else self.in_vram_tiers[0].device_bytes(g)
            )
            if size > leftover:
                continue
            if g.name in executed:
                if self.cost(resident | {g.name}, in_vram) > self.budget:
                    continue
                resident.add(g.name)
            else:
                in_vram.add(g.name)
            leftover = self.budget - self.cost(resident, in_vram)
        return in_vram

    def promote(self, resident: set[str], in_vram: set[str], streamed: list[GroupSize]) -> None:
        """Groups that cross nothing per use become resident, in group order, while the plan fits. One of
        the largest slot groups (the last) stays in its slot: it keeps the structure's slot size."""
        keeper = (
            [g for g in streamed if g.decoded_bytes == streamed[0].decoded_bytes][-1] if streamed else None
        )
        may_cross = bool(self.in_vram_tiers)  # with a VRAM slot tier, only its groups are promoted
        for g in self.groups:
            if g not in streamed or g is keeper or g.name in self.force_streamed:
                continue
            if may_cross and g.name not in in_vram:
                continue
            if self.cost(resident | {g.name}, in_vram - {g.name}) <= self.budget:
                resident.add(g.name)
                in_vram.discard(g.name)

    def fill(self, base: set[str]) -> tuple[tuple[int, int], set[str], set[str]]:
        """Resident and in-VRAM sets grown from the structure ``base``, and their score (lower is better)."""
        resident = set(base)
        streamed = [g for g in self.candidates if g.name not in resident]
        in_vram = self.keep_payloads_in_vram(resident, streamed)
        self.promote(resident, in_vram, streamed)
        resident_bytes = sum(g.decoded_bytes for g in self.candidates if g.name in resident)
        return (self.pcie_bytes(resident, in_vram), -resident_bytes), resident, in_vram

    def off_device(self, streamed: list[GroupSize], host_budget: int | None) -> dict[str, Tier]:
        """Each slot group not kept in VRAM goes to the first off-device tier with room in the host budget."""
        host_left = host_budget if host_budget is not None else float("inf")
        tiers: dict[str, Tier] = {}
        for g in streamed:
            for tier in self.off_device_tiers:
                need = tier.host_bytes(g)
                if need <= host_left:
                    tiers[g.name] = tier
                    host_left -= need
                    break
        return tiers


def plan_placement(
    groups: Sequence[GroupSize],
    budget_bytes: int,
    *,
    device: str = "cpu",
    prefetch: int = 1,
    host_budget_bytes: int | None = None,
    keep_resident: Collection[str] = (),
    force_streamed: Collection[str] = (),
    small_fraction: float = SMALL_GROUP_FRACTION,
) -> Plan:
    """Place every group in a tier so the device bytes fit ``budget_bytes`` (see the module docstring).

    Args:
        groups (`Sequence[GroupSize]`): every group, in group (execution) order.
        budget_bytes (`int`): the device budget.
        device (`str`, defaults to ``"cpu"``): ``"cpu"`` or ``"cuda"``.
        prefetch (`int`, defaults to 1): groups decoded ahead; the runtime keeps ``prefetch + 1`` slots.
        host_budget_bytes (`int`, *optional*): cap on compressed bytes copied into host RAM; ``None`` means
            unbounded.
        keep_resident (`Collection[str]`): groups that must stay resident (e.g. nested modules).
        force_streamed (`Collection[str]`): groups that must be streamed even when they would fit (tests,
            benchmarks of the streaming path).
        small_fraction (`float`, defaults to 0.01): groups smaller than this fraction of the largest stay
            resident.

    Raises:
        BudgetError: when ``budget_bytes`` is below the minimum working set; ``expected`` is the minimum,
            ``actual`` the budget, and the message names the largest group.
    """
    if prefetch < 1:
        raise ValueError(f"prefetch must be >= 1, got {prefetch}")
    device = "cuda" if device == "cuda" else "cpu"
    placer = _Placer(groups, budget_bytes, device, prefetch, keep_resident, force_streamed, small_fraction)
    structures = placer.structures()
    costs = [placer.cost(s) for s in structures]
    minimum = min(costs)
    placer.refuse_below_minimum(minimum, structures[costs.index(minimum)])
    options = [placer.fill(s) for s, c in zip(structures, costs, strict=True) if c <= budget_bytes]
    if not options:  # unreachable: the minimum structure fits whenever budget >= minimum
        raise PlanError("no placement fits although the budget is above the minimum", actual=budget_bytes)
    _, resident, in_vram = min(options, key=lambda option: option[0])
    slotless = {g.name: placer.slotless(g) for g in groups if g.name in resident or g in placer.forced}

    forced = {g.name for g in placer.forced}
    streamed = [g for g in groups if g.name not in forced and g.name not in resident]
    tiers: dict[str, Tier] = {g.name: placer.in_vram_tiers[0] for g in streamed if g.name in in_vram}
    tiers.update(placer.off_device([g for g in streamed if g.name not in in_vram], host_budget_bytes))
    buffers = size_buffers(
        streamed,
        prefetch,
        device,
        over_pcie=[g for g in streamed if tiers[g.name].crosses_pcie(device)],
        dispatch_decoded=placer.dispatch([g for g in groups if g.name not in tiers]),
        disk=[g for g in streamed if tiers[g.name].reads_disk],
        executed=placer.executed([g for g in groups if g.name in slotless]),
    )
    tiers.update(slotless)
    return Plan(device, budget_bytes, minimum, prefetch, buffers, _placements(groups, tiers, buffers.nslots))


def _placements(groups: Sequence[GroupSize], tiers: dict[str, Tier], nslots: int) -> list[GroupPlacement]:
    """One placement per group; slots are assigned statically: the j-th slot group uses slot j % nslots."""
    placements, j = [], 0
    for g in groups:
        tier = tiers[g.name]
        slot = None
        if tier.uses_slot:
            slot, j = j % nslots, j + 1
        placements.append(GroupPlacement(g.name, tier, g.decoded_bytes, g.stored_bytes, slot))
    return placements
