"""``host``: the payload is kept in host RAM (pinned on CUDA) and copied to the device on each use.

On CUDA the copy goes through the PCIe stager (:mod:`offload_runtime.scheduler.pcie`), which copies payloads
ahead into staging buffers in execution order; on the CPU the group is decoded straight from its RAM copy,
whose compressed CRCs were checked when it was read in, and whose decoded CRCs follow the source's policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from offload_runtime.loaders.format import GroupEntry
from offload_runtime.loaders.reader import decode_held_payload
from offload_runtime.scheduler.sizes import GroupSize
from offload_runtime.scheduler.tiers.base import Tier, TierContext, TierStore

if TYPE_CHECKING:
    from offload_runtime.scheduler.pcie import PcieStager


class HostPayloadStore(TierStore):
    def __init__(self, tier: Tier, ctx: TierContext) -> None:
        super().__init__(tier, ctx)
        self.payloads: dict[str, torch.Tensor] = {}

    def place(self, entry: GroupEntry) -> None:
        super().place(entry)
        buf = torch.empty(entry.stored_size, dtype=torch.uint8, pin_memory=self.ctx.pinned)
        self.ctx.source.read_into(entry.name, buf)
        self.payloads[entry.name] = buf
        self.counters.host_bytes += entry.stored_size

    def decode_cpu(self, entry: GroupEntry, out: torch.Tensor, staging: torch.Tensor) -> None:
        decode_held_payload(self.ctx.source, entry, self.payloads[entry.name], out)
        self.counters.loads += 1

    def device_payload(self, entry: GroupEntry, pcie: PcieStager) -> tuple[torch.Tensor, int | None]:
        self.counters.loads += 1
        src, k, copied = pcie.stage(entry, self.payloads[entry.name])
        self.counters.fetched_bytes += copied
        return src, k

    def host_copy(self, name: str) -> torch.Tensor | None:
        return self.payloads[name]

    def close(self) -> None:
        self.payloads.clear()


class HostTier(Tier):
    """Compressed payloads in (pinned) host RAM, bounded by the host budget."""

    name = "host"
    uses_slot = True

    def device_bytes(self, group: GroupSize) -> int:
        return 0

    def host_bytes(self, group: GroupSize) -> int:
        return group.stored_bytes

    def crosses_pcie(self, device: str) -> bool:
        return device == "cuda"

    def open(self, ctx: TierContext) -> TierStore:
        return HostPayloadStore(self, ctx)
