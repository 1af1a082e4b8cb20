"""The pinned host ring disk reads land in on their way over PCIe: buffers reused in turn.

A payload that has no copy in host RAM is read from the container (``read_into``) into a pinned buffer,
then copied to the device asynchronously, on a copy stream. Pinned, because an H2D copy from pageable
memory runs at a fraction of the link's rate and blocks the host; a ring, because the copy of one payload
can run while the next one is read.

Protocol:

1. :meth:`HostReadRing.read` takes the next buffer in turn (``0, 1, ..., count - 1, 0, ...``) and, before
   reading into it, waits on the host for the event of the last copy out of that buffer: a read never
   overwrites bytes a copy may still be reading. It is the ring's only host wait, and it happens only when
   the reads are a whole lap ahead of the copies.
2. The caller enqueues the copy out of the buffer, then calls :meth:`HostReadRing.copied` with the buffer's
   index and the stream the copy is on: the event recorded there is what step 1 waits for on the next lap.

The plan sizes it (``host_ring_count`` buffers of ``host_ring_each`` bytes: the largest payload read from
disk). Used by the block streamer (:class:`~offload_runtime.scheduler.pcie.PcieStager`) and the expert
runtime's loads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from offload_runtime.errors import PlanError

ReadInto = Callable[[str, torch.Tensor], torch.Tensor]


class HostReadRing:
    """``count`` host buffers of ``each`` bytes that reads land in, in turn (see the module docstring).

    Args:
        count (`int`): buffers (0: a plan with nothing on disk).
        each (`int`): bytes per buffer.
        pinned (`bool`, defaults to `True`): page-locked buffers.
        event (*optional*): makes the event :meth:`copied` records (``torch.cuda.Event`` by default; an
            object with ``record(stream)`` and ``synchronize()``).
    """

    def __init__(self, count: int, each: int, *, pinned: bool = True, event: Callable[[], Any] | None = None):
        self.buffers = [torch.empty(each, dtype=torch.uint8, pin_memory=pinned) for _ in range(count)]
        self._event = event or torch.cuda.Event
        self._copied: list[Any | None] = [None] * count  # per buffer: an event at its last copy, re-recorded
        self._next = 0

    def __len__(self) -> int:
        return len(self.buffers)

    def __repr__(self) -> str:
        each = self.buffers[0].numel() if self.buffers else 0
        return f"HostReadRing({len(self)} x {each} B, next={self._next})"

    def read(self, name: str, read_into: ReadInto) -> tuple[torch.Tensor, int]:
        """Read group ``name``'s payload into the next buffer, once the last copy out of it is done.

        Returns:
            `tuple`: the payload (what ``read_into`` returns) and the buffer's index, for :meth:`copied`.

        Raises:
            PlanError: the ring has no buffer (the plan put nothing on disk), naming the group.
        """
        if not self.buffers:
            raise PlanError("the plan gives this disk read no host ring buffer", group=name)
        k = self._next
        self._next = (k + 1) % len(self.buffers)
        if self._copied[k] is not None:
            self._copied[k].synchronize()  # the previous H2D out of this pinned buffer is done
        return read_into(name, self.buffers[k]), k

    def copied(self, k: int, stream: Any) -> None:
        """The copy out of buffer ``k`` is enqueued on ``stream``: the next read into ``k`` waits for it."""
        if self._copied[k] is None:
            self._copied[k] = self._event()
        self._copied[k].record(stream)

    def clear(self) -> None:
        """Free the buffers (the ring is empty afterwards)."""
        self.buffers.clear()
        self._copied.clear()
        self._next = 0
