"""``resident``: decoded once at dispatch into the arena and kept on the device; no slot, no loads."""

from __future__ import annotations

import torch

from offload_runtime.loaders.format import GroupEntry
from offload_runtime.scheduler.sizes import GroupSize
from offload_runtime.scheduler.tiers.base import Tier, TierContext, TierStore


class ResidentStore(TierStore):
    def __init__(self, tier: Tier, ctx: TierContext) -> None:
        super().__init__(tier, ctx)
        self.buffers: dict[str, torch.Tensor] = {}

    def place(self, entry: GroupEntry) -> None:
        super().place(entry)
        buffer = self.ctx.arena.take(entry.decoded_size)
        self.ctx.decode_resident(entry, buffer)
        self.buffers[entry.name] = buffer
        self.counters.device_bytes += entry.decoded_size

    def buffer(self, name: str) -> torch.Tensor | None:
        return self.buffers[name]

    def close(self) -> None:
        self.buffers.clear()


class ResidentTier(Tier):
    """Decoded weights kept on the device: the fastest tier and the most expensive one."""

    name = "resident"
    uses_slot = False

    def device_bytes(self, group: GroupSize) -> int:
        return group.decoded_bytes

    def open(self, ctx: TierContext) -> TierStore:
        return ResidentStore(self, ctx)
