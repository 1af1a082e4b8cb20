"""One allocation that every device buffer of the runtime is carved from (CUDA and, for the same
accounting, the CPU).

The plan sizes every byte the runtime holds on the device; the arena is allocated once at that size and
handed out in aligned pieces, never freed piecewise. So ``torch.cuda.memory_allocated()`` matches the plan
(the CUDA caching allocator rounds each request and may charge an unsplit segment tail of up to 1 MiB on a
large one; a single arena pays that once), and a piece asked for beyond the plan is an error, not a silent
allocation outside the budget.
"""

from __future__ import annotations

import torch

from offload_runtime.errors import PlanError
from offload_runtime.native.layout import align_up

ARENA_ALIGN = 512  # every piece starts 512-byte aligned (nvCOMP and vectorised loads need far less)


def arena_size(nbytes: int) -> int:
    """What :meth:`DeviceArena.take` consumes for a piece of ``nbytes``."""
    return align_up(nbytes, ARENA_ALIGN)


class BumpAllocator:
    """Aligned pieces of an existing uint8 buffer, handed out in order (the arena, or a window of it).

    Args:
        buffer (`torch.Tensor`): a 1-D uint8 tensor whose start is :data:`ARENA_ALIGN`-aligned.
    """

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.offset = 0

    @property
    def used(self) -> int:
        return self.offset

    def take(self, nbytes: int) -> torch.Tensor:
        """The next ``nbytes`` (a view), starting :data:`ARENA_ALIGN`-aligned.

        Raises:
            PlanError: the buffer cannot hold it: the plan and the allocations disagree.
        """
        end = self.offset + arena_size(nbytes)
        if end > self.buffer.numel():
            raise PlanError(
                f"arena exhausted: a piece of {nbytes} bytes at offset {self.offset} does not fit "
                "(the plan and the allocations disagree)",
                expected=f"<= {self.buffer.numel()} bytes in all",
                actual=f"{end} bytes",
            )
        piece = self.buffer[self.offset : self.offset + nbytes]
        self.offset = end
        return piece


class DeviceArena(BumpAllocator):
    """A flat uint8 buffer on ``device`` handed out in aligned pieces, never freed piecewise.

    Args:
        nbytes (`int`): total size (sum of :func:`arena_size` of the pieces).
        device (`torch.device`): where to allocate.
    """

    def __init__(self, nbytes: int, device: torch.device) -> None:
        super().__init__(torch.empty(nbytes, dtype=torch.uint8, device=device))

    def __repr__(self) -> str:
        return f"DeviceArena({self.offset}/{self.buffer.numel()} bytes used on {self.buffer.device})"
