"""The tiers a group can live in, fastest first (installed as ``offload_runtime.scheduler.tiers``).

Registration order is preference order: the planner tries tiers in this order. Adding a tier means a module
here (a :class:`~offload_runtime.scheduler.tiers.base.Tier` and its store), one line in :data:`TIERS`, and
its tests; the planner, the runtime and the loaders only use the tier interface.
"""

from __future__ import annotations

from offload_runtime.scheduler.tiers.base import Tier, TierContext, TierStore
from offload_runtime.scheduler.tiers.device import DeviceCompressedTier
from offload_runtime.scheduler.tiers.disk import DiskTier
from offload_runtime.scheduler.tiers.executed import ExecutedCompressedTier
from offload_runtime.scheduler.tiers.host import HostTier
from offload_runtime.scheduler.tiers.resident import ResidentTier

RESIDENT = ResidentTier()
EXECUTED_COMPRESSED = ExecutedCompressedTier()
DEVICE_COMPRESSED = DeviceCompressedTier()
HOST = HostTier()
DISK = DiskTier()

# executed_compressed accepts only the groups a dispatch opted in (execute_compressed=True): for them it
# comes before resident (no decoded copy; batch-1 kernels at or above cuBLAS speed on large shapes)
TIERS: tuple[Tier, ...] = (EXECUTED_COMPRESSED, RESIDENT, DEVICE_COMPRESSED, HOST, DISK)

__all__ = [
    "DEVICE_COMPRESSED",
    "DISK",
    "EXECUTED_COMPRESSED",
    "HOST",
    "RESIDENT",
    "TIERS",
    "Tier",
    "TierContext",
    "TierStore",
    "tier_named",
    "tiers_on",
]


def tiers_on(device: str) -> tuple[Tier, ...]:
    """The registered tiers that exist on ``device`` (``"cpu"`` or ``"cuda"``), fastest first."""
    return tuple(t for t in TIERS if device in t.devices)


def tier_named(name: str) -> Tier:
    """The registered tier called ``name``; ``KeyError`` naming the known ones."""
    for tier in TIERS:
        if tier.name == name:
            return tier
    raise KeyError(f"no tier {name!r}; tiers: {', '.join(t.name for t in TIERS)}")
