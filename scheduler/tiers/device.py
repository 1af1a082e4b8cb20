"""``device_compressed``: the payload is kept in VRAM and decoded into a slot on each use (CUDA only).

Nothing crosses PCIe per token: each use costs a decode (nvCOMP ANS: ~1 TB/s) instead of a copy. Payloads
reach the arena at dispatch through one reused pinned bounce buffer: pinning costs ~0.5 s per GB, so a
fresh pinned buffer per group would make dispatching a large model slow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from offload_runtime.loaders.format import GroupEntry
from offload_runtime.native.base import HostBuffer
from offload_runtime.scheduler.sizes import GroupSize
from offload_runtime.scheduler.tiers.base import Tier, TierContext, TierStore

if TYPE_CHECKING:
    from offload_runtime.scheduler.pcie import PcieStager


class DevicePayloadStore(TierStore):
    def __init__(self, tier: Tier, ctx: TierContext) -> None:
        super().__init__(tier, ctx)
        self.payloads: dict[str, torch.Tensor] = {}
        self._bounce = HostBuffer(pinned=True)

    def place(self, entry: GroupEntry) -> None:
        super().place(entry)
        staged = self.ctx.source.read_into(entry.name, self._bounce(entry.stored_size))
        self.payloads[entry.name] = self.ctx.arena.take(entry.stored_size).copy_(staged)  # synchronous
        self.counters.device_bytes += entry.stored_size

    def finish_placing(self) -> None:
        """Every group is placed: the bounce buffer is not needed any more."""
        self._bounce.release()

    def device_payload(self, entry: GroupEntry, pcie: PcieStager) -> tuple[torch.Tensor, int | None]:
        self.counters.loads += 1
        return self.payloads[entry.name], None

    def close(self) -> None:
        self.payloads.clear()
        self._bounce.release()


class DeviceCompressedTier(Tier):
    """Compressed payloads in VRAM, decoded into a slot on use."""

    name = "device_compressed"
    uses_slot = True
    devices = frozenset({"cuda"})
    payload_in_vram = True

    def device_bytes(self, group: GroupSize) -> int:
        return group.stored_bytes

    def open(self, ctx: TierContext) -> TierStore:
        return DevicePayloadStore(self, ctx)
