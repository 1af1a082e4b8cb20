"""One device allocation that every runtime buffer (slots, resident groups, staging) is carved from.

The CUDA caching allocator rounds each request and may charge an unsplit segment tail of up to 1 MiB on
a large one; a single arena pays that once, so ``torch.cuda.memory_allocated()`` matches the plan.
"""

from __future__ import annotations

import torch

ARENA_ALIGN = 512  # every piece starts 512-byte aligned (nvCOMP and vectorised loads need far less)


def arena_size(nbytes: int) -> int:
    """What :meth:`DeviceArena.take` consumes for a piece of ``nbytes``."""
    return -(-nbytes // ARENA_ALIGN) * ARENA_ALIGN


class DeviceArena:
    """A flat uint8 device buffer handed out in aligned pieces, never freed piecewise.

    Args:
        nbytes (`int`): total size (sum of :func:`arena_size` of the pieces).
        device (`torch.device`): where to allocate.
    """

    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.offset = 0

    def take(self, nbytes: int) -> torch.Tensor:
        end = self.offset + arena_size(nbytes)
        if end > self.buffer.numel():
            raise RuntimeError(
                f"device arena exhausted: piece of {nbytes} bytes at offset {self.offset}, "
                f"arena holds {self.buffer.numel()} (the plan and the allocations disagree)"
            )
        piece = self.buffer[self.offset : self.offset + nbytes]
        self.offset = end
        return piece

    def __repr__(self) -> str:
        return f"DeviceArena({self.offset}/{self.buffer.numel()} bytes used on {self.buffer.device})"
