"""Block granularity over expert groups: a block and its experts read and decoded as one group.

A container of a mixture of experts stores each routed expert as its own group (format version 2). The
block runtime (``dispatch_compressed``, ``load_compressed``) streams whole blocks, so until an expert
runtime streams experts on their own, a reader presents each block together with the expert groups of the
experts modules inside it as **one** group, the *reassembled* group: its layout is the block's tensors
followed by every stacked parameter made whole (``gate_up_proj [E, 2I, H]``, ...), exactly what the model's
own parameters look like, so binding, planning and hooks work unchanged.

How (the simplest correct option, chosen over re-encoding at load time, which would need a CPU decoder
for every codec and a second copy of the model):

* its payload is the *parts'* payloads (the block's, then each expert's, in stored order) back to back,
  each starting on a :data:`PAYLOAD_ALIGN` boundary; ``read_into`` reads each part with the reader's own
  checked read;
* its codec is :data:`REASSEMBLED_CODEC`, an in-memory codec (never stored: the validator refuses it in a
  file) whose params hold the parts: each part is decoded by its own codec into a scratch buffer (on the
  GPU: a shared-workspace buffer of the largest part, in stream order) and its tensors copied to their
  places, a block tensor to its offset, expert ``e``'s slice of a stacked parameter to ``param[e]``. The
  decoded CRC-32s of every part are checked under the same policy as any group's.

The cost is one copy of the decoded bytes per load (on the GPU a device-to-device copy, far below the
PCIe transfer it follows) and one part-sized scratch buffer. Dense containers are unaffected: a view of
groups without experts is the stored groups themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from offload_runtime.errors import OffloadError
from offload_runtime.loaders.format import PAYLOAD_ALIGN, GroupEntry
from offload_runtime.native.base import Chunk, DecoderSizes, EncodedGroup, GpuDecoder, GroupCodec, register
from offload_runtime.native.chunking import check_decoded_crcs
from offload_runtime.native.layout import GroupLayout, align_up
from offload_runtime.native.workspace import Allocate

REASSEMBLED_CODEC = "reassembled"
PART_KIND = "reassembled-part"  # decode-workspace kind of the scratch a part decodes into


@dataclass(frozen=True)
class Part:
    """One stored group inside a reassembled group.

    Attributes:
        entry: the stored group (the block, or one expert).
        offset: where its payload starts in the reassembled payload.
        places: ``(source offset in the part's decoded bytes, destination offset in the reassembled
            group, bytes)`` for each of its tensors.
    """

    entry: GroupEntry
    offset: int
    places: tuple[tuple[int, int, int], ...]


def block_view(groups: Sequence[GroupEntry]) -> tuple[list[GroupEntry], dict[str, tuple[Part, ...]]]:
    """The block-granular view of stored ``groups``.

    Returns:
        `tuple`: the view's groups in stored order (a block owning experts replaced by its reassembled
        group, expert groups gone; every other group as stored), and the parts of each reassembled group.
    """
    experts: dict[str, list[GroupEntry]] = {}
    for g in groups:
        if g.expert is not None:
            experts.setdefault(g.expert.module, []).append(g)
    if not experts:
        return list(groups), {}
    owners = [g for g in groups if g.expert is None]
    owned: dict[str, list[str]] = {}
    for module in experts:  # the longest group name that prefixes the module's path (validated to exist)
        owner = max((g.name for g in owners if module.startswith(g.name + ".")), key=len)
        owned.setdefault(owner, []).append(module)
    view, parts = [], {}
    for g in owners:
        modules = owned.get(g.name)
        if modules:
            entry, parts[g.name] = _reassemble(g, [sorted(experts[m], key=_expert_index) for m in modules])
            view.append(entry)
        else:
            view.append(g)
    return view, parts


def _expert_index(entry: GroupEntry) -> int:
    return entry.expert.index


def _reassemble(block: GroupEntry, modules: list[list[GroupEntry]]) -> tuple[GroupEntry, tuple[Part, ...]]:
    metas = [(t.name, torch.empty(t.shape, dtype=t.torch_dtype, device="meta")) for t in block.layout.tensors]
    for experts in modules:
        first = experts[0]
        for s, t in zip(first.expert.slices, first.layout.tensors, strict=True):
            metas.append((s.param, torch.empty(s.shape, dtype=t.torch_dtype, device="meta")))
    layout = GroupLayout.from_tensors(metas)
    places = [tuple((t.offset, layout.spec(t.name).offset, t.nbytes) for t in block.layout.tensors)]
    stored = [block]
    for experts in modules:
        for entry in experts:
            places.append(
                tuple(
                    (t.offset, layout.spec(s.param).offset + s.index * t.nbytes, t.nbytes)
                    for s, t in zip(entry.expert.slices, entry.layout.tensors, strict=True)
                )
            )
            stored.append(entry)
    parts, chunks, offset = [], [], 0
    for entry, where in zip(stored, places, strict=True):
        offset = align_up(offset, PAYLOAD_ALIGN)
        parts.append(Part(entry, offset, where))
        chunks += [
            Chunk(c.offset + offset, c.size, c.decoded_size, c.crc32, c.decoded_crc32) for c in entry.chunks
        ]
        offset += entry.stored_size
    parts = tuple(parts)
    merged = GroupEntry(
        name=block.name,
        kind=block.kind,
        users=list(block.users),
        aliases=dict(block.aliases),
        tensor=block.tensor,
        codec=REASSEMBLED_CODEC,
        params={"parts": parts},  # in memory only: a reassembled group is never written
        layout=layout,
        stored_layout=None,
        stored_size=offset,
        chunks=chunks,
    )
    return merged, parts


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
    """Decode every part with ``decode_cpu`` (the stored reader's, with its checks) and place its tensors."""
    scratch = torch.empty(max(p.entry.layout.size for p in parts), dtype=torch.uint8)
    for part in parts:
        n = part.entry.stored_size
        decoded = decode_cpu(part.entry.name, scratch, staging[:n] if staging is not None else None)
        _place(part, decoded, out)
    return out


def _place(part: Part, decoded: torch.Tensor, out: torch.Tensor) -> None:
    for src, dst, nbytes in part.places:
        out[dst : dst + nbytes].copy_(decoded[src : src + nbytes])


class ReassembledSource:
    """Any group source (a :class:`~offload_runtime.loaders.synthetic_source.SyntheticSource`, ...) seen
    at block granularity, like a ``ContainerReader`` with ``granularity="block"``; other attributes are the
    wrapped source's."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.groups, self._parts = block_view(source.groups)
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
        scratch = torch.empty(max(p.entry.layout.size for p in parts), dtype=torch.uint8)
        for part in parts:
            entry = part.entry
            codec = get_codec(entry.codec)
            sub = payload[part.offset : part.offset + entry.stored_size]
            decoded = scratch[: entry.layout.size]
            try:
                if entry.stored_layout is not None:  # lossy: the codec checks what its chunks decode to
                    codec.decode_cpu(
                        sub, entry.chunks, entry.params, entry.layout, decoded, verify_decoded=verify_decoded
                    )
                else:
                    codec.decode_cpu(sub, entry.chunks, entry.params, entry.layout, decoded)
                    if verify_decoded:
                        check_decoded_crcs(decoded.numpy(), entry.chunks)
            except OffloadError as exc:
                raise _in_part(exc, entry.name) from exc
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
        needs: dict[str, int] = {PART_KIND: max(p.entry.layout.size for p in parts)}
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
    """Each part decoded by its own decoder into a workspace buffer, then its tensors copied into place.

    All on the one decode stream, so the part buffer (workspace kind :data:`PART_KIND`, as large as the
    largest part) is reused in order; the parts' decoders share the same workspace for their own scratch.
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
        needs: dict[str, int] = {PART_KIND: max(p.entry.layout.size for p in self.parts)}
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
            buffer = self.workspace.acquire(PART_KIND, stream)
            decoded = buffer[: entry.layout.size]
            payload = src[part.offset : part.offset + entry.stored_size]
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
