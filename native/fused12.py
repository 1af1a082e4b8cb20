"""``fused12``: lossless codec whose payload a kernel can compute from (the format of ``fused12_format``).

Payload: one *region* per tensor of the group's layout, in layout order, each starting at a
:data:`PLANE_ALIGN`-aligned payload offset. A 2-D bf16 tensor of at most 65536 columns whose escapes are
at most ``MAX_ESCAPE_FRACTION`` of its weights is stored as planes (``sm``, ``codes``, ``top``,
``esc_ptr``, ``esc``, each at the next aligned offset); every other tensor (norms, biases, 1-D, other
dtypes, fp16) is stored *verbatim*, its bytes as in the layout. Params say, per tensor, its kind, its
escape count and the payload offset of each plane, so a runtime can view the planes of a payload it keeps
in VRAM without copying (:func:`tensor_views`). Offsets must be exactly where the packer puts them
(:func:`expected_entries`), which makes validation complete: an offset is either that one or wrong.

Chunks: one per tensor with bytes, its compressed range the tensor's region, its decoded range the
tensor's bytes in the layout plus the zero padding before the next tensor. Decoding is exact, so the
chunks decode to the layout (no stored layout) and their decoded CRC-32s are of the layout's bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from offload_runtime.errors import CorruptCheckpointError
from offload_runtime.native import fused12_format as fmt
from offload_runtime.native.base import (
    Chunk,
    EncodedGroup,
    EncodedTensor,
    GpuDecoder,
    GroupCodec,
    check_cpu_output,
    register,
)
from offload_runtime.native.chunking import check_decoded_crcs, crc32_spans
from offload_runtime.native.layout import GroupLayout, TensorSpec, align_up
from offload_runtime.native.workspace import Allocate

PLANE_ALIGN = 128  # payload alignment of every region and plane: 16-byte vector loads, whole cache lines
PLANES = "planes"
VERBATIM = "verbatim"


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives in a ``fused12`` payload.

    Attributes:
        spec: the tensor in the group's layout.
        kind: ``"planes"`` or ``"verbatim"``.
        escapes: escape count (planes only; 0 for verbatim).
        offsets: payload offset per plane name (planes) or of ``"data"`` (verbatim).
        start, end: the tensor's region in the payload.
        chunk: index of the tensor's chunk (``None`` for a tensor of no bytes).
    """

    spec: TensorSpec
    kind: str
    escapes: int
    offsets: dict[str, int]
    start: int
    end: int
    chunk: int | None

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.spec.name, "kind": self.kind}
        if self.kind == PLANES:
            row["escapes"] = self.escapes
        row["offsets"] = dict(self.offsets)
        return row


def can_store_planes(spec: TensorSpec) -> bool:
    """True for the tensors the format can hold: 2-D bf16, non-empty, at most 65536 columns."""
    return (
        spec.dtype == "bfloat16" and len(spec.shape) == 2 and spec.numel > 0 and spec.shape[1] <= fmt.MAX_COLS
    )


def expected_entries(layout: GroupLayout, kinds: Sequence[tuple[str, int]]) -> list[Entry]:
    """The canonical placement of each tensor's region given its ``(kind, escapes)``."""
    entries, position, chunk = [], 0, 0
    for spec, (kind, escapes) in zip(layout.tensors, kinds, strict=True):
        start = align_up(position, PLANE_ALIGN)
        if kind == PLANES:
            offsets, cursor = {}, start
            for name, nbytes in fmt.plane_nbytes(spec.shape[0], spec.shape[1], escapes).items():
                cursor = align_up(cursor, PLANE_ALIGN)
                offsets[name] = cursor
                cursor += nbytes
            end = cursor
        else:
            offsets, end = {"data": start}, start + spec.nbytes
        entries.append(Entry(spec, kind, escapes, offsets, start, end, chunk if spec.nbytes else None))
        chunk += 1 if spec.nbytes else 0
        position = end
    return entries


def _encode_payload(layout: GroupLayout, data: torch.Tensor) -> tuple[torch.Tensor, list[Entry]]:
    """The payload (uint8, on ``data``'s device) of the group bytes ``data``, and its entries."""
    source = layout.views(data) if layout.size else {}
    encoded: list[fmt.Planes | None] = []
    for spec in layout.tensors:
        planes = fmt.encode(source[spec.name]) if can_store_planes(spec) else None
        if planes is not None and fmt.escape_fraction(planes) > fmt.MAX_ESCAPE_FRACTION:
            planes = None  # too many escapes to gain: stored as is
        encoded.append(planes)
    kinds = [(PLANES, p.escapes) if p is not None else (VERBATIM, 0) for p in encoded]
    entries = expected_entries(layout, kinds)
    payload = torch.zeros(entries[-1].end if entries else 0, dtype=torch.uint8, device=data.device)
    for entry, planes in zip(entries, encoded, strict=True):
        if planes is None:
            begin = entry.spec.offset
            payload[entry.start : entry.end] = data[begin : begin + entry.spec.nbytes]
            continue
        for name, tensor in planes.planes().items():
            raw = tensor.contiguous().view(-1).view(torch.uint8)
            payload[entry.offsets[name] : entry.offsets[name] + raw.numel()] = raw
    return payload, entries


def _chunked(entries: Sequence[Entry]) -> list[Entry]:
    """The entries that have a chunk (tensors with bytes), in order."""
    return [e for e in entries if e.chunk is not None]


def _range_crcs(data: np.ndarray, ranges: Sequence[tuple[int, int]]) -> list[int]:
    """CRC-32 of each ``[begin, end)`` of ``data``, long ones on several threads."""
    return crc32_spans(data, [(begin, end - begin) for begin, end in ranges])


def _chunk_ranges(layout: GroupLayout, entries: Sequence[Entry]) -> list[tuple[int, int]]:
    """The layout bytes each chunk decodes to, in chunk order."""
    return [r for e, r in zip(entries, decoded_ranges(layout), strict=True) if e.chunk is not None]


def _chunks(
    layout: GroupLayout, entries: Sequence[Entry], payload_crcs: Sequence[int], decoded_crcs: Sequence[int]
) -> list[Chunk]:
    chunked, ranges = _chunked(entries), _chunk_ranges(layout, entries)
    return [
        Chunk(e.start, e.end - e.start, end - begin, crc, dcrc)
        for e, (begin, end), crc, dcrc in zip(chunked, ranges, payload_crcs, decoded_crcs, strict=True)
    ]


def _params(entries: Sequence[Entry]) -> dict[str, Any]:
    return {"plane_align": PLANE_ALIGN, "tensors": [e.to_json() for e in entries]}


def encode_held(
    layout: GroupLayout, held: list[torch.Tensor], checksums: bool, take: Callable[[int], torch.Tensor]
) -> EncodedTensor:
    """:meth:`Fused12Codec.encode_tensor` on the buffer's own device (any device; the codec uses it for
    CUDA buffers): the payload is built there and copied once into ``take(nbytes)``, a host buffer the
    CRCs are computed from and :attr:`EncodedTensor.write` copies out of."""
    data = held.pop()
    payload, entries = _encode_payload(layout, data)
    ranges = _chunk_ranges(layout, entries)
    decoded_crcs = [0] * len(ranges)
    if checksums:  # the decoded bytes' CRCs, for the chunk table
        host = take(data.numel())[: data.numel()]
        host.copy_(data)
        decoded_crcs = _range_crcs(host.numpy(), ranges)
    del data
    size = int(payload.numel())
    host = take(size)[:size]
    host.copy_(payload)  # synchronous: ``host`` may be reused by the caller's next group
    del payload
    region = host.numpy()
    chunked = _chunked(entries)
    payload_crcs = (
        _range_crcs(region, [(e.start, e.end) for e in chunked]) if checksums else [0] * len(chunked)
    )

    def write(dest: torch.Tensor) -> None:
        dest.copy_(host)

    chunks = _chunks(layout, entries, payload_crcs, decoded_crcs)
    return EncodedTensor(chunks, _params(entries), None, size, write)


def decoded_ranges(layout: GroupLayout) -> list[tuple[int, int]]:
    """Per tensor, the layout bytes its chunk decodes to: its bytes and the padding up to the next tensor."""
    ends = [t.offset for t in layout.tensors[1:]] + [layout.size]
    return [(t.offset, end) for t, end in zip(layout.tensors, ends, strict=True)]


def parse_params(params: Any, layout: GroupLayout, chunks: Sequence[Chunk]) -> list[Entry]:
    """Validate untrusted ``params`` (and the chunk table) of a ``fused12`` group; its entries.

    Raises:
        CorruptCheckpointError: naming the chunk (when the tensor has one) and what is wrong; the caller
            adds the file and group.
    """
    rows = params.get("tensors") if isinstance(params, Mapping) else None
    if not isinstance(rows, list) or len(rows) != len(layout.tensors):
        raise CorruptCheckpointError(
            "fused12 params do not list one entry per layout tensor",
            expected=f"{len(layout.tensors)} entries",
            actual=f"{len(rows)} entries" if isinstance(rows, list) else type(rows).__name__,
        )
    if params.get("plane_align") != PLANE_ALIGN:
        raise CorruptCheckpointError(
            "fused12 plane alignment is not this version's",
            expected=PLANE_ALIGN,
            actual=params.get("plane_align"),
        )
    kinds = []
    for position, (row, spec) in enumerate(zip(rows, layout.tensors, strict=True)):
        kinds.append(_kind(row, spec, position, layout))
    entries = expected_entries(layout, kinds)
    if len(chunks) != sum(e.chunk is not None for e in entries):
        raise CorruptCheckpointError(
            "fused12 chunk table does not have one chunk per tensor with bytes",
            expected=sum(e.chunk is not None for e in entries),
            actual=len(chunks),
        )
    for row, entry, (begin, end) in zip(rows, entries, decoded_ranges(layout), strict=True):
        if row["offsets"] != entry.offsets:
            raise CorruptCheckpointError(
                f"fused12 planes of {entry.spec.name!r} are not where the packer puts them",
                chunk=entry.chunk,
                expected=entry.offsets,
                actual=row["offsets"],
            )
        if entry.chunk is None:
            continue
        chunk = chunks[entry.chunk]
        if (chunk.offset, chunk.size, chunk.decoded_size) != (
            entry.start,
            entry.end - entry.start,
            end - begin,
        ):
            raise CorruptCheckpointError(
                f"fused12 chunk does not cover the region of {entry.spec.name!r}",
                chunk=entry.chunk,
                expected=f"offset {entry.start}, size {entry.end - entry.start}, decoded {end - begin}",
                actual=f"offset {chunk.offset}, size {chunk.size}, decoded {chunk.decoded_size}",
            )
    return entries


def _kind(row: Any, spec: TensorSpec, position: int, layout: GroupLayout) -> tuple[str, int]:
    def bad(what: str, **fields: Any) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"fused12 params entry {position} ({spec.name!r}): {what}", **fields)

    if not isinstance(row, Mapping) or row.get("name") != spec.name:
        actual = row.get("name") if isinstance(row, Mapping) else type(row).__name__
        raise bad("does not name the layout's tensor", expected=spec.name, actual=actual)
    kind, offsets = row.get("kind"), row.get("offsets")
    if kind not in (PLANES, VERBATIM):
        raise bad("unknown kind", expected=f"{PLANES!r} or {VERBATIM!r}", actual=kind)
    if not isinstance(offsets, Mapping) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in offsets.values()
    ):
        raise bad("offsets are not a name -> integer mapping", actual=offsets)
    if kind == VERBATIM:
        return VERBATIM, 0
    escapes = row.get("escapes")
    if not can_store_planes(spec):
        raise bad(
            "only 2-D bf16 tensors of <= 65536 columns can be planes", actual=f"{spec.dtype} {spec.shape}"
        )
    if isinstance(escapes, bool) or not isinstance(escapes, int) or not 0 <= escapes <= spec.numel:
        raise bad(
            "escape count is not an integer in [0, rows x cols]", expected=f"<= {spec.numel}", actual=escapes
        )
    return PLANES, escapes


@register
class Fused12Codec(GroupCodec):
    """Lossless 12-bit planes for 2-D bf16 weights (kernels compute from them), other tensors verbatim."""

    name = "fused12"
    lossless = True
    executes_compressed = True
    encodes_on_device = True  # plain torch: encode_tensor builds the payload on a CUDA buffer's device

    def compute_views(
        self, payload: torch.Tensor, params: Mapping[str, Any], layout: GroupLayout, chunks: Sequence[Chunk]
    ) -> dict[str, fmt.Planes | torch.Tensor]:
        return tensor_views(payload, params, layout, chunks)

    def compute_tensors(
        self, params: Mapping[str, Any], layout: GroupLayout, chunks: Sequence[Chunk]
    ) -> set[str]:
        return {e.spec.name for e in parse_params(params, layout, chunks) if e.kind == PLANES}

    def compute_scratch_bytes(
        self, params: Mapping[str, Any], layout: GroupLayout, chunks: Sequence[Chunk]
    ) -> int:
        # fused_linear's buffers: the "decode" path's (inputs of more than 64 rows: the largest weight,
        # decoded to bf16) and the split-K workspace (bounded per weight by split_workspace_bound)
        from offload_runtime.native.fused12_linear import split_workspace_bound

        planes = [e.spec for e in parse_params(params, layout, chunks) if e.kind == PLANES]
        if not planes:
            return 0
        return max(t.nbytes for t in planes) + max(split_workspace_bound(t.shape[0]) for t in planes)

    def encode(self, layout: GroupLayout, data: np.ndarray) -> EncodedGroup:
        data = np.ascontiguousarray(data, dtype=np.uint8)
        payload, entries = _encode_payload(layout, torch.from_numpy(data))
        region = payload.numpy()
        decoded_crcs = _range_crcs(data, _chunk_ranges(layout, entries))
        payload_crcs = _range_crcs(region, [(e.start, e.end) for e in _chunked(entries)])
        chunks = _chunks(layout, entries, payload_crcs, decoded_crcs)
        return EncodedGroup(region, chunks, _params(entries))

    def encode_tensor(
        self,
        layout: GroupLayout,
        held: list[torch.Tensor],
        checksums: bool = True,
        host_buffer: Callable[[int], torch.Tensor] | None = None,
    ) -> EncodedTensor:
        """Encode on the buffer's device when it is a CUDA tensor (the format is plain torch): only the
        payload (and, for the decoded CRCs, the decoded bytes) come back to the host, through
        ``host_buffer(nbytes)`` (reusable, ideally pinned; allocated when ``None``)."""
        if not held[0].is_cuda:
            return super().encode_tensor(layout, held, checksums)
        take = host_buffer or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        return encode_held(layout, held, checksums, take)

    def check_params(
        self, params: Mapping[str, Any], layout: GroupLayout, chunks: Sequence[Chunk], stored_size: int
    ) -> None:
        entries = parse_params(params, layout, chunks)
        end = max((e.end for e in entries), default=0)
        if end > stored_size:
            raise CorruptCheckpointError(
                "fused12 regions run past the payload", expected=f"<= {stored_size}", actual=end
            )

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
        check_cpu_output(out, layout.size)
        entries = parse_params(params, layout, chunks)
        src = np.frombuffer(payload, dtype=np.uint8)
        end = max((e.end for e in entries), default=0)
        if src.size < end:
            raise CorruptCheckpointError(
                "fused12 payload is shorter than its regions", expected=end, actual=src.size
            )
        dst = out[: layout.size].numpy()
        for entry, (begin, stop) in zip(entries, decoded_ranges(layout), strict=True):
            nbytes = entry.spec.nbytes
            if entry.kind == VERBATIM:
                dst[begin : begin + nbytes] = src[entry.start : entry.start + nbytes]
            else:
                planes = _planes(torch.from_numpy(src[entry.start : entry.end].copy()), entry, entry.start)
                try:
                    weight = fmt.checked_decode(planes)
                except CorruptCheckpointError as exc:
                    raise CorruptCheckpointError(
                        f"{exc.summary} (tensor {entry.spec.name!r})",
                        chunk=entry.chunk,
                        expected=exc.expected,
                        actual=exc.actual,
                        hint="the container is damaged; re-pack it",
                    ) from None
                dst[begin : begin + nbytes] = weight.view(-1).view(torch.uint8).numpy()
            dst[begin + nbytes : stop] = 0
        if verify_decoded:
            check_decoded_crcs(dst, chunks)

    def gpu_decoder(
        self,
        chunks: Sequence[Chunk],
        params: Mapping[str, Any],
        layout: GroupLayout,
        device: torch.device,
        allocate: Allocate | None = None,
    ) -> GpuDecoder:
        """The Triton decoder; it holds no device memory of its own (``allocate`` is never called, as
        ``gpu_decoder_sizes`` reports: no pieces, no workspace)."""
        from offload_runtime.native.fused12_gpu import Fused12GpuDecoder, require_triton

        require_triton()
        return Fused12GpuDecoder(parse_params(params, layout, chunks), chunks, layout, torch.device(device))


def _planes(region: torch.Tensor, entry: Entry, base: int) -> fmt.Planes:
    """Views of ``entry``'s planes in ``region`` (uint8, starting at payload offset ``base``)."""
    rows, cols = entry.spec.shape
    shapes = fmt.plane_shapes(rows, cols, entry.escapes)
    nbytes = fmt.plane_nbytes(rows, cols, entry.escapes)
    views = {}
    for name, shape in shapes.items():
        begin = entry.offsets[name] - base
        views[name] = region[begin : begin + nbytes[name]].view(fmt.PLANE_DTYPES[name]).view(shape)
    return fmt.Planes(rows=rows, cols=cols, **views)


def tensor_views(
    payload: torch.Tensor, params: Mapping[str, Any], layout: GroupLayout, chunks: Sequence[Chunk]
) -> dict[str, fmt.Planes | torch.Tensor]:
    """Zero-copy views of every tensor of a ``fused12`` payload (CPU or device-resident).

    Args:
        payload (`torch.Tensor`): the group's payload, 1-D uint8, at a 16-byte aligned address.
        params, layout, chunks: the group's index entry (validated here).

    Returns:
        `dict`: name -> :class:`~offload_runtime.native.fused12_format.Planes` (views of the planes) for
        tensors stored as planes, or the tensor itself (a typed view) for verbatim ones.
    """
    return entry_views(payload, parse_params(params, layout, chunks))


def entry_views(payload: torch.Tensor, entries: Sequence[Entry]) -> dict[str, fmt.Planes | torch.Tensor]:
    """:func:`tensor_views` for already parsed entries."""
    if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.data_ptr() % 16:
        raise ValueError("need a 1-D uint8 payload at a 16-byte aligned address")
    end = max((e.end for e in entries), default=0)
    if end > payload.numel():
        raise ValueError(f"payload of {payload.numel()} bytes is shorter than its regions ({end})")
    views: dict[str, fmt.Planes | torch.Tensor] = {}
    for entry in entries:
        spec = entry.spec
        if entry.kind == PLANES:
            views[spec.name] = _planes(payload, entry, 0)
        elif spec.nbytes:
            views[spec.name] = (
                payload[entry.start : entry.start + spec.nbytes].view(spec.torch_dtype).view(spec.shape)
            )
        else:
            views[spec.name] = torch.empty(spec.shape, dtype=spec.torch_dtype, device=payload.device)
    return views
