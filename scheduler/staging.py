"""Which payload each device staging buffer holds: the bookkeeping of copy-ahead.

Payloads that cross PCIe (host- and disk-tier groups) are copied into one of a few device staging buffers
and decoded from there into their slot. A copy needs a staging buffer, not the group's slot, so it need not
wait for the slot to be released: as soon as a staging buffer's payload has been consumed (its decode
enqueued), the next over-PCIe group of the execution order that uses this buffer is copied into it. The
copy engine then keeps working while the groups in between, whose payloads already sit in VRAM, decode and
compute; a group's copy is no longer serialised behind its slot's previous occupant.

Each group has a fixed *home* buffer (the ``j``-th over-PCIe group uses buffer ``j % n``), like slots: a
group always decodes from the same (staging, slot) pair, so the nvCOMP decoder keeps one device pointer
table per group, which the planner charges.

This class is the host-side state only (tested on the CPU); the CUDA loader pairs each step with its event:
a copy into buffer ``k`` waits for ``staging_free[k]`` (recorded after the decode that consumed ``k``), and a
decode from ``k`` waits for ``copy_done[k]`` (recorded after the copy into ``k``). A buffer is reassigned
only after its payload was consumed or abandoned (the order changed), and copies run in order on one copy
stream, so one event of each kind per buffer suffices.
"""

from __future__ import annotations

from collections.abc import Sequence


class StagingRing:
    """``holder[k]``: the group whose payload is in (or being copied into) buffer ``k``, not yet consumed.

    Args:
        home (`dict[str, int]`): the staging buffer of every over-PCIe group.
        nbuffers (`int`): how many staging buffers there are.
    """

    def __init__(self, home: dict[str, int], nbuffers: int) -> None:
        self.home = dict(home)
        self.holder: list[str | None] = [None] * nbuffers

    def __repr__(self) -> str:
        return f"StagingRing({self.holder})"

    def for_load(self, group: str) -> tuple[int, bool]:
        """The buffer to decode ``group`` from, and whether its copy must be enqueued now (it was not
        copied ahead; whatever its buffer held is abandoned)."""
        k = self.home[group]
        if self.holder[k] == group:
            return k, False
        self.holder[k] = group
        return k, True

    def consume(self, k: int) -> None:
        """The decode reading buffer ``k`` is enqueued: the buffer may take the next copy."""
        self.holder[k] = None

    def copies_ahead(self, upcoming: Sequence[str]) -> list[tuple[str, int]]:
        """The copies to enqueue now, in order: the groups of ``upcoming`` (nearest first) whose home buffer
        is free, up to the first whose buffer is still held by another group (copies stay in execution
        order). Buffers are assigned here; the caller enqueues the copies."""
        copies = []
        for group in upcoming:
            k = self.home[group]
            if self.holder[k] == group:
                continue
            if self.holder[k] is not None:
                break
            self.holder[k] = group
            copies.append((group, k))
        return copies
