"""The data path of one load: container/host copy -> (staging -> H2D) -> decode -> slot.

Two implementations of the same three calls, so the engine's state machine is identical on both:

* :class:`CpuLoader`: decodes with ``codec.decode_cpu`` on the worker thread, synchronously; events are
  not needed (the host handshake of the engine is the whole synchronisation).
* :class:`CudaLoader`: disk reads land in a pinned host ring, the copy stream moves payloads into device
  staging, the decode stream waits for the copy and for the slot's release event, then runs the group's
  :class:`GpuDecoder` and records the slot's ready event. At most one decode is outstanding: the worker
  waits (GIL released) for the previous decode before issuing the next, because a second nvCOMP decode
  issued while the GPU is busy blocks the host ~2.7 ms holding the GIL.

Source objects are :class:`~offload_runtime.loaders.ContainerReader` or anything with the same
``groups``, ``payload``, ``read_into`` and ``decode_cpu``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

from offload_runtime.errors import OffloadError
from offload_runtime.loaders.reader import locate_error
from offload_runtime.native import get_codec
from offload_runtime.scheduler.planner import DEVICE_STAGING_BUFFERS, Plan, Tier
from offload_runtime.scheduler.slots import Slot
from offload_runtime.scheduler.stats import OffloadStats


def _codec_decode_cpu(entry: Any, payload: Any, out: torch.Tensor, verify_decoded: bool = False) -> None:
    get_codec(entry.codec).decode_cpu(
        payload, entry.chunks, entry.params, entry.layout, out, verify_decoded=verify_decoded
    )


class CpuLoader:
    """Loads on the CPU. Host-tier payloads are copied into RAM once; disk-tier ones are read on each use.

    Disk reads go through the source's guarded ``decode_cpu`` (``preadv``, never the mmap: a container
    truncated under a running model is a typed error, not SIGBUS) into one staging buffer allocated here,
    as large as the largest disk-tier payload, so a load allocates nothing: transient group-sized buffers
    per load would be kept by glibc's heap (its mmap threshold adapts upward) and RSS would grow.
    """

    device = torch.device("cpu")

    def __init__(self, source: Any, plan: Plan, stats: OffloadStats) -> None:
        self.source = source
        self.stats = stats
        self.entries = {g.name: g for g in source.groups}
        self.host: dict[str, torch.Tensor] = {}
        for p in plan.groups:
            if p.tier in (Tier.HOST, Tier.DEVICE_COMPRESSED):
                entry = self.entries[p.name]
                buf = torch.empty(entry.stored_size, dtype=torch.uint8)
                source.read_into(p.name, buf)
                self.host[p.name] = buf
        disk = [self.entries[p.name].stored_size for p in plan.groups if p.tier == Tier.DISK]
        self.staging = torch.empty(max(disk, default=0), dtype=torch.uint8)
        self._staging_lock = threading.Lock()  # the worker decodes; decode_into may run on the caller
        # host-tier payloads were CRC-checked when copied; their decoded CRCs follow the source's policy
        self.verify = getattr(source, "verify", "once")
        self._verified: set[str] = set()

    def decode_into(self, name: str, out: torch.Tensor) -> None:
        """Decode group ``name`` into ``out`` (uint8, at least its decoded size), synchronously."""
        entry = self.entries[name]
        out = out[: entry.decoded_size]
        host = self.host.get(name)
        if host is not None:
            check = self.verify == "always" or (self.verify == "once" and name not in self._verified)
            try:
                _codec_decode_cpu(entry, memoryview(host.numpy()), out, verify_decoded=check)
            except OffloadError as exc:  # the codec knows the chunk: add the file and group
                raise locate_error(exc, getattr(self.source, "path", None), name) from exc
            if check:
                self._verified.add(name)
        elif entry.stored_size <= self.staging.numel():
            with self._staging_lock:
                self.source.decode_cpu(name, out, staging=self.staging)
            self.stats.disk_bytes += entry.stored_size
        else:  # a resident group larger than every streamed payload, decoded once at dispatch
            self.source.decode_cpu(name, out)
            self.stats.disk_bytes += entry.stored_size

    def load(self, name: str, slot: Slot, wait_release: bool) -> None:
        start = time.perf_counter()
        self.decode_into(name, slot.buffer)
        self.stats.decode_seconds += time.perf_counter() - start
        self.stats.decode_bytes += self.entries[name].decoded_size

    def new_slot_events(self) -> tuple[None, None]:
        return None, None

    def record_release(self, slot: Slot) -> None:
        """The compute thread is done with the slot; nothing to record on the CPU."""

    def wait_ready(self, slot: Slot) -> None:
        """The load finished on the worker thread before the handshake; nothing to wait for."""

    def close(self) -> None:
        self.host.clear()
        self.staging = torch.empty(0, dtype=torch.uint8)


class CudaLoader:
    """Loads on a CUDA device through a copy stream and a decode stream (see the module docstring).

    Args:
        source: the container reader.
        plan (`Plan`): placements (tiers) and staging sizes.
        device (`torch.device`): the CUDA device.
        decoders (`dict`): group name -> :class:`GpuDecoder`, for every streamed group.
        stats (`OffloadStats`): counters to update.
        arena (`DeviceArena`): where device staging and device-tier payloads are carved from.
        workspace (`DecodeWorkspace`, *optional*): the decode workspace the decoders share; allocated
            here, on the decode stream every decode runs on.
    """

    def __init__(
        self,
        source: Any,
        plan: Plan,
        device: torch.device,
        decoders: dict,
        stats: OffloadStats,
        arena: Any,
        workspace: Any = None,
    ):
        self.source, self.device, self.decoders, self.stats = source, device, decoders, stats
        self.entries = {g.name: g for g in source.groups}
        self.tiers = {p.name: p.tier for p in plan.groups}
        self.copy_stream = torch.cuda.Stream(device)
        self.decode_stream = torch.cuda.Stream(device)
        self.workspace = workspace
        if workspace is not None:
            workspace.allocate(self.decode_stream)  # now, not in the first forward
        streamed = [self.entries[p.name] for p in plan.streamed]
        disk = [e for e in streamed if self.tiers[e.name] == Tier.DISK]
        self.device_payload: dict[str, torch.Tensor] = {}
        self.host_payload: dict[str, torch.Tensor] = {}
        # device-tier payloads pass through one reused pinned bounce buffer: pinning costs ~0.5 s per GB,
        # so a fresh pinned buffer per group would make dispatching a large model slow
        to_device = [e.stored_size for e in streamed if self.tiers[e.name] == Tier.DEVICE_COMPRESSED]
        bounce = torch.empty(max(to_device), dtype=torch.uint8, pin_memory=True) if to_device else None
        for entry in streamed:
            tier = self.tiers[entry.name]
            if tier == Tier.DISK:
                continue
            if tier == Tier.DEVICE_COMPRESSED:
                staged = bounce[: entry.stored_size]
                source.read_into(entry.name, staged)
                self.device_payload[entry.name] = arena.take(entry.stored_size).copy_(staged)  # synchronous
            else:
                pinned = torch.empty(entry.stored_size, dtype=torch.uint8, pin_memory=True)
                source.read_into(entry.name, pinned)
                self.host_payload[entry.name] = pinned
        del bounce
        # staging receives payloads that cross PCIe; device-tier payloads decode straight from VRAM
        over_pcie = [e for e in streamed if self.tiers[e.name] != Tier.DEVICE_COMPRESSED]
        nstage = min(DEVICE_STAGING_BUFFERS, plan.nslots) if over_pcie else 0
        stage_size = max((e.stored_size for e in over_pcie), default=0)
        self.device_staging = [arena.take(stage_size) for _ in range(nstage)]
        self.staging_free = [torch.cuda.Event() for _ in range(nstage)]
        self.copy_done = [torch.cuda.Event() for _ in range(nstage)]
        ring_size = max((e.stored_size for e in disk), default=0)
        nring = 2 if disk else 0
        self.host_ring = [torch.empty(ring_size, dtype=torch.uint8, pin_memory=True) for _ in range(nring)]
        self.ring_free = [torch.cuda.Event() for _ in range(nring)]
        self._ring_next = 0
        self._last_decode: torch.cuda.Event | None = None
        self._timing: list[tuple[str, torch.cuda.Event, torch.cuda.Event, int]] = []

    def new_slot_events(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        return torch.cuda.Event(), torch.cuda.Event()

    def _harvest_timing(self, finished: list[tuple[str, torch.cuda.Event, torch.cuda.Event, int]]) -> None:
        """Add up the timing of the previous load, known complete once the decode gate returned."""
        for kind, start, end, nbytes in finished:
            seconds = start.elapsed_time(end) / 1e3
            if kind == "h2d":
                self.stats.h2d_seconds += seconds
                self.stats.h2d_bytes += nbytes
            else:
                self.stats.decode_seconds += seconds
                self.stats.decode_bytes += nbytes

    def _stage(self, name: str, slot: Slot) -> torch.Tensor:
        """Get the payload of ``name`` onto the device (copy stream); the decode stream waits for it.

        The staging buffer is chosen by slot so each group always decodes from the same (staging, slot)
        pair: the nvCOMP decoder caches its device pointer arrays per pair.
        """
        entry = self.entries[name]
        if name in self.device_payload:
            return self.device_payload[name]
        k = slot.index % len(self.device_staging)
        host_src = self.host_payload.get(name)
        ring = None
        if host_src is None:
            ring = self._ring_next
            self._ring_next = (ring + 1) % len(self.host_ring)
            self.ring_free[ring].synchronize()  # the previous H2D out of this pinned buffer is done
            self.source.read_into(name, self.host_ring[ring])
            self.stats.disk_bytes += entry.stored_size
            host_src = self.host_ring[ring]
        dst = self.device_staging[k][: entry.stored_size]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(
                self.staging_free[k]
            )  # the decode reading this staging buffer is done
            start.record(self.copy_stream)
            dst.copy_(host_src[: entry.stored_size], non_blocking=True)
            end.record(self.copy_stream)
            self.copy_done[k].record(self.copy_stream)
            if ring is not None:
                self.ring_free[ring].record(self.copy_stream)
        self._timing.append(("h2d", start, end, entry.stored_size))
        self.decode_stream.wait_event(self.copy_done[k])
        self._pending_stage = k
        return dst

    def load(self, name: str, slot: Slot, wait_release: bool) -> None:
        entry = self.entries[name]
        previous_timing, self._timing = self._timing, []
        self._pending_stage = None
        src = self._stage(name, slot)
        if wait_release:
            # the host handshake guarantees this event was recorded (a wait on an unrecorded event is a no-op)
            self.decode_stream.wait_event(slot.release_event)
        if self._last_decode is not None:
            self._last_decode.synchronize()  # one outstanding decode per codec; releases the GIL
            self._harvest_timing(previous_timing)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.decode_stream)
        self.decoders[name].decode(src, slot.buffer[: entry.decoded_size], self.decode_stream)
        end.record(self.decode_stream)
        slot.ready_event.record(self.decode_stream)
        if self._pending_stage is not None:
            self.staging_free[self._pending_stage].record(self.decode_stream)
        self._timing.append(("decode", start, end, entry.decoded_size))
        self._last_decode = end

    def decode_into(self, name: str, out: torch.Tensor) -> None:
        """Decode ``name`` into device tensor ``out`` at dispatch, synchronously (resident groups).

        Decodes on the CPU and copies when the codec has a CPU decoder, so no device scratch is needed;
        otherwise (nvCOMP ANS) stages the payload in a temporary device buffer.
        """
        from offload_runtime.errors import CodecUnavailableError

        entry = self.entries[name]
        out = out[: entry.decoded_size]
        try:
            host = torch.empty(entry.decoded_size, dtype=torch.uint8, pin_memory=True)
            self.source.decode_cpu(name, host)
            out.copy_(host)
        except CodecUnavailableError:
            pinned = torch.empty(entry.stored_size, dtype=torch.uint8, pin_memory=True)
            self.source.read_into(name, pinned)
            payload = pinned.to(self.device)
            decoder = get_codec(entry.codec).gpu_decoder(
                entry.chunks, entry.params, entry.layout, self.device
            )
            stream = torch.cuda.current_stream(self.device)
            decoder.decode(payload, out, stream)
            stream.synchronize()
            del payload, decoder

    def record_release(self, slot: Slot) -> None:
        slot.release_event.record(torch.cuda.current_stream(self.device))

    def wait_ready(self, slot: Slot) -> None:
        torch.cuda.current_stream(self.device).wait_event(slot.ready_event)

    def close(self) -> None:
        self.decode_stream.synchronize()
        self.copy_stream.synchronize()
        self.device_payload.clear()
        self.host_payload.clear()
        self.device_staging.clear()
        self.host_ring.clear()
        self.decoders.clear()  # with them the shared workspace goes (decode_into builds its own decoder)
        self.workspace = None
