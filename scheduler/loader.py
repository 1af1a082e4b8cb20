"""The data path of one load, behind one protocol: a CPU loader and a CUDA loader (``cuda_loader.py``).

The engine's state machine is identical on both; only what a load does differs:

* :class:`CpuLoader`: the group's tier decodes it into the slot on the worker thread, synchronously; events
  are not needed (the host handshake of the engine is the whole synchronisation);
* :class:`~offload_runtime.scheduler.cuda_loader.CudaLoader`: the tier puts the payload on the device (kept
  in VRAM, or copied over PCIe by the stager), the decode stream decodes it into the slot and records the
  slot's ready event, and nothing on the host waits for the GPU.

Where a group's payload lives is its tier's business: loaders ask the group's
:class:`~offload_runtime.scheduler.tiers.TierStore` and never look at which tier it is.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol

import torch

from offload_runtime.loaders.format import GroupEntry
from offload_runtime.loaders.source import GroupSource
from offload_runtime.scheduler.order import ExecutionOrder
from offload_runtime.scheduler.planner import Plan
from offload_runtime.scheduler.slots import Slot
from offload_runtime.scheduler.stats import OffloadStats
from offload_runtime.scheduler.tiers import TierStore


class Loader(Protocol):
    """What the engine and the runtime ask of a loader.

    Attributes:
        device: where slots live.
        blocks_host: a load can block the host (CPU decodes, disk reads): the engine then loads on a thread.
    """

    device: torch.device
    blocks_host: bool

    def load(self, name: str, slot: Slot, wait_release: bool) -> None:
        """Load group ``name`` into ``slot``; with ``wait_release``, only after the slot's release event."""
        ...

    def decode_into(self, entry: GroupEntry, out: torch.Tensor, window: torch.Tensor | None = None) -> None:
        """Decode ``entry`` into ``out`` synchronously (resident groups at dispatch, ``remove_offload``);
        ``window``: device memory the decode may use for its payload and scratch (else it allocates)."""
        ...

    def finish_dispatch(self) -> None:
        """Every group is placed: resident decodes are done; drop what they needed."""
        ...

    def new_slot_events(self) -> tuple[object, object]:
        """A slot's (ready, release) events (``None`` where events are not needed)."""
        ...

    def follow(self, order: ExecutionOrder) -> None:
        """Work ahead in ``order`` (the engine's learned execution order) where the loader can."""
        ...

    def record_release(self, slot: Slot) -> None:
        """The compute thread is done with ``slot``."""
        ...

    def refresh_stats(self) -> None:
        """Bring the stats up to date with what the device has finished, without waiting (a pass ended)."""
        ...

    def wait_ready(self, slot: Slot) -> None:
        """Order the compute after the slot's load (and its decode check, if any)."""
        ...

    def close(self) -> None: ...


class CpuLoader:
    """Loads on the CPU: each group's tier decodes it into the slot (see :class:`Loader`).

    Disk reads go into one staging buffer sized by the plan, so a load allocates nothing: transient
    group-sized buffers per load would be kept by glibc's heap (its mmap threshold adapts upward) and RSS
    would grow.
    """

    device = torch.device("cpu")
    blocks_host = True  # decoding is CPU work: it runs on the prefetch thread, overlapping the forward

    def __init__(self, source: GroupSource, plan: Plan, stats: OffloadStats, stores: dict[str, TierStore]):
        self.source = source
        self.stats = stats
        self.entries = {g.name: g for g in source.groups}
        self.stores = stores
        self.staging = torch.empty(plan.buffers.host_ring_each, dtype=torch.uint8)
        self._staging_lock = threading.Lock()  # the worker decodes; decode_into may run on the caller

    def decode_into(self, entry: GroupEntry, out: torch.Tensor, window: torch.Tensor | None = None) -> None:
        self.source.decode_cpu(entry.name, out[: entry.decoded_size])

    def load(self, name: str, slot: Slot, wait_release: bool) -> None:
        entry = self.entries[name]
        start = time.perf_counter()
        with self._staging_lock:
            self.stores[name].decode_cpu(entry, slot.buffer[: entry.decoded_size], self.staging)
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.decode_bytes += entry.decoded_size

    def finish_dispatch(self) -> None:
        """Resident decodes ran synchronously on the caller; nothing to wait for."""

    def new_slot_events(self) -> tuple[None, None]:
        return None, None

    def follow(self, order: ExecutionOrder) -> None:
        """Nothing is loaded ahead of the slots on the CPU."""

    def record_release(self, slot: Slot) -> None:
        """The compute thread is done with the slot; nothing to record on the CPU."""

    def refresh_stats(self) -> None:
        """CPU loads update the stats as they run."""

    def wait_ready(self, slot: Slot) -> None:
        """The load finished on the worker thread before the handshake; nothing to wait for."""

    def close(self) -> None:
        self.staging = torch.empty(0, dtype=torch.uint8)
