"""The CUDA loader: payload on the device (its tier's business), then an nvCOMP decode into the slot.

A load asks the group's tier store for the payload on the device: kept in VRAM, or copied over PCIe by the
:class:`~offload_runtime.scheduler.pcie.PcieStager` (which copies host-held payloads ahead in execution
order). The decode stream waits for that copy and for the slot's release event, runs the group's
:class:`~offload_runtime.native.GpuDecoder` and records the slot's ready event. Nothing on the host waits
for the GPU: decodes go through nvCOMP's batched C API by ctypes, which only enqueues (nvCOMP's Python API
blocked ~2.7 ms per call, holding the GIL, when the GPU was busy). GPU timings are harvested from pooled
events once the GPU has passed them.

Decoded bytes are checked on the GPU (nvCOMP statuses, sizes, CRC-32s) per the source's verify policy:
``"once"`` the first decode of each group, ``"always"`` every decode; the forward of the group waits for the
check, so a failed decode is reported there, before any kernel reads the slot.
"""

from __future__ import annotations

from typing import Any

import torch

from offload_runtime.errors import OffloadError
from offload_runtime.loaders.format import GroupEntry
from offload_runtime.loaders.reader import locate_error
from offload_runtime.loaders.source import GroupSource
from offload_runtime.loaders.verify import DECODED
from offload_runtime.native import GpuDecoder, get_codec
from offload_runtime.native.base import HostBuffer
from offload_runtime.native.workspace import DecodeWorkspace
from offload_runtime.scheduler.arena import BumpAllocator
from offload_runtime.scheduler.order import ExecutionOrder
from offload_runtime.scheduler.pcie import PcieStager
from offload_runtime.scheduler.slots import Slot
from offload_runtime.scheduler.stats import OffloadStats
from offload_runtime.scheduler.tiers import TierStore
from offload_runtime.scheduler.timing import DECODE, GpuTimer


class CudaLoader:
    """Loads on a CUDA device through the PCIe stager's copy stream and a decode stream.

    Args:
        source (`GroupSource`): where payloads come from.
        device (`torch.device`): the CUDA device.
        stores (`dict[str, TierStore]`): every group's tier store.
        decoders (`dict[str, GpuDecoder]`): the GPU decoder of every slot group (arrays from the arena).
        workspace (`DecodeWorkspace`): the decode workspace the decoders share (buffers from the arena).
        pcie (`PcieStager`): staging for payloads that cross PCIe.
        timer (`GpuTimer`): copy and decode timings.
        stats (`OffloadStats`): counters.
        decode_stream (`torch.cuda.Stream`): the stream every decode runs on (the workspace's stream).
    """

    def __init__(
        self,
        source: GroupSource,
        device: torch.device,
        stores: dict[str, TierStore],
        decoders: dict[str, GpuDecoder],
        workspace: DecodeWorkspace,
        pcie: PcieStager,
        timer: GpuTimer,
        stats: OffloadStats,
        decode_stream: torch.cuda.Stream,
    ) -> None:
        self.source, self.device, self.stats = source, device, stats
        self.entries = {g.name: g for g in source.groups}
        self.stores, self.decoders, self.workspace = stores, decoders, workspace
        self.pcie, self.timer = pcie, timer
        self.decode_stream = decode_stream
        self.order: ExecutionOrder | None = None
        # only disk reads block the host; without them loads merely enqueue work (inline engine)
        self.blocks_host = bool(pcie.host_ring)
        self._checks: dict[int, tuple[str, Any]] = {}  # slot index -> (group, pending check of its load)
        self._host_decode = HostBuffer(pinned=False)  # reused by decode_into for CPU-decodable codecs
        self._bounce = HostBuffer(pinned=True)  # reused by decode_into for device-only codecs

    def new_slot_events(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        return torch.cuda.Event(), torch.cuda.Event()

    def follow(self, order: ExecutionOrder) -> None:
        """Copy host-held payloads ahead in ``order`` (the engine's learned execution order)."""
        self.order = order

    def _host_copy(self, name: str) -> torch.Tensor | None:
        return self.stores[name].host_copy(name)

    def load(self, name: str, slot: Slot, wait_release: bool) -> None:
        entry = self.entries[name]
        self.timer.harvest()
        src, k = self.stores[name].device_payload(entry, self.pcie)
        if k is not None:
            self.pcie.order(self.decode_stream, k)
        if wait_release:
            # the host handshake guarantees this event was recorded (a wait on an unrecorded event is a no-op)
            self.decode_stream.wait_event(slot.release_event)
        check = self.source.policy.due(DECODED, name)
        start = self.timer.start(self.decode_stream)
        report = self.decoders[name].decode(src, slot.buffer[: entry.decoded_size], self.decode_stream, check)
        self.timer.end(DECODE, start, self.decode_stream, entry.decoded_size)
        if report is not None:
            self._checks[slot.index] = (name, report)
        else:
            self._checks.pop(slot.index, None)
        slot.ready_event.record(self.decode_stream)
        if k is not None:
            self.pcie.consumed(k, self.decode_stream)
        self.pcie.copy_ahead(name, self.order, self._host_copy)

    def decode_into(self, entry: GroupEntry, out: torch.Tensor, window: torch.Tensor | None = None) -> None:
        """Decode ``entry`` into device tensor ``out``, synchronously (resident groups at dispatch, and
        ``remove_offload``).

        A codec with a CPU decoder decodes on the host and the bytes are copied (no device scratch at all).
        Otherwise the payload and the group's decoder arrays are carved from ``window`` (at dispatch: the
        plan's streaming region, unused until the first load, see ``Buffers.window_bytes``) and the decode
        draws on the shared workspace; without a window both come from torch (``remove_offload``, after the
        runtime's memory is gone). The decoded bytes are checked per the verify policy.
        """
        out = out[: entry.decoded_size]
        if get_codec(entry.codec).decodes_on_cpu(entry.params):
            host = self._host_decode(entry.decoded_size)[: entry.decoded_size]
            self.source.decode_cpu(entry.name, host)
            out.copy_(host)  # pageable: synchronous, and at dispatch faster than pinning a buffer first
            return
        staged = self.source.read_into(entry.name, self._bounce(entry.stored_size))
        stream = self.decode_stream
        allocate = BumpAllocator(window).take if window is not None else None
        with torch.cuda.stream(stream):
            if allocate is not None:
                payload = allocate(entry.stored_size)[: entry.stored_size]
            else:
                payload = torch.empty_like(staged, device=self.device)
            payload.copy_(staged, non_blocking=True)
        decoder = get_codec(entry.codec).gpu_decoder(
            entry.chunks, entry.params, entry.layout, self.device, allocate
        )
        if window is not None:
            decoder.use_workspace(self.workspace)
        check = self.source.policy.due(DECODED, entry.name)
        report = decoder.decode(payload, out, stream, check)
        stream.synchronize()  # the window is reused by the next resident decode, then by the slots
        if report is not None:
            try:
                report.result()
            except OffloadError as exc:
                raise locate_error(exc, self.source.path, entry.name) from exc
            self.source.policy.passed(DECODED, entry.name)

    def finish_dispatch(self) -> None:
        """Dispatch is over: wait for the resident decodes, drop the buffers ``decode_into`` kept for them."""
        torch.cuda.current_stream(self.device).synchronize()
        self.decode_stream.synchronize()
        self._host_decode.release()
        self._bounce.release()

    def record_release(self, slot: Slot) -> None:
        slot.release_event.record(torch.cuda.current_stream(self.device))

    def refresh_stats(self) -> None:
        """Add the copies and decodes the GPU has finished (event queries: no wait). Without it, a group
        loaded once and never again (its slot is never reused) would never show in the stats."""
        self.timer.harvest()

    def wait_ready(self, slot: Slot) -> None:
        """Order the compute stream after the slot's decode; first wait for its check, if it has one.

        Raises:
            CorruptCheckpointError: the decode failed or its bytes differ from the index (file, group, chunk).
        """
        pending = self._checks.pop(slot.index, None)
        if pending is not None:
            name, report = pending
            try:
                report.result()
            except OffloadError as exc:
                raise locate_error(exc, self.source.path, name) from exc
            self.source.policy.passed(DECODED, name)
        torch.cuda.current_stream(self.device).wait_event(slot.ready_event)

    def close(self) -> None:
        self.decode_stream.synchronize()
        self.pcie.close()
        self.timer.harvest(wait=True)
        for store in self.stores.values():
            store.close()
        self.decoders.clear()  # with them the shared workspace goes (decode_into builds its own decoder)
        self.finish_dispatch()
