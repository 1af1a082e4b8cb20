"""Placement: which tier each group lives in, given a device budget.

Tiers, fastest first:

1. ``RESIDENT``: decoded once at dispatch, kept on the device.
2. ``DEVICE_COMPRESSED``: the payload is kept on the device and decoded into a slot on use (CUDA only).
3. ``HOST``: the payload is kept in (pinned) host RAM, bounded by ``host_budget_bytes``.
4. ``DISK``: read through the container's mmap (into a pinned staging ring on CUDA) on every use.

The budget caps every byte the runtime holds for weights on the device: resident groups, compressed
groups kept on the device, the ``nslots`` decode slots (each as large as the largest streamed group),
the device staging buffers that receive payloads before decoding, and the codec's scratch: what each
streamed group's decoder holds for itself, plus the decode workspace all decoders share (one buffer per
scratch kind, as large as the largest streamed group's need, charged once). On the CPU the
"device" is host RAM holding *decoded* weights: the budget caps resident groups plus slots; compressed
bytes in RAM are the host tier and are not counted.

The plan is plain data, printable with ``print(plan)``.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TypeVar

from offload_runtime.errors import BudgetError

T = TypeVar("T")

GIB = 1 << 30
SMALL_GROUP_FRACTION = (
    0.01  # groups below 1% of the largest stay resident: streaming them costs more than it saves
)
DEVICE_STAGING_BUFFERS = 2  # H2D of the next payload overlaps the decode of the current one
# CUDA: the caching allocator may charge up to 1 MiB beyond a large request (an unsplit segment tail); the
# runtime makes one allocation (its arena), so this is charged once
CUDA_ALLOCATOR_SLACK = 1 << 20


class Tier(IntEnum):
    RESIDENT = 1
    DEVICE_COMPRESSED = 2
    HOST = 3
    DISK = 4


@dataclass(frozen=True)
class GroupSize:
    """What the planner needs to know about one group.

    Attributes:
        name: the group's name.
        decoded_bytes: size of the decoded group (its slot size).
        stored_bytes: size of its compressed payload.
        scratch_bytes: device memory its GPU decoder holds for this group alone (0 on the CPU); decoders
            live as long as the runtime, so the scratch of every streamed group counts.
        workspace: ``(kind, bytes)`` pairs of the shared decode workspace one decode of this group needs
            (nvCOMP temp space, int8 stored bytes). Decodes are serialised on one stream, so the runtime
            keeps one buffer per kind, as large as the largest need among streamed groups: charged once.
    """

    name: str
    decoded_bytes: int
    stored_bytes: int
    scratch_bytes: int = 0
    workspace: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class GroupPlacement:
    """The plan for one group: its tier, sizes and (when streamed) the slot it decodes into."""

    name: str
    tier: Tier
    decoded_bytes: int
    stored_bytes: int
    slot: int | None = None

    @property
    def streamed(self) -> bool:
        return self.tier != Tier.RESIDENT

    @property
    def device_bytes(self) -> int:
        """Bytes this group holds on the device outside the slots."""
        if self.tier == Tier.RESIDENT:
            return self.decoded_bytes
        return self.stored_bytes if self.tier == Tier.DEVICE_COMPRESSED else 0


@dataclass
class Plan:
    """Where every group lives, and the fixed buffers of the runtime.

    Attributes:
        device: ``"cpu"`` or ``"cuda"`` (the device type that decodes and runs the model).
        budget_bytes: the device budget the plan fits in.
        minimum_bytes: the smallest budget any plan of this model fits in.
        prefetch: how many streamed groups are decoded ahead of the one running.
        nslots: decode slots (``min(prefetch + 1, streamed groups)``).
        slot_bytes: size of one slot (largest streamed group's decoded size).
        staging_bytes: device buffers receiving payloads before decoding (CUDA only).
        scratch_bytes: per-group codec scratch on the device (sum over streamed groups).
        workspace_bytes: the decode workspace shared by all streamed groups' decoders (per kind, the
            largest need), on the device.
        host_staging_bytes: pinned host ring that disk reads land in (CUDA only; not in the budget).
        overhead_bytes: allocator rounding reserved on CUDA (:data:`CUDA_ALLOCATOR_SLACK`).
        groups: one placement per group, in group order.
    """

    device: str
    budget_bytes: int
    minimum_bytes: int
    prefetch: int
    nslots: int
    slot_bytes: int
    staging_bytes: int
    scratch_bytes: int
    host_staging_bytes: int
    groups: list[GroupPlacement] = field(default_factory=list)
    overhead_bytes: int = 0
    workspace_bytes: int = 0

    def placement(self, name: str) -> GroupPlacement:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def streamed(self) -> list[GroupPlacement]:
        return [g for g in self.groups if g.streamed]

    @property
    def device_bytes(self) -> int:
        """Everything the runtime holds for weights on the device (never above ``budget_bytes``)."""
        fixed = self.nslots * self.slot_bytes + self.staging_bytes + self.scratch_bytes + self.workspace_bytes
        fixed += self.overhead_bytes
        return fixed + sum(g.device_bytes for g in self.groups)

    @property
    def host_bytes(self) -> int:
        """Compressed bytes copied into host RAM (host tier) plus the pinned staging ring."""
        return self.host_staging_bytes + sum(g.stored_bytes for g in self.groups if g.tier == Tier.HOST)

    def tier_bytes(self, tier: Tier) -> int:
        return sum(g.decoded_bytes for g in self.groups if g.tier == tier)

    def __str__(self) -> str:
        # the header says what each number counts: decoded bytes (slots, resident groups) or stored
        # (compressed) bytes (payloads kept in VRAM, in host RAM, on disk); the totals line shows both
        held = [
            f"{self.nslots} slots x {_mib(self.slot_bytes)} decoded",
            f"resident {_mib(self.tier_bytes(Tier.RESIDENT))} decoded",
        ]
        if self.device == "cpu":
            where = "CPU RAM holding decoded weights"
        else:
            where = "device memory"
            in_vram = sum(g.stored_bytes for g in self.groups if g.tier == Tier.DEVICE_COMPRESSED)
            held += [
                f"compressed in VRAM {_mib(in_vram)} stored",
                f"staging {_mib(self.staging_bytes)}",
                f"scratch {_mib(self.scratch_bytes)} + shared workspace {_mib(self.workspace_bytes)}",
                f"allocator slack {_mib(self.overhead_bytes)}",
            ]
        lines = [
            f"offload plan on {self.device}: {_mib(self.device_bytes)} of {_mib(self.budget_bytes)} budget "
            f"(minimum {_mib(self.minimum_bytes)}), prefetch={self.prefetch}",
            f"  in the budget ({where}): {', '.join(held)}",
            f"  host RAM, outside the budget: {_mib(self.host_bytes)} stored (compressed payloads of host "
            f"tier groups; pinned staging ring {_mib(self.host_staging_bytes)})",
            f"  {'group':<40} {'tier':<18} {'decoded':>12} {'stored':>12} {'slot':>5}",
        ]
        for g in self.groups:
            slot = "-" if g.slot is None else str(g.slot)
            lines.append(
                f"  {g.name:<40} {g.tier.name.lower():<18} {_mib(g.decoded_bytes):>12} "
                f"{_mib(g.stored_bytes):>12} {slot:>5}"
            )
        totals = ", ".join(
            f"{t.name.lower()} {sum(1 for g in self.groups if g.tier == t)} groups "
            f"{_mib(self.tier_bytes(t))} / {_mib(sum(g.stored_bytes for g in self.groups if g.tier == t))}"
            for t in Tier
        )
        lines.append(f"  totals (decoded / stored): {totals}")
        return "\n".join(lines)


def budget_gb_for(nbytes: int) -> float:
    """The smallest budget in GiB, to 4 decimals, that covers ``nbytes`` (rounded up, so it passes)."""
    return math.ceil(nbytes / GIB * 1e4) / 1e4


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f} MiB"


def shared_workspace_bytes(streamed: Sequence[GroupSize]) -> int:
    """Bytes of the decode workspace ``streamed`` groups share: per kind the largest need, summed."""
    largest: dict[str, int] = {}
    for g in streamed:
        for kind, nbytes in g.workspace:
            largest[kind] = max(largest.get(kind, 0), nbytes)
    return sum(largest.values())


def _fixed_cost(
    streamed: Sequence[GroupSize], prefetch: int, on_cuda: bool, over_pcie: Sequence[GroupSize] | None = None
) -> tuple[int, int, int, int, int]:
    """(nslots, slot_bytes, staging_bytes, scratch_bytes, workspace_bytes) of streaming ``streamed``.

    Device staging receives payloads that cross PCIe, so it is sized by ``over_pcie`` (default: every
    streamed group); groups whose payloads stay in VRAM decode straight from there.
    """
    if not streamed:
        return 0, 0, 0, 0, 0
    nslots = min(prefetch + 1, len(streamed))
    slot = max(g.decoded_bytes for g in streamed)
    if not on_cuda:
        return nslots, slot, 0, 0, 0
    over_pcie = streamed if over_pcie is None else over_pcie
    staging = min(DEVICE_STAGING_BUFFERS, nslots) * max((g.stored_bytes for g in over_pcie), default=0)
    scratch = sum(g.scratch_bytes for g in streamed)  # each group's decoder keeps its own small arrays
    return nslots, slot, staging, scratch, shared_workspace_bytes(streamed)


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
    """Place every group in a tier so the device bytes fit ``budget_bytes``.

    The structure is chosen among "the k largest groups resident, the rest streamed" for every k (making
    a huge embedding resident shrinks every slot). On CUDA the leftover budget first keeps streamed
    payloads on the device (fewest bytes over PCIe per token), then promotes device-compressed groups to
    resident; on the CPU it makes more groups resident. The rest goes to host RAM up to
    ``host_budget_bytes``, then to disk. Among structures, the plan moving the fewest bytes over PCIe per
    token wins, then the one with the most resident bytes.

    Args:
        groups (`Sequence[GroupSize]`): every group, in group (execution) order.
        budget_bytes (`int`): the device budget.
        device (`str`, defaults to ``"cpu"``): ``"cpu"`` or ``"cuda"``.
        prefetch (`int`, defaults to 1): groups decoded ahead; the runtime keeps ``prefetch + 1`` slots.
        host_budget_bytes (`int`, *optional*): cap on compressed bytes copied into host RAM (plus the
            pinned staging ring); ``None`` means unbounded.
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
    on_cuda = device == "cuda"
    overhead = CUDA_ALLOCATOR_SLACK if on_cuda else 0
    largest = max((g.decoded_bytes for g in groups), default=0)
    forced = [
        g
        for g in groups
        if g.name in keep_resident
        or (g.decoded_bytes < small_fraction * largest and g.name not in force_streamed)
    ]
    forced_names = {g.name for g in forced}
    forced_bytes = sum(g.decoded_bytes for g in forced)
    candidates = sorted((g for g in groups if g.name not in forced_names), key=lambda g: -g.decoded_bytes)

    def cost(resident: set[str]) -> int:
        streamed = [g for g in candidates if g.name not in resident]
        nslots, slot, staging, scratch, workspace = _fixed_cost(streamed, prefetch, on_cuda)
        resident_bytes = sum(g.decoded_bytes for g in candidates if g.name in resident)
        return forced_bytes + resident_bytes + nslots * slot + staging + scratch + workspace + overhead

    def vram_cost(resident: set[str], in_vram: set[str]) -> int:
        """Device bytes (CUDA) when ``in_vram`` payloads are kept on the device and the rest cross PCIe."""
        streamed = [g for g in candidates if g.name not in resident]
        over_pcie = [g for g in streamed if g.name not in in_vram]
        nslots, slot, staging, scratch, workspace = _fixed_cost(streamed, prefetch, True, over_pcie)
        kept = sum(g.stored_bytes for g in streamed if g.name in in_vram)
        resident_bytes = sum(g.decoded_bytes for g in candidates if g.name in resident)
        return forced_bytes + resident_bytes + kept + nslots * slot + staging + scratch + workspace + overhead

    promotable = [g for g in candidates if g.name not in force_streamed]
    structures = [{g.name for g in promotable[:k]} for k in range(len(promotable) + 1)]
    costs = [cost(s) for s in structures]
    minimum = min(costs)
    if budget_bytes < minimum:
        base = structures[costs.index(minimum)]
        streamed = [g for g in candidates if g.name not in base]
        nslots, slot, staging, scratch, workspace = _fixed_cost(streamed, prefetch, on_cuda)
        resident_bytes = forced_bytes + sum(g.decoded_bytes for g in candidates if g.name in base)
        biggest = streamed[0] if streamed else max(groups, key=lambda g: g.decoded_bytes)
        slots_term = (
            f"{nslots} slots x {slot:,} (prefetch={prefetch}; each slot holds the largest streamed group, "
            f"{biggest.name!r})"
            if streamed
            else "0 slots (every group resident)"
        )
        terms = [
            slots_term,
            f"resident groups {resident_bytes:,} ({len(forced) + len(base)} of {len(groups)} groups)",
            f"staging {staging:,}",
            f"codec scratch {scratch:,}",
            f"decode workspace {workspace:,}",
            f"allocator slack {overhead:,}",
        ]
        # prefetch=1 needs min(2, streamed) slots: naming prefetch only makes sense when that is fewer
        fewer = f", or lower prefetch (now {prefetch})" if nslots > min(2, len(streamed)) else ""
        raise BudgetError(
            f"budget {budget_bytes:,} bytes ({budget_bytes / GIB:.4f} GiB) is below the minimum working set "
            f"of {minimum:,} bytes ({minimum / GIB:.4f} GiB) on {device} = " + " + ".join(terms),
            group=biggest.name,
            expected=minimum,
            actual=budget_bytes,
            hint=f"raise budget_gb to at least {budget_gb_for(minimum)}{fewer}",
        )

    def fill(base: set[str]) -> tuple[tuple[int, int], set[str], set[str]]:
        """Resident and device-compressed sets grown from ``base``, and their score (lower is better)."""
        resident = set(base)
        streamed = [g for g in candidates if g.name not in resident]
        # one of the largest streamed groups (the last) stays streamed: it keeps the slot size
        keeper = (
            [g for g in streamed if g.decoded_bytes == streamed[0].decoded_bytes][-1] if streamed else None
        )
        in_vram: set[str] = set()
        if on_cuda:
            # First keep payloads on the device: each byte kept there is a byte PCIe no longer carries per
            # token, whereas making a group resident saves its stored bytes at the price of its (larger)
            # decoded bytes. Then promote device-compressed groups to resident with what is left.
            if vram_cost(resident, {g.name for g in streamed}) <= budget_bytes:
                in_vram = {g.name for g in streamed}  # no payload crosses PCIe: no staging either
            else:
                leftover = budget_bytes - cost(resident)
                # the payloads left to cross PCIe are spread over the pass, not bunched at its end: their
                # copies (copied ahead, see scheduler.staging) then overlap the groups decoded from VRAM
                for g in reversed(spread_order([g for g in groups if g in streamed])):
                    if g.stored_bytes <= leftover:
                        in_vram.add(g.name)
                        leftover -= g.stored_bytes
            for g in groups:
                if g.name not in in_vram or g is keeper or g.name in force_streamed:
                    continue
                if vram_cost(resident | {g.name}, in_vram - {g.name}) <= budget_bytes:
                    resident.add(g.name)
                    in_vram.discard(g.name)
        else:
            leftover = budget_bytes - cost(resident)
            for g in groups:
                if g not in streamed or g is keeper or g.name in force_streamed or g.decoded_bytes > leftover:
                    continue
                if cost(resident | {g.name}) <= budget_bytes:
                    resident.add(g.name)
                    leftover = budget_bytes - cost(resident)
        over_pcie = sum(
            g.stored_bytes for g in candidates if g.name not in resident and g.name not in in_vram
        )
        resident_bytes = sum(g.decoded_bytes for g in candidates if g.name in resident)
        return (over_pcie, -resident_bytes), resident, in_vram

    options = [
        fill(base) for base, base_cost in zip(structures, costs, strict=True) if base_cost <= budget_bytes
    ]
    if not options:  # unreachable: the minimum structure fits whenever budget >= minimum
        raise RuntimeError("no placement fits although the budget is above the minimum")
    _, best, in_vram = min(options, key=lambda option: option[0])

    streamed = [g for g in groups if g.name not in forced_names and g.name not in best]
    over_pcie = [g for g in streamed if g.name not in in_vram]
    nslots, slot_bytes, staging, scratch, workspace = _fixed_cost(streamed, prefetch, on_cuda, over_pcie)
    host_left = host_budget_bytes if host_budget_bytes is not None else float("inf")
    disk_groups = []
    tiers: dict[str, Tier] = {}
    for g in streamed:
        if g.name in in_vram:
            tiers[g.name] = Tier.DEVICE_COMPRESSED
        elif g.stored_bytes <= host_left:
            tiers[g.name] = Tier.HOST
            host_left -= g.stored_bytes
        else:
            tiers[g.name] = Tier.DISK
            disk_groups.append(g)
    host_staging = (
        DEVICE_STAGING_BUFFERS * max(g.stored_bytes for g in disk_groups) if on_cuda and disk_groups else 0
    )

    placements, streamed_index = [], 0
    for g in groups:
        tier = tiers.get(g.name, Tier.RESIDENT)
        slot = None
        if tier != Tier.RESIDENT:
            slot = streamed_index % nslots  # static assignment: the j-th streamed group uses slot j % nslots
            streamed_index += 1
        placements.append(GroupPlacement(g.name, tier, g.decoded_bytes, g.stored_bytes, slot))
    return Plan(
        device="cuda" if on_cuda else "cpu",
        budget_bytes=budget_bytes,
        minimum_bytes=minimum,
        prefetch=prefetch,
        nslots=nslots,
        slot_bytes=slot_bytes,
        staging_bytes=staging,
        scratch_bytes=scratch,
        host_staging_bytes=host_staging,
        groups=placements,
        overhead_bytes=overhead,
        workspace_bytes=workspace,
    )
