"""Counters the runtime keeps while it streams weights: ``model.offload_stats``."""

from __future__ import annotations

from dataclasses import dataclass, field

MIB, GIB = 1 << 20, 1 << 30


@dataclass
class TierStats:
    """What one tier holds and did (``offload_stats.tiers[name]``).

    Attributes:
        groups: groups placed in the tier.
        device_bytes: device bytes it holds for them (decoded buffers, payloads in VRAM).
        host_bytes: host RAM it holds for them (pinned payload copies).
        loads: loads of its groups into slots.
        fetched_bytes: payload bytes its loads moved to the device (H2D copies, disk reads).
    """

    groups: int = 0
    device_bytes: int = 0
    host_bytes: int = 0
    loads: int = 0
    fetched_bytes: int = 0


@dataclass
class ExpertStats:
    """What the expert runtime did (``offload_stats.experts``).

    Attributes:
        steps: experts-module forwards (one per MoE layer per forward pass).
        requested: experts made ready over all steps (a step counts each routed expert once).
        hits: requests served by the cache; ``misses`` the others (loaded over PCIe or from disk).
        uncached: misses that found no free entry (the step routed more experts than the cache holds).
        h2d_bytes: expert payload bytes copied host -> device; ``disk_bytes`` read from the container.
        wait_seconds: host time spent making experts ready (routing sync, lookups, enqueueing).
        speculated: experts prefetched for the next layer on a guess; ``speculated_used``: of those, the
            ones the next layer did route to (precision = used / speculated).
        warmed: experts placed in the cache at dispatch (their bytes are not in ``h2d_bytes``).
    """

    steps: int = 0
    requested: int = 0
    hits: int = 0
    misses: int = 0
    uncached: int = 0
    h2d_bytes: int = 0
    disk_bytes: int = 0
    wait_seconds: float = 0.0
    speculated: int = 0
    speculated_used: int = 0
    warmed: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requested if self.requested else 0.0

    @property
    def speculation_precision(self) -> float:
        return self.speculated_used / self.speculated if self.speculated else 0.0

    def __str__(self) -> str:
        text = (
            f"experts: {self.requested} requested in {self.steps} steps, {self.hits} hits "
            f"({100 * self.hit_rate:.1f}%), {self.misses} misses, H2D {self.h2d_bytes / 1e6:.1f} MB, "
            f"waited {self.wait_seconds * 1e3:.1f} ms"
        )
        if self.speculated:
            text += f", speculated {self.speculated} ({100 * self.speculation_precision:.1f}% used)"
        return text


@dataclass
class OffloadStats:
    """What the runtime did so far.

    Attributes:
        disk_bytes: payload bytes read from the container (mmap) while streaming.
        h2d_bytes: bytes copied host -> device (CUDA; 0 on the CPU).
        h2d_seconds: device time of those copies (CUDA events; like ``decode_seconds`` on the GPU, a copy
            or decode is counted once the GPU has finished it and a later load looked, or the runtime closed).
        decode_bytes: decoded bytes written into slots.
        decode_seconds: decode time (CUDA events on the GPU, wall time on the CPU).
        wait_seconds: host time the compute thread waited for a group to be loaded (or its decode enqueued)
            by the prefetch thread; 0 when loads run inline on the compute thread (CUDA, no disk tier).
        loads: groups loaded into slots; ``demand_loads`` of them requested by a forward that needed them
            now rather than by the prefetcher.
        peak_weight_bytes: bytes the runtime holds for weights on the device (its arena: resident groups,
            payloads in VRAM, slots, staging, decoder scratch, shared workspace).
        tiers: per tier, what it holds and did (:class:`TierStats`), fastest tier first.
    """

    disk_bytes: int = 0
    h2d_bytes: int = 0
    h2d_seconds: float = 0.0
    decode_bytes: int = 0
    decode_seconds: float = 0.0
    wait_seconds: float = 0.0
    loads: int = 0
    demand_loads: int = 0
    peak_weight_bytes: int = 0
    tiers: dict[str, TierStats] = field(default_factory=dict)
    experts: ExpertStats | None = None

    def tier(self, name: str) -> TierStats:
        """The counters of tier ``name`` (created on first use)."""
        return self.tiers.setdefault(name, TierStats())

    @property
    def h2d_gbps(self) -> float:
        return self.h2d_bytes / self.h2d_seconds / 1e9 if self.h2d_seconds else 0.0

    @property
    def decode_gbps(self) -> float:
        return self.decode_bytes / self.decode_seconds / 1e9 if self.decode_seconds else 0.0

    def __str__(self) -> str:  # binary units, like the plan and every size the CLI prints
        def rate(nbytes: int, seconds: float) -> str:
            return f"{nbytes / seconds / GIB:.1f} GiB/s" if seconds else "- GiB/s"

        return (
            f"offload stats: {self.loads} loads ({self.demand_loads} on demand), "
            f"disk {self.disk_bytes / MIB:.1f} MiB, "
            f"H2D {self.h2d_bytes / MIB:.1f} MiB at {rate(self.h2d_bytes, self.h2d_seconds)}, "
            f"decode {self.decode_bytes / MIB:.1f} MiB at {rate(self.decode_bytes, self.decode_seconds)}, "
            f"compute waited {self.wait_seconds * 1e3:.1f} ms, peak weight memory "
            f"{self.peak_weight_bytes / MIB:.1f} MiB"
            + "".join(
                f"; {name}: {t.groups} groups, {t.loads} loads" for name, t in self.tiers.items() if t.groups
            )
            + (f"; {self.experts}" if self.experts is not None else "")
        )
