"""The scheduler's state as data: decode slots and the tickets of loads into them.

See :mod:`offload_runtime.scheduler.engine` for the protocol these fields implement.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class Ticket:
    """One load of ``group`` into slot ``slot``.

    Attributes:
        group: the group loaded.
        slot: the slot it is loaded into.
        demand: requested by a forward that needs it now (not by the prefetcher).
        done: host handshake, set by the worker once the load is finished (CPU) or its decode is enqueued
            and the slot's ready event recorded after it (CUDA); waiting on the device event before this
            is set would be a no-op.
        pins: pre-forwards that use this load and have not run their post-forward yet.
        acquired: some pre-forward took this ticket; a superseded ticket nobody took is skipped.
        released: a post-forward recorded the slot's release event for this load.
        error: what the load raised, re-raised in the forward that needs it.
    """

    group: str
    slot: int
    demand: bool
    done: threading.Event = field(default_factory=threading.Event)
    pins: int = 0
    acquired: bool = False
    released: bool = False
    error: BaseException | None = None


@dataclass(eq=False)
class Slot:
    """A preallocated buffer that streamed groups decode into (group j of the streamed ones uses j % n).

    Attributes:
        index: position in the slot pool.
        buffer: uint8 tensor of the slot size on the device; parameters are permanent views into it.
        current: the latest ticket assigned to this slot (loaded, loading or queued); a forward finds
            its group here.
        loaded: the ticket whose bytes are (being) written into ``buffer``.
        ready_event: CUDA event recorded on the decode stream after ``loaded``'s decode (None on the CPU).
        release_event: CUDA event recorded on the compute stream after the last use of ``loaded``.
    """

    index: int
    buffer: torch.Tensor
    current: Ticket | None = None
    loaded: Ticket | None = None
    ready_event: Any = None
    release_event: Any = None

    def __repr__(self) -> str:
        cur = self.current.group if self.current else None
        loaded = self.loaded.group if self.loaded else None
        return f"Slot({self.index}, {self.buffer.numel()} bytes, current={cur!r}, loaded={loaded!r})"
