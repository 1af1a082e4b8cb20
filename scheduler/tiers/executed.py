"""``executed_compressed``: the payload is kept on the device and the group's linear layers compute from it.

For codecs that execute compressed (``fused12``: lossless 12-bit planes, Triton kernels): no slot and no
decode per use. Each 2-D weight stays in its compute format inside the payload (the linear layer that owns it
runs ``fused_linear`` on the planes: ``offload_runtime/compressed_linear.py``); the group's other tensors
(norms, biases) are stored verbatim in the same payload and used in place, as resident tensors are. The
weights are exact; the kernels' summation order differs from cuBLAS, so outputs are not bitwise those of a
resident group (see the README). A group qualifies only when every tensor in a compute format is the weight
of an ``nn.Linear`` (decided with the model at dispatch: ``GroupSize.executable``); it is opt-in
(``execute_compressed=True``).
"""

from __future__ import annotations

from typing import Any

from offload_runtime.loaders.format import GroupEntry
from offload_runtime.native import get_codec
from offload_runtime.native.base import HostBuffer
from offload_runtime.scheduler.sizes import GroupSize
from offload_runtime.scheduler.tiers.base import Tier, TierContext, TierStore


class ExecutedStore(TierStore):
    def __init__(self, tier: Tier, ctx: TierContext) -> None:
        super().__init__(tier, ctx)
        self.views: dict[str, dict[str, Any]] = {}
        self._bounce = HostBuffer(pinned=ctx.pinned)

    def place(self, entry: GroupEntry) -> None:
        super().place(entry)
        staged = self.ctx.source.read_into(entry.name, self._bounce(entry.stored_size))
        payload = self.ctx.arena.take(entry.stored_size)[: entry.stored_size]
        payload.copy_(staged)  # synchronous
        codec = get_codec(entry.codec)
        self.views[entry.name] = codec.compute_views(payload, entry.params, entry.layout, entry.chunks)
        self.counters.device_bytes += entry.stored_size

    def finish_placing(self) -> None:
        self._bounce.release()

    def compute_views(self, name: str) -> dict[str, Any]:
        return self.views[name]

    def close(self) -> None:
        self.views.clear()
        self._bounce.release()


class ExecutedCompressedTier(Tier):
    """Compressed payloads in VRAM that the group's linear layers compute from; no slot."""

    name = "executed_compressed"
    uses_slot = False
    payload_in_vram = True
    computes_compressed = True

    def device_bytes(self, group: GroupSize) -> int:
        return group.stored_bytes

    def accepts(self, group: GroupSize) -> bool:
        return group.executable

    def open(self, ctx: TierContext) -> TierStore:
        return ExecutedStore(self, ctx)
