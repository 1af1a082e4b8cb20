"""What a tier is: where a group lives between forwards, what that costs, and how a load reaches it.

A tier has two faces:

* **planning** (pure, no memory touched): :meth:`Tier.device_bytes` and :meth:`Tier.host_bytes` of a group
  placed there, whether its groups need a decode slot (``uses_slot``), whether each use copies the
  payload over PCIe (:meth:`Tier.crosses_pcie`), and on which devices it exists. The planner reads only
  these, so it places groups in any registered tier without knowing it by name;
* **running**: :meth:`Tier.open` makes the tier's :class:`TierStore` for one runtime, which keeps what the
  tier holds for its groups (decoded buffers, payloads in VRAM, pinned copies) and serves loads: the CPU
  loader asks it to decode a group into a slot, the CUDA loader to put the group's payload on the device.
  Each store counts what it did in the tier's :class:`~offload_runtime.scheduler.stats.TierStats`.

A group in a tier without a slot is ready for every forward (nothing to acquire); a group in a slot tier is
made ready by the engine (acquire -> load into its slot -> release, see ``engine.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from offload_runtime.loaders.format import GroupEntry
from offload_runtime.loaders.source import GroupSource
from offload_runtime.scheduler.arena import DeviceArena
from offload_runtime.scheduler.sizes import GroupSize
from offload_runtime.scheduler.stats import OffloadStats, TierStats

if TYPE_CHECKING:
    from offload_runtime.scheduler.pcie import PcieStager


@dataclass
class TierContext:
    """What a tier's store may use at build time and while loading.

    Attributes:
        source: where payloads are read from.
        device: where the model runs.
        arena: the one device allocation every device byte of the plan comes from.
        stats: the runtime's counters (the store updates its tier's entry).
        decode_resident: decodes a group into a device buffer at dispatch (the loader's ``decode_into``
            with the plan's dispatch window).
        pinned: host copies are pinned (CUDA) so H2D copies run at full speed and asynchronously.
    """

    source: GroupSource
    device: torch.device
    arena: DeviceArena
    stats: OffloadStats
    decode_resident: Callable[[GroupEntry, torch.Tensor], None]
    pinned: bool


class TierStore:
    """A tier's state in one runtime: what it holds for its groups, and how loads get at it.

    Subclasses override what their tier supports; the defaults say "nothing to do" or refuse.
    """

    def __init__(self, tier: Tier, ctx: TierContext) -> None:
        self.tier = tier
        self.ctx = ctx
        self.counters: TierStats = ctx.stats.tier(tier.name)

    def place(self, entry: GroupEntry) -> None:
        """Keep what this tier holds for ``entry`` (called once per group at build time)."""
        self.counters.groups += 1

    def finish_placing(self) -> None:
        """Every group is placed: drop what placing needed (bounce buffers)."""

    def buffer(self, name: str) -> torch.Tensor | None:
        """The decoded buffer of a group that needs no slot (``None`` for slot tiers)."""
        return None

    def compute_views(self, name: str) -> dict[str, Any] | None:
        """A slotless group kept in a compute format: its tensors' views (``None`` for other tiers)."""
        return None

    def decode_cpu(self, entry: GroupEntry, out: torch.Tensor, staging: torch.Tensor) -> None:
        """CPU load: decode ``entry`` into ``out`` (``staging``: the loader's reusable payload buffer)."""
        raise NotImplementedError(f"tier {self.tier.name!r} has no CPU loads")

    def device_payload(self, entry: GroupEntry, pcie: PcieStager) -> tuple[torch.Tensor, int | None]:
        """CUDA load: ``entry``'s payload on the device, and the staging buffer it was copied into (``None``
        when the payload stays in VRAM); the loader's decode stream is ordered after any copy."""
        raise NotImplementedError(f"tier {self.tier.name!r} has no CUDA loads")

    def host_copy(self, name: str) -> torch.Tensor | None:
        """A (pinned) host copy of ``name``'s payload that PCIe staging may copy ahead from, if any."""
        return None

    def close(self) -> None:
        """Drop what the store holds."""


class Tier:
    """One tier (see the module docstring). Subclasses set the class attributes and implement
    :meth:`device_bytes` / :meth:`host_bytes` and :meth:`open`; register them in ``tiers/__init__.py``.

    Attributes:
        name: shown in plans and stats (``"resident"``, ``"host"``, ...).
        uses_slot: its groups are decoded into a slot for each use (streamed).
        devices: device types it exists on.
        payload_in_vram: a slot tier whose payloads stay on the device (nothing crosses PCIe per use).
        reads_disk: a load reads the container (CUDA: through the plan's pinned host ring).
        computes_compressed: its groups' layers compute from the payload (their kernels' scratch is charged:
            ``GroupSize.compute_scratch_bytes``).
    """

    name: ClassVar[str]
    uses_slot: ClassVar[bool]
    devices: ClassVar[frozenset[str]] = frozenset({"cpu", "cuda"})
    payload_in_vram: ClassVar[bool] = False
    reads_disk: ClassVar[bool] = False
    computes_compressed: ClassVar[bool] = False

    def device_bytes(self, group: GroupSize) -> int:
        """Device bytes the group holds in this tier, outside the runtime's shared buffers (slots, ...)."""
        raise NotImplementedError

    def host_bytes(self, group: GroupSize) -> int:
        """Host RAM the group holds in this tier (counted against the host budget)."""
        return 0

    def crosses_pcie(self, device: str) -> bool:
        """Whether each use copies the group's payload host -> device (needs device staging)."""
        return False

    def accepts(self, group: GroupSize) -> bool:
        """Whether ``group`` can be placed here (a codec capability, for instance)."""
        return True

    def open(self, ctx: TierContext) -> TierStore:
        """This tier's store for one runtime."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<tier {self.name}>"
