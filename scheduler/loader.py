"""The data path of one load: container/host copy -> (staging -> H2D) -> decode -> slot.

Two implementations of the same three calls, so the engine's state machine is identical on both:

* :class:`CpuLoader`: decodes with ``codec.decode_cpu`` on the worker thread, synchronously; events are
  not needed (the host handshake of the engine is the whole synchronisation).
* :class:`CudaLoader`: disk reads land in a pinned host ring, the copy stream moves payloads into device
  staging, the decode stream waits for the copy and for the slot's release event, then runs the group's
  :class:`GpuDecoder` and records the slot's ready event. Nothing on the host waits for the GPU: decodes
  go through nvCOMP's batched C API by ctypes, which only enqueues (nvCOMP's Python API blocked ~2.7 ms
  per call, holding the GIL, when the GPU was busy). Payloads of host-tier groups are copied ahead into
  free staging buffers in execution order, independently of their slots (:mod:`.staging`). GPU timings
  are collected with events and added to the stats once the GPU has passed them (no synchronisation).

Source objects are :class:`~offload_runtime.loaders.ContainerReader` or anything with the same
``groups``, ``payload``, ``read_into`` and ``decode_cpu``.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import torch

from offload_runtime.errors import OffloadError
from offload_runtime.loaders.reader import locate_error
from offload_runtime.native import get_codec
from offload_runtime.scheduler.order import ExecutionOrder
from offload_runtime.scheduler.planner import DEVICE_STAGING_BUFFERS, Plan, Tier
from offload_runtime.scheduler.slots import Slot
from offload_runtime.scheduler.staging import StagingRing
from offload_runtime.scheduler.stats import OffloadStats


def _check_now(verify: str, verified: set[str], name: str) -> bool:
    """Whether this decode of group ``name`` checks its decoded bytes under the ``verify`` policy: every
    time (``"always"``), the first time (``"once"``, until ``name`` is in ``verified``) or never."""
    return verify == "always" or (verify == "once" and name not in verified)


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
    blocks_host = True  # decoding is CPU work: it runs on the prefetch thread, overlapping the forward

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
            check = _check_now(self.verify, self._verified, name)
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

    def follow(self, order: ExecutionOrder) -> None:
        """Nothing is loaded ahead of the slots on the CPU."""

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
        self.staged = StagingRing({e.name: j % nstage for j, e in enumerate(over_pcie)}, nstage)
        self.order: ExecutionOrder | None = None
        ring_size = max((e.stored_size for e in disk), default=0)
        nring = 2 if disk else 0
        self.host_ring = [torch.empty(ring_size, dtype=torch.uint8, pin_memory=True) for _ in range(nring)]
        self.ring_free = [torch.cuda.Event() for _ in range(nring)]
        self._ring_next = 0
        # only disk reads block the host; without them loads merely enqueue work (inline engine)
        self.blocks_host = bool(disk)
        # decoded bytes are checked on the GPU (nvCOMP statuses, sizes, CRC-32s) per the reader's policy:
        # "once" the first decode of each group, "always" every decode; the forward of the group waits for
        # the check, so a failed decode is reported there, before any kernel reads the slot
        self.verify = getattr(source, "verify", "once")
        self._verified: set[str] = set()
        self._checks: dict[int, tuple[str, Any]] = {}  # slot index -> (group, pending check of its load)
        self._timing: collections.deque[tuple[str, torch.cuda.Event, torch.cuda.Event, int]] = (
            collections.deque()
        )
        self._spare_events: list[torch.cuda.Event] = []

    def new_slot_events(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        return torch.cuda.Event(), torch.cuda.Event()

    def follow(self, order: ExecutionOrder) -> None:
        """Copy host-tier payloads ahead in ``order`` (the engine's learned execution order)."""
        self.order = order

    # ---- timing ---------------------------------------------------------------------------------------
    def _timed_start(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = self._spare_events.pop() if self._spare_events else torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def _timed_end(self, kind: str, start: torch.cuda.Event, stream: torch.cuda.Stream, nbytes: int) -> None:
        end = self._spare_events.pop() if self._spare_events else torch.cuda.Event(enable_timing=True)
        end.record(stream)
        self._timing.append((kind, start, end, nbytes))

    def harvest_timing(self, wait: bool = False) -> None:
        """Add the timings of copies and decodes the GPU has finished (all of them with ``wait``)."""
        while self._timing:
            kind, start, end, nbytes = self._timing[0]
            if wait:
                end.synchronize()
            elif not end.query():
                break
            self._timing.popleft()
            seconds = start.elapsed_time(end) / 1e3
            if kind == "h2d":
                self.stats.h2d_seconds += seconds
                self.stats.h2d_bytes += nbytes
            else:
                self.stats.decode_seconds += seconds
                self.stats.decode_bytes += nbytes
            self._spare_events += (start, end)

    # ---- staging --------------------------------------------------------------------------------------
    def _copy_ahead_candidates(self, name: str) -> list[str]:
        """The next host-tier groups after ``name`` in execution order, as many as staging buffers."""
        if self.order is None or not self.host_payload or not self.staged.holder:
            return []
        return self.order.following(name, len(self.staged.holder), self.host_payload.__contains__)

    def _copy(self, name: str, k: int, host_src: torch.Tensor, ring: int | None = None) -> None:
        """Enqueue the H2D copy of ``name``'s payload into staging buffer ``k`` on the copy stream."""
        nbytes = self.entries[name].stored_size
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.staging_free[k])  # the decode that read buffer k is done
            start = self._timed_start(self.copy_stream)
            self.device_staging[k][:nbytes].copy_(host_src[:nbytes], non_blocking=True)
            self._timed_end("h2d", start, self.copy_stream, nbytes)
            self.copy_done[k].record(self.copy_stream)
            if ring is not None:
                self.ring_free[ring].record(self.copy_stream)

    def _stage(self, name: str) -> tuple[torch.Tensor, int | None]:
        """The payload of ``name`` on the device, and the staging buffer it is in (``None``: kept in VRAM);
        the decode stream is ordered after its copy."""
        if name in self.device_payload:
            return self.device_payload[name], None
        entry = self.entries[name]
        k, copy_now = self.staged.for_load(name)
        if copy_now:
            host_src = self.host_payload.get(name)
            ring = None
            if host_src is None:
                ring = self._ring_next
                self._ring_next = (ring + 1) % len(self.host_ring)
                self.ring_free[ring].synchronize()  # the previous H2D out of this pinned buffer is done
                self.source.read_into(name, self.host_ring[ring])
                self.stats.disk_bytes += entry.stored_size
                host_src = self.host_ring[ring]
            self._copy(name, k, host_src, ring)
        self.decode_stream.wait_event(self.copy_done[k])
        return self.device_staging[k][: entry.stored_size], k

    def load(self, name: str, slot: Slot, wait_release: bool) -> None:
        entry = self.entries[name]
        self.harvest_timing()
        src, k = self._stage(name)
        if wait_release:
            # the host handshake guarantees this event was recorded (a wait on an unrecorded event is a no-op)
            self.decode_stream.wait_event(slot.release_event)
        check = _check_now(self.verify, self._verified, name)
        start = self._timed_start(self.decode_stream)
        report = self.decoders[name].decode(src, slot.buffer[: entry.decoded_size], self.decode_stream, check)
        self._timed_end("decode", start, self.decode_stream, entry.decoded_size)
        if report is not None:
            self._checks[slot.index] = (name, report)
        else:
            self._checks.pop(slot.index, None)
        slot.ready_event.record(self.decode_stream)
        if k is not None:
            self.staging_free[k].record(self.decode_stream)
            self.staged.consume(k)
        for group, buffer in self.staged.copies_ahead(self._copy_ahead_candidates(name)):
            self._copy(group, buffer, self.host_payload[group])

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
                raise locate_error(exc, getattr(self.source, "path", None), name) from exc
            self._verified.add(name)
        torch.cuda.current_stream(self.device).wait_event(slot.ready_event)

    def close(self) -> None:
        self.decode_stream.synchronize()
        self.copy_stream.synchronize()
        self.harvest_timing(wait=True)
        self.device_payload.clear()
        self.host_payload.clear()
        self.device_staging.clear()
        self.host_ring.clear()
        self.decoders.clear()  # with them the shared workspace goes (decode_into builds its own decoder)
        self.workspace = None
