"""``disk``: the payload stays in the container and is read on each use.

Reads go through the source's ``preadv`` (never the mmap: a container truncated under a running model is a
typed error, not SIGBUS), into the loader's reusable staging buffer on the CPU, or into the PCIe stager's
pinned host ring on CUDA, from where it is copied to the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from offload_runtime.loaders.format import GroupEntry
from offload_runtime.scheduler.sizes import GroupSize
from offload_runtime.scheduler.tiers.base import Tier, TierContext, TierStore

if TYPE_CHECKING:
    from offload_runtime.scheduler.pcie import PcieStager


class DiskStore(TierStore):
    def decode_cpu(self, entry: GroupEntry, out: torch.Tensor, staging: torch.Tensor) -> None:
        self.ctx.source.decode_cpu(entry.name, out, staging=staging)
        self.counters.loads += 1
        self.counters.fetched_bytes += entry.stored_size
        self.ctx.stats.disk_bytes += entry.stored_size

    def device_payload(self, entry: GroupEntry, pcie: PcieStager) -> tuple[torch.Tensor, int | None]:
        self.counters.loads += 1
        src, k, copied = pcie.stage(entry, None, read=self.ctx.source.read_into)
        self.counters.fetched_bytes += copied
        if copied:
            self.ctx.stats.disk_bytes += entry.stored_size
        return src, k


class DiskTier(Tier):
    """Compressed payloads left in the container (mmap/pread), read on every use."""

    name = "disk"
    uses_slot = True
    reads_disk = True

    def device_bytes(self, group: GroupSize) -> int:
        return 0

    def crosses_pcie(self, device: str) -> bool:
        return device == "cuda"

    def open(self, ctx: TierContext) -> TierStore:
        return DiskStore(self, ctx)
