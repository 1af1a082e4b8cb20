"""Payloads that cross PCIe: the device staging buffers, copy-ahead, and the pinned ring disk reads land in.

A load of a group whose payload lives off the device (host or disk tier) asks :meth:`PcieStager.stage` for
the payload on the device. The stager copies it (on its copy stream) into the group's *home* staging buffer
(``j``-th over-PCIe group -> buffer ``j % n``, see :mod:`.staging` for the bookkeeping and why homes are
fixed), unless it was copied ahead already, and orders the caller's decode stream after that copy. Disk
payloads are first read (``preadv``) into one of the plan's pinned host ring buffers; the host waits only
for the previous H2D copy out of the same ring buffer.

Events gate reuse: a copy into staging buffer ``k`` waits for ``staging_free[k]`` (recorded by the loader
after the decode that consumed ``k``: :meth:`consumed`), a decode from ``k`` waits for ``copy_done[k]``.
Every size comes from the plan's :class:`~offload_runtime.scheduler.planner.Buffers`; the staging buffers are
pieces of the runtime's arena.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from offload_runtime.errors import PlanError
from offload_runtime.loaders.format import GroupEntry
from offload_runtime.scheduler.arena import DeviceArena
from offload_runtime.scheduler.host_ring import HostReadRing, ReadInto
from offload_runtime.scheduler.order import ExecutionOrder
from offload_runtime.scheduler.planner import Buffers
from offload_runtime.scheduler.staging import StagingRing
from offload_runtime.scheduler.timing import H2D, GpuTimer


class PcieStager:
    """Device staging for the over-PCIe groups of one runtime (CUDA).

    Args:
        over_pcie (`Sequence[str]`): the groups whose payloads cross PCIe, in group order.
        buffers (`Buffers`): the plan's sizes (staging buffers, host ring).
        arena (`DeviceArena`): where the staging buffers come from.
        device (`torch.device`): the CUDA device.
        timer (`GpuTimer`): records copy times.
    """

    def __init__(
        self,
        over_pcie: Sequence[str],
        buffers: Buffers,
        arena: DeviceArena,
        device: torch.device,
        timer: GpuTimer,
    ) -> None:
        self.device = device
        self.timer = timer
        self.copy_stream = torch.cuda.Stream(device)
        n = buffers.staging_count if over_pcie else 0
        self.staging = [arena.take(buffers.staging_each) for _ in range(n)]
        self.staging_free = [torch.cuda.Event() for _ in range(n)]
        self.copy_done = [torch.cuda.Event() for _ in range(n)]
        self.ring = StagingRing({name: j % n for j, name in enumerate(over_pcie)}, n) if n else None
        self.host_ring = HostReadRing(buffers.host_ring_count, buffers.host_ring_each)

    def __repr__(self) -> str:
        return f"PcieStager(staging={len(self.staging)}, host_ring={len(self.host_ring)}, {self.ring})"

    def stage(
        self, entry: GroupEntry, host_src: torch.Tensor | None, read: ReadInto | None = None
    ) -> tuple[torch.Tensor, int, int]:
        """The payload of ``entry`` in its staging buffer; ``decode_stream`` must wait via :meth:`order`.

        Args:
            entry: the group.
            host_src: its (pinned) host copy, or ``None`` to ``read`` it from the container.
            read: ``(name, out) -> out[:stored_size]``, for groups without a host copy.

        Returns:
            `tuple`: (the payload on the device, its staging buffer, bytes copied now: 0 when copied ahead).
        """
        if self.ring is None or entry.name not in self.ring.home:
            raise PlanError("the plan gives this group no staging buffer", group=entry.name)
        k, copy_now = self.ring.for_load(entry.name)
        if copy_now:
            ring = None
            if host_src is None:
                host_src, ring = self.host_ring.read(entry.name, read)
            self._copy(entry.stored_size, k, host_src, ring)
        return self.staging[k][: entry.stored_size], k, entry.stored_size if copy_now else 0

    def order(self, stream: torch.cuda.Stream, k: int) -> None:
        """Make ``stream`` (the decode stream) wait for the copy into staging buffer ``k``."""
        stream.wait_event(self.copy_done[k])

    def consumed(self, k: int, stream: torch.cuda.Stream) -> None:
        """The decode reading buffer ``k`` is enqueued on ``stream``: the buffer may take the next copy."""
        self.staging_free[k].record(stream)
        self.ring.consume(k)

    def copy_ahead(
        self, after: str, order: ExecutionOrder | None, host_copy: Callable[[str], torch.Tensor | None]
    ) -> None:
        """Copy the payloads of the host-held groups expected after ``after`` into their free home buffers,
        in execution order (``host_copy(name)``: the pinned copy of a group, ``None`` if it has none)."""
        if order is None or self.ring is None:
            return
        has_copy = {}

        def accept(name: str) -> bool:
            if name not in self.ring.home:
                return False
            has_copy[name] = host_copy(name)
            return has_copy[name] is not None

        upcoming = order.following(after, len(self.ring.holder), accept)
        for name, k in self.ring.copies_ahead(upcoming):
            src = has_copy[name]
            self._copy(src.numel(), k, src)

    def _copy(self, nbytes: int, k: int, host_src: torch.Tensor, ring: int | None = None) -> None:
        """Enqueue the H2D copy of ``nbytes`` of ``host_src`` into staging buffer ``k`` on the copy stream."""
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.staging_free[k])  # the decode that read buffer k is done
            start = self.timer.start(self.copy_stream)
            self.staging[k][:nbytes].copy_(host_src[:nbytes], non_blocking=True)
            self.timer.end(H2D, start, self.copy_stream, nbytes)
            self.copy_done[k].record(self.copy_stream)
            if ring is not None:
                self.host_ring.copied(ring, self.copy_stream)

    def close(self) -> None:
        self.copy_stream.synchronize()
        self.staging.clear()
        self.host_ring.clear()
