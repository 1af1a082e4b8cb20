"""Reassembled groups: stored groups read and decoded as one group, each part's tensors copied into place.

Two things make the groups a runtime streams differ from the groups a container stores:

* **experts** (format version 2): a mixture of experts stores each routed expert as its own group. The
  block runtime (``dispatch_compressed``, ``load_compressed``) streams whole blocks, so until an expert
  runtime streams experts on their own, a reader presents each block together with the expert groups of
  the experts modules inside it as **one** group (*block granularity*): its layout is the block's tensors
  followed by every stacked parameter made whole (``gate_up_proj [E, 2I, H]``, ...), exactly what the
  model's own parameters look like, so binding, planning and hooks work unchanged;
* **tensor-parallel slices** (format version 3, ``tp_slices.py``): a group may keep some tensors in slice
  groups (``<group>#tp<s>``); a rank of a tensor-parallel run reads only its slices and sees its *local*
  tensors, a run without tensor parallelism reads every slice and sees them whole.

Both are described the same way: a :class:`LogicalGroup` says which bytes of which stored groups fill
which tensor, and where (a :class:`Place`: rows of bytes, so a slice cut along any dimension is one strided
copy). :func:`reassemble` turns one into a *reassembled* group:

* its payload is the *parts'* payloads (the stored groups', in stored order) back to back, each starting on
  a :data:`PAYLOAD_ALIGN` boundary; ``read_into`` reads each part with the reader's own checked read;
* its codec is :data:`REASSEMBLED_CODEC`, an in-memory codec (never stored: the validator refuses it in a
  file) whose params hold the parts: each part is decoded by its own codec into a scratch buffer (on the
  GPU: a shared-workspace buffer of the largest such part, in stream order) and its places copied. A part
  whose bytes land unchanged in one region that no other part writes (a rank's own slice when it reads
  one slice per tensor: the layout is built so) is **direct**: decoded straight into that region, no
  scratch, no copy. The decoded CRC-32s of every part are checked under the same policy as any group's.

The cost is one copy of the decoded bytes of each non-direct part per load (on the GPU a device-to-device
copy, far below the PCIe transfer it follows) and one part-sized scratch buffer (on the CPU one per
thread, allocated once and kept). A logical group that is one stored group, unchanged, is presented as that
stored group: dense containers are unaffected.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from offload_runtime.errors import OffloadError
from offload_runtime.loaders.format import PAYLOAD_ALIGN, GroupEntry
from offload_runtime.native.base import Chunk, DecoderSizes, EncodedGroup, GpuDecoder, GroupCodec, register
from offload_runtime.native.layout import TENSOR_ALIGN, GroupLayout, align_up
from offload_runtime.native.workspace import Allocate

REASSEMBLED_CODEC = "reassembled"
PART_KIND = "reassembled-part"  # decode-workspace kind of the scratch a part decodes into


class Place(NamedTuple):
    """``rows`` runs of ``row_bytes`` bytes: run ``i`` from ``src + i * src_stride`` of a part's decoded
    bytes to ``dst + i * dst_stride`` of the destination (``rows == 1``: one flat copy)."""

    src: int
    dst: int
    rows: int
    row_bytes: int
    src_stride: int
    dst_stride: int

    @classmethod
    def flat(cls, src: int, dst: int, nbytes: int) -> Place:
        return cls(src, dst, 1, nbytes, nbytes, nbytes)

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy these bytes of ``src`` into ``dst`` (1-D uint8 tensors, on any one device)."""
        if self.rows == 1:
            dst[self.dst : self.dst + self.row_bytes].copy_(src[self.src : self.src + self.row_bytes])
        else:  # as_strided keeps each view's own storage offset
            target = dst[self.dst :].as_strided((self.rows, self.row_bytes), (self.dst_stride, 1))
            target.copy_(src[self.src :].as_strided((self.rows, self.row_bytes), (self.src_stride, 1)))

    @property
    def end(self) -> int:
        """One past the last destination byte written."""
        return self.dst + (self.rows - 1) * self.dst_stride + self.row_bytes if self.rows else self.dst

    def moved(self, src: int, dst: int) -> Place:
        """This copy with its source and destination shifted by ``src`` and ``dst`` bytes."""
        return self._replace(src=self.src + src, dst=self.dst + dst)

    def compact(self) -> Place:
        """The same bytes as one flat copy when both sides are contiguous."""
        if self.rows > 1 and self.src_stride == self.dst_stride == self.row_bytes:
            return Place.flat(self.src, self.dst, self.rows * self.row_bytes)
        return self


@dataclass(frozen=True)
class Fill:
    """Bytes of a stored group's decoded buffer copied into tensor ``tensor`` of a logical group; the
    place's ``dst`` is relative to the tensor's first byte."""

    tensor: str
    place: Place


@dataclass
class LogicalGroup:
    """A group as a runtime sees it, described by the stored groups that fill it (see the docstring).

    Attributes:
        entry: the stored group that names it (name, kind, users, aliases, expert record).
        tensors: ``(name, dtype, shape)`` of its tensors, in layout order.
        fills: for each stored group read, in stored order, what of it goes where.
    """

    entry: GroupEntry
    tensors: list[tuple[str, torch.dtype, tuple[int, ...]]]
    fills: list[tuple[GroupEntry, list[Fill]]] = field(default_factory=list)

    @classmethod
    def stored(cls, entry: GroupEntry) -> LogicalGroup:
        """A stored group as it is: each tensor one flat copy of its own bytes."""
        specs = entry.layout.tensors
        tensors = [(t.name, t.torch_dtype, tuple(t.shape)) for t in specs]
        return cls(
            entry, tensors, [(entry, [Fill(t.name, Place.flat(t.offset, 0, t.nbytes)) for t in specs])]
        )

    def is_stored_as_is(self) -> bool:
        """One stored group whose tensors are exactly its own layout's (no copy needed)."""
        if len(self.fills) != 1 or self.fills[0][0].name != self.entry.name:
            return False
        layout = self.entry.layout
        mine = [(t.name, t.torch_dtype, tuple(t.shape)) for t in layout.tensors]
        return mine == self.tensors and all(
            f.place == Place.flat(layout.spec(f.tensor).offset, 0, layout.spec(f.tensor).nbytes)
            for f in self.fills[0][1]
        )


@dataclass(frozen=True)
class Part:
    """One stored group inside a reassembled group.

    Attributes:
        entry: the stored group (a block, an expert, a tensor-parallel slice).
        offset: where its payload starts in the reassembled payload.
        places: its copies into the reassembled group's bytes (absolute destinations).
        direct: where it decodes in place (its whole decoded buffer at ``[direct, direct + size)``), or
            None when it decodes into scratch and its places are copied.
    """

    entry: GroupEntry
    offset: int
    places: tuple[Place, ...]
    direct: int | None = None


def view(
    groups: Sequence[GroupEntry], granularity: str = "block", shards: Any = None
) -> tuple[list[GroupEntry], dict[str, tuple[Part, ...]]]:
    """The groups a runtime reads from stored ``groups``, and the parts of each reassembled one.

    Args:
        groups: the stored groups, in stored order.
        granularity: ``"block"`` (a block and its experts are one group) or ``"expert"``.
        shards (`tp_slices.RankShards`, *optional*): this rank's tensor-parallel placements: slices are
            read for the rank's local tensors only; ``None``: tensors whole.
    """
    from offload_runtime.loaders.tp_slices import logical_groups

    logical = logical_groups(groups, shards)
    if granularity == "block":
        logical = block_groups(logical)
    out, parts = [], {}
    for group in logical:
        if group.is_stored_as_is():
            out.append(group.entry)
        else:
            entry, parts[group.entry.name] = reassemble(group)
            out.append(entry)
    return out, parts


def block_groups(groups: Sequence[LogicalGroup]) -> list[LogicalGroup]:
    """Each block owning experts merged with its expert groups (their stacked parameters whole); expert
    groups gone; every other group as it is."""
    experts: dict[str, list[LogicalGroup]] = {}
    for g in groups:
        if g.entry.expert is not None:
            experts.setdefault(g.entry.expert.module, []).append(g)
    if not experts:
        return list(groups)
    owners = [g for g in groups if g.entry.expert is None]
    owned: dict[str, list[str]] = {}
    for module in experts:  # the longest group name that prefixes the module's path (validated to exist)
        owner = max((g.entry.name for g in owners if module.startswith(g.entry.name + ".")), key=len)
        owned.setdefault(owner, []).append(module)
    out = []
    for g in owners:
        modules = owned.get(g.entry.name)
        out.append(
            _merge_experts(g, [sorted(experts[m], key=_expert_index) for m in modules]) if modules else g
        )
    return out


def _expert_index(group: LogicalGroup) -> int:
    return group.entry.expert.index


def _merge_experts(block: LogicalGroup, modules: list[list[LogicalGroup]]) -> LogicalGroup:
    tensors = list(block.tensors)
    fills = list(block.fills)
    for experts in modules:
        first = experts[0]
        shapes = {name: (dtype, shape) for name, dtype, shape in first.tensors}
        for s in first.entry.expert.slices:  # stacked: the experts' (local) slices, one after another
            dtype, shape = shapes[s.tensor]
            tensors.append((s.param, dtype, (s.shape[0], *shape)))
        for expert in experts:
            info = expert.entry.expert
            local = {name: (dtype, shape) for name, dtype, shape in expert.tensors}
            target = {}  # slice tensor -> (stacked parameter, byte offset of this expert in it)
            for s in info.slices:
                dtype, shape = local[s.tensor]
                target[s.tensor] = (s.param, info.index * math.prod(shape) * dtype.itemsize)
            for stored, pieces in expert.fills:
                moved = [Fill(target[f.tensor][0], f.place.moved(0, target[f.tensor][1])) for f in pieces]
                fills.append((stored, moved))
    return LogicalGroup(block.entry, tensors, fills)


def reassemble(group: LogicalGroup) -> tuple[GroupEntry, tuple[Part, ...]]:
    """The reassembled entry of ``group`` (codec :data:`REASSEMBLED_CODEC`) and its parts."""
    layout = GroupLayout.from_shapes(group.tensors)
    resolved = [
        (stored, tuple(f.place.moved(0, layout.spec(f.tensor).offset).compact() for f in pieces))
        for stored, pieces in group.fills
    ]
    spans = [(min(p.dst for p in places), max(p.end for p in places)) for _, places in resolved if places]
    parts, chunks, offset = [], [], 0
    for stored, places in resolved:
        offset = align_up(offset, PAYLOAD_ALIGN)
        parts.append(Part(stored, offset, places, _direct_offset(stored, places, spans)))
        chunks += [
            Chunk(c.offset + offset, c.size, c.decoded_size, c.crc32, c.decoded_crc32) for c in stored.chunks
        ]
        offset += stored.stored_size
    parts = tuple(parts)
    entry = group.entry
    merged = GroupEntry(
        name=entry.name,
        kind=entry.kind,
        users=list(entry.users),
        aliases=dict(entry.aliases),
        tensor=entry.tensor,
        codec=REASSEMBLED_CODEC,
        params={"parts": parts},  # in memory only: a reassembled group is never written
        layout=layout,
        stored_layout=None,
        stored_size=offset,
        chunks=chunks,
    )
    return merged, parts


def _direct_offset(stored: GroupEntry, places: tuple[Place, ...], spans: list[tuple[int, int]]) -> int | None:
    """Where ``stored`` decodes in place: every copy flat with one shift ``d`` (aligned), and no other
    part writing into ``[d, d + size)``; else None."""
    if not places or any(p.rows != 1 for p in places):
        return None
    shifts = {p.dst - p.src for p in places}
    if len(shifts) != 1:
        return None
    shift = shifts.pop()
    if (
        shift < 0
        or shift % TENSOR_ALIGN
        or sum(p.row_bytes for p in places) != sum(t.nbytes for t in stored.layout.tensors)
    ):
        return None
    lo, hi = shift, shift + stored.layout.size
    mine = (min(p.dst for p in places), max(p.end for p in places))
    if any(span != mine and span[0] < hi and lo < span[1] for span in spans):
        return None
    return shift


# -- reading -------------------------------------------------------------------------------------------

ReadInto = Callable[[str, torch.Tensor], torch.Tensor]
DecodeCpu = Callable[[str, torch.Tensor, torch.Tensor | None], torch.Tensor]


def read_parts_into(parts: Sequence[Part], read_into: ReadInto, out: torch.Tensor) -> torch.Tensor:
    """Read every part's payload (each checked by ``read_into``, the stored reader's) into its place."""
    end = 0
    for part in parts:
        read_into(part.entry.name, out[part.offset : part.offset + part.entry.stored_size])
        end = part.offset + part.entry.stored_size
    return out[:end]


def decode_parts_cpu(
    parts: Sequence[Part], decode_cpu: DecodeCpu, out: torch.Tensor, staging: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode every part with ``decode_cpu`` (the stored reader's, with its checks) and place its tensors;
    a direct part decodes straight into its region."""
    with _cpu_scratch(_scratch_bytes(parts)) as scratch:
        for part in parts:
            n = part.entry.stored_size
            into = scratch if part.direct is None else out[part.direct : part.direct + part.entry.layout.size]
            decoded = decode_cpu(part.entry.name, into, staging[:n] if staging is not None else None)
            if part.direct is None:
                _place(part, decoded, out)
    return out


_held = threading.local()  # this thread's CPU part scratch, while no decode uses it


@contextlib.contextmanager
def _cpu_scratch(nbytes: int) -> Iterator[torch.Tensor]:
    """``nbytes`` of this thread's CPU part scratch, allocated once at the largest size asked for and kept.

    A buffer per decode would be kept by glibc's heap (its mmap threshold adapts upward) and RSS would grow,
    as ``CpuLoader`` explains for staging. Per thread, so the prefetch worker and a caller's decode never
    share it; taken out while in use, so a nested decode would allocate its own rather than overwrite it.
    """
    buffer = getattr(_held, "scratch", None)
    _held.scratch = None
    if buffer is None or buffer.numel() < nbytes:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    try:
        yield buffer[:nbytes]
    finally:
        _held.scratch = buffer


def _scratch_bytes(parts: Sequence[Part]) -> int:
    """The scratch the parts that do not decode in place need: the largest of them (0 when none)."""
    return max((p.entry.layout.size for p in parts if p.direct is None), default=0)


def _part_needs(parts: Sequence[Part]) -> dict[str, int]:
    """The shared-workspace need of the part scratch (none when every part decodes in place)."""
    scratch = _scratch_bytes(parts)
    return {PART_KIND: scratch} if scratch else {}


def _place(part: Part, decoded: torch.Tensor, out: torch.Tensor) -> None:
    for p in part.places:
        p.copy(decoded, out)


class ReassembledSource:
    """Any group source (a :class:`~offload_runtime.loaders.synthetic_source.SyntheticSource`, ...) seen
    at block granularity, like a ``ContainerReader`` with ``granularity="block"``; other attributes are the
    wrapped source's."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.groups, self._parts = view(source.groups, "block")
        self._by_name = {g.name: g for g in self.groups}

    def __getattr__(self, name: str) -> Any:  # path, verify, trim, close, generated, ...
        return getattr(self.source, name)

    def group(self, name: str) -> GroupEntry:
        return self._by_name[name] if name in self._by_name else self.source.group(name)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        parts = self._parts.get(name)
        return (
            self.source.read_into(name, out)
            if parts is None
            else read_parts_into(parts, self.source.read_into, out)
        )

    def decode_cpu(self, name: str, out: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
        parts = self._parts.get(name)
        if parts is None:
            return self.source.decode_cpu(name, out, staging)
        return decode_parts_cpu(parts, self.source.decode_cpu, out[: self.group(name).layout.size], staging)


# -- the in-memory codec -------------------------------------------------------------------------------


@register
class ReassembledCodec(GroupCodec):
    """Decodes a reassembled group part by part (see the module docstring); never encodes."""

    name = REASSEMBLED_CODEC

    def encode(self, layout: GroupLayout, data: np.ndarray) -> EncodedGroup:
        raise ValueError("'reassembled' is a reader's view of stored groups, not a codec to pack with")

    def decode_cpu(
        self,
        payload: memoryview | np.ndarray,
        chunks: Sequence[Chunk],
        params: Mapping[str, Any],
        layout: GroupLayout,
        out: torch.Tensor,
        *,
        verify_decoded: bool = False,
    ) -> None:
        from offload_runtime.native import get_codec

        parts: tuple[Part, ...] = params["parts"]
        with _cpu_scratch(_scratch_bytes(parts)) as scratch:
            for part in parts:
                entry = part.entry
                codec = get_codec(entry.codec)
                sub = payload[part.offset : part.offset + entry.stored_size]
                into = scratch if part.direct is None else out[part.direct :]
                decoded = into[: entry.layout.size]
                try:  # each codec checks its chunks' decoded CRC-32s (int8: before the transform back)
                    codec.decode_cpu(
                        sub, entry.chunks, entry.params, entry.layout, decoded, verify_decoded=verify_decoded
                    )
                except OffloadError as exc:
                    raise _in_part(exc, entry.name) from exc
                if part.direct is None:
                    _place(part, decoded, out)

    def decodes_on_cpu(self, params: Mapping[str, Any]) -> bool:
        from offload_runtime.native import get_codec

        return all(get_codec(p.entry.codec).decodes_on_cpu(p.entry.params) for p in params["parts"])

    def gpu_decoder_sizes(
        self, chunks: Sequence[Chunk], params: Mapping[str, Any], layout: GroupLayout
    ) -> DecoderSizes:
        from offload_runtime.native import get_codec

        parts: tuple[Part, ...] = params["parts"]
        pieces: list[int] = []
        needs = _part_needs(parts)
        for p in parts:
            sizes = get_codec(p.entry.codec).gpu_decoder_sizes(p.entry.chunks, p.entry.params, p.entry.layout)
            pieces += sizes.pieces
            for kind, nbytes in sizes.workspace:
                needs[kind] = max(needs.get(kind, 0), nbytes)
        return DecoderSizes(tuple(pieces), tuple(sorted(needs.items())))

    def gpu_decoder(
        self,
        chunks: Sequence[Chunk],
        params: Mapping[str, Any],
        layout: GroupLayout,
        device: torch.device,
        allocate: Allocate | None = None,
    ) -> GpuDecoder:
        return _ReassembledGpuDecoder(params["parts"], device, allocate)


def _in_part(exc: OffloadError, group: str) -> OffloadError:
    """``exc`` naming the stored group (the part) it happened in, when it names none yet."""
    from offload_runtime.loaders.reader import locate_error

    return locate_error(exc, None, group)


class _ReassembledGpuDecoder(GpuDecoder):
    """Each part decoded by its own decoder into a workspace buffer, then its tensors copied into place
    (a direct part: decoded into its region of the output, nothing copied).

    All on the one decode stream, so the part buffer (workspace kind :data:`PART_KIND`, as large as the
    largest non-direct part) is reused in order; the parts' decoders share the same workspace for their own
    scratch.
    """

    def __init__(self, parts: Sequence[Part], device: torch.device, allocate: Allocate | None = None) -> None:
        from offload_runtime.native import get_codec
        from offload_runtime.native.workspace import DecodeWorkspace

        self.parts = tuple(parts)
        self.decoders = [
            get_codec(p.entry.codec).gpu_decoder(
                p.entry.chunks, p.entry.params, p.entry.layout, device, allocate
            )
            for p in self.parts
        ]
        self.scratch_bytes = sum(d.scratch_bytes for d in self.decoders)
        needs = _part_needs(self.parts)
        for decoder in self.decoders:
            for kind, nbytes in decoder.workspace_needs.items():
                needs[kind] = max(needs.get(kind, 0), nbytes)
        self.workspace_needs = needs
        self.use_workspace(DecodeWorkspace(device))  # private until the runtime binds a shared one

    def use_workspace(self, workspace) -> None:
        super().use_workspace(workspace)
        for decoder in self.decoders:
            decoder.use_workspace(workspace)

    def decode(self, src: torch.Tensor, out: torch.Tensor, stream: torch.cuda.Stream, check: bool = False):
        reports = []
        for part, decoder in zip(self.parts, self.decoders, strict=True):
            entry = part.entry
            payload = src[part.offset : part.offset + entry.stored_size]
            if part.direct is not None:
                report = decoder.decode(
                    payload, out[part.direct : part.direct + entry.layout.size], stream, check
                )
            else:
                buffer = self.workspace.acquire(PART_KIND, stream)
                decoded = buffer[: entry.layout.size]
                report = decoder.decode(payload, decoded, stream, check)
                with torch.cuda.stream(stream):
                    _place(part, decoded, out)
                self.workspace.release(PART_KIND, stream)
            if report is not None:
                reports.append((entry.name, report))
        return _PartReports(reports) if reports else None


class _PartReports:
    """The GPU checks of every part; ``result()`` raises the first failure, naming the part's group."""

    def __init__(self, reports: list[tuple[str, Any]]) -> None:
        self.reports = reports

    def result(self) -> None:
        for group, report in self.reports:
            try:
                report.result()
            except OffloadError as exc:
                raise _in_part(exc, group) from exc
