"""A group source whose payloads are regenerated on demand instead of stored: models larger than RAM or disk.

:class:`SyntheticSource` quacks like a :class:`~offload_runtime.loaders.ContainerReader` for the runtime
(``groups``, ``group``, ``read_into``, ``decode_cpu``, ``path``, ``verify``, ``close``) but holds no
payload bytes. A caller-given ``fill(index, buffer)`` writes group ``index``'s decoded bytes (its layout)
into a buffer on the encoding device, deterministically. Two phases:

1. construction: every group is generated, encoded, and only its chunk table, params and stored size are
   kept (a :class:`~offload_runtime.loaders.format.GroupEntry`); the bytes are dropped;
2. ``read_into`` (the runtime placing a group in its tier): the group is generated and encoded again and
   its payload copied out; every chunk's CRC-32 is compared with phase 1, so a non-deterministic encoder
   is a :class:`CorruptCheckpointError` naming the group and chunk, never wrong weights.

So a group exists only transiently, one at a time, besides the tier storage the plan gives it. On CUDA the
group is generated, packed and (``ans``, ``int8``) encoded on the GPU; only the payload and, for the chunk
CRCs, the decoded bytes (phase 1) cross PCIe, through one reusable pinned buffer.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from offload_runtime.errors import CodecUnavailableError, CorruptCheckpointError, OffloadError
from offload_runtime.loaders.format import GroupEntry, tensor_name
from offload_runtime.loaders.groups import GroupSpec
from offload_runtime.loaders.reader import locate_error
from offload_runtime.native import Chunk, GroupCodec, GroupLayout, get_codec, resolve_codec
from offload_runtime.native.chunking import crc32
from offload_runtime.native.layout import align_up

# zlib.crc32 releases the GIL on large buffers: chunk CRCs of a 1.7 GB group spread over the host's cores
CRC_THREADS = max(1, min(16, os.cpu_count() or 1))

INT8_BLOCK_ELEMENTS = 1 << 25  # int8 quantises this many elements at a time: ~0.5 GB of fp32 temporaries

Fill = Callable[[int, torch.Tensor], None]


@dataclass
class _Encoded:
    """One encoding of a group: the payload somewhere (host array, or strided on the GPU) and its table."""

    chunks: list[Chunk]
    params: dict
    stored_layout: GroupLayout | None
    stored_size: int
    write: Callable[[torch.Tensor], None]  # copies the compact payload into a host uint8 tensor


class SyntheticSource:
    """Groups that are generated on demand (see the module docstring).

    Args:
        specs (`Sequence[GroupSpec]`): the groups, in execution order.
        layouts (`Sequence[GroupLayout]`): the decoded layout of each group.
        fill (`Callable[[int, torch.Tensor], None]`): writes group ``i``'s decoded bytes into a uint8
            buffer of ``layouts[i].size`` bytes (zeroed) on ``device``; must be deterministic.
        codec (`str`, defaults to `"auto"`): codec name, resolved per group for ``device``.
        device (`torch.device` or `str`, defaults to `"cpu"`): where groups are generated and encoded.

    Attributes:
        groups: the :class:`GroupEntry` of every group (chunk tables with CRCs, no payload).
        peak_group_bytes: the most decoded-group bytes this source ever held at once (one group's size).
        generated: how many times each group was generated (phase 1 counts once).
    """

    path = None
    verify = "once"

    def __init__(
        self,
        specs: Sequence[GroupSpec],
        layouts: Sequence[GroupLayout],
        fill: Fill,
        *,
        codec: str = "auto",
        device: torch.device | str = "cpu",
    ) -> None:
        if len(specs) != len(layouts):
            raise ValueError(f"{len(specs)} group specs but {len(layouts)} layouts")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._fill = fill
        self._layouts = list(layouts)
        self._index = {spec.name: i for i, spec in enumerate(specs)}
        self._codecs: list[GroupCodec] = [resolve_codec(codec, layout, self.device) for layout in layouts]
        self._host: torch.Tensor | None = None  # reusable (pinned on CUDA) host buffer for D2H copies
        self._live_bytes = 0
        self.peak_group_bytes = 0
        self.generated: dict[str, int] = {}
        self.groups: list[GroupEntry] = []
        for i, spec in enumerate(specs):
            encoded = self._encode(i, spec.name, checksums=True)
            self.groups.append(
                GroupEntry(
                    name=spec.name,
                    kind=spec.kind,
                    users=list(spec.users),
                    aliases=dict(spec.aliases),
                    tensor=tensor_name(i),
                    codec=self._codecs[i].name,
                    params=encoded.params,
                    layout=self._layouts[i],
                    stored_layout=encoded.stored_layout,
                    stored_size=encoded.stored_size,
                    chunks=encoded.chunks,
                    expert=spec.expert,
                )
            )
        self._by_name = {g.name: g for g in self.groups}

    def __repr__(self) -> str:
        stored = sum(g.stored_size for g in self.groups)
        decoded = sum(g.decoded_size for g in self.groups)
        return f"SyntheticSource({len(self.groups)} groups, decoded {decoded} B, stored {stored} B)"

    # -- the reader interface --------------------------------------------------------------------------

    def group(self, name: str) -> GroupEntry:
        """The entry of group ``name``."""
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no group {name!r} in the synthetic model") from None

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Regenerate and re-encode group ``name``, copy its payload into ``out`` (1-D uint8 CPU tensor).

        Returns:
            `torch.Tensor`: ``out[:stored_size]``.

        Raises:
            CorruptCheckpointError: a chunk differs from the first encoding (a non-deterministic encoder or
                generator), naming the group and chunk.
        """
        entry = self.group(name)
        if out.dtype != torch.uint8 or out.dim() != 1 or out.device.type != "cpu" or not out.is_contiguous():
            raise ValueError(f"need a contiguous 1-D uint8 CPU tensor, got {out.dtype} {tuple(out.shape)}")
        if out.numel() < entry.stored_size:
            raise ValueError(f"group {name!r} needs {entry.stored_size} bytes, buffer has {out.numel()}")
        # no checksums of its own: the bytes copied into ``dest`` are compared with phase 1's CRCs below
        encoded = self._encode(self._index[name], name, checksums=False)
        dest = out[: entry.stored_size]
        if encoded.stored_size == entry.stored_size:
            encoded.write(dest)
        self._check_same(entry, encoded, dest)
        return dest

    def decode_cpu(self, name: str, out: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
        """Regenerate group ``name`` and decode its payload on the CPU into ``out``.

        Args:
            name (`str`): the group.
            out (`torch.Tensor`): destination, uint8 CPU, at least ``layout.size`` bytes.
            staging (`torch.Tensor`, *optional*): reusable buffer of >= ``stored_size`` bytes for the payload.

        Raises:
            CodecUnavailableError: the codec has no CPU decoder (``ans``, ``int8`` over ``ans``); checked
                before anything is generated, so the runtime's GPU fallback costs nothing here.
        """
        entry = self.group(name)
        if entry.codec == "ans" or (entry.codec == "int8" and entry.params.get("inner") == "ans"):
            raise CodecUnavailableError(
                "this group is stored with nvCOMP ANS, which has no CPU decoder",
                codec=entry.codec,
                missing="a CPU ANS decoder (nvCOMP has none)",
                alternative="zstd",
                group=name,
            )
        if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < entry.layout.size:
            raise ValueError(
                f"group {name!r} decodes to {entry.layout.size} uint8 bytes; got {tuple(out.shape)}"
            )
        if staging is None or staging.numel() < entry.stored_size:
            staging = torch.empty(entry.stored_size, dtype=torch.uint8)
        payload = self.read_into(name, staging)
        try:
            get_codec(entry.codec).decode_cpu(
                memoryview(payload.numpy()),
                entry.chunks,
                entry.params,
                entry.layout,
                out,
                verify_decoded=True,
            )
        except OffloadError as exc:
            raise locate_error(exc, None, name) from exc
        return out[: entry.layout.size]

    def trim(self) -> None:
        """Free the reusable host buffer (after dispatch; a later read allocates it again)."""
        self._host = None

    def close(self) -> None:
        """Release the host buffer; present for the reader interface."""
        self.trim()

    # -- internals -------------------------------------------------------------------------------------

    def _generate(self, index: int, name: str) -> torch.Tensor:
        layout = self._layouts[index]
        buffer = torch.zeros(layout.size, dtype=torch.uint8, device=self.device)
        self._fill(index, buffer)
        self.generated[name] = self.generated.get(name, 0) + 1
        return buffer

    def _encode(self, index: int, name: str, *, checksums: bool) -> _Encoded:
        """Generate group ``index`` and encode it; the decoded buffer is freed before returning."""
        layout = self._layouts[index]
        self._live_bytes += layout.size
        self.peak_group_bytes = max(self.peak_group_bytes, self._live_bytes)
        try:
            # handed over in a list the encoders pop from: no caller frame keeps the buffer alive, so it is
            # freed as soon as an encoder is done with it (GPU memory is tight next to a full budget)
            held = [self._generate(index, name)]
            return self._encode_tensor(self._codecs[index], layout, held, checksums)
        finally:
            self._live_bytes -= layout.size

    def _encode_tensor(
        self, codec: GroupCodec, layout: GroupLayout, held: list[torch.Tensor], checksums: bool
    ) -> _Encoded:
        """Encode the group bytes ``held.pop()`` (uint8, on the source's device) with ``codec``."""
        if codec.name == "int8":
            return self._encode_int8(codec, layout, held, checksums)
        if codec.name == "ans" and held[0].is_cuda:
            return self._encode_ans_device(codec, layout, held, checksums)
        data = held.pop()
        host = data.cpu() if data.is_cuda else data
        del data
        encoded = codec.encode(layout, host.numpy())
        payload = torch.from_numpy(np.ascontiguousarray(encoded.payload))

        def write(dest: torch.Tensor) -> None:
            dest.copy_(payload)

        return _Encoded(
            list(encoded.chunks), dict(encoded.params), encoded.stored_layout, int(payload.numel()), write
        )

    def _encode_int8(
        self, codec: GroupCodec, layout: GroupLayout, held: list[torch.Tensor], checksums: bool
    ) -> _Encoded:
        """``int8`` on the data's device: quantise there, then the inner codec (``ans`` on the GPU).

        Same bytes as ``Int8Codec.encode``: rows are quantised independently, so doing it in blocks of
        rows (bounded fp32 temporaries next to a full GPU) changes nothing.
        """
        from offload_runtime.native.int8 import (
            SCALE_SUFFIX,
            _inner_codec,
            default_inner,
            is_quantised,
            quantise_rows,
            stored_layout_for,
        )

        data = held.pop()
        inner_name = codec.inner or default_inner()
        stored_layout = stored_layout_for(layout)
        stored = [torch.zeros(stored_layout.size, dtype=torch.uint8, device=data.device)]
        source, target = layout.views(data), stored_layout.views(stored[0])
        for spec in layout.tensors:
            if not is_quantised(spec):
                target[spec.name].copy_(source[spec.name])
                continue
            rows = max(1, INT8_BLOCK_ELEMENTS // spec.shape[1])
            for start in range(0, spec.shape[0], rows):
                q, scale = quantise_rows(source[spec.name][start : start + rows], spec.name)
                target[spec.name][start : start + rows].copy_(q)
                target[spec.name + SCALE_SUFFIX][start : start + rows].copy_(scale)
                del q, scale
        del data, source, target
        inner = self._encode_tensor(_inner_codec(inner_name), stored_layout, stored, checksums)
        params = {"inner": inner_name, "inner_params": inner.params, "scale_dtype": "float32"}
        return _Encoded(inner.chunks, params, stored_layout, inner.stored_size, inner.write)

    def _encode_ans_device(
        self, codec: GroupCodec, layout: GroupLayout, held: list[torch.Tensor], checksums: bool
    ) -> _Encoded:
        """nvCOMP ANS straight from the device buffer; chunk bodies come back through the pinned buffer."""
        from offload_runtime.native.ans import ans_data_type
        from offload_runtime.native.nvcomp_backend import ans_compress_device, require_gpu_codecs
        from offload_runtime.native.nvcomp_capi import ANS_ALIGNMENT

        require_gpu_codecs("ans")
        data = held.pop()
        data_type = ans_data_type(layout)
        chunk_size = codec.chunk_size
        size = int(data.numel())
        decoded_sizes = [min(chunk_size, size - start) for start in range(0, size, chunk_size)]
        decoded_crc = [0] * len(decoded_sizes)
        if checksums:  # the decoded bytes' CRCs, for the chunk table
            host = self._host_buffer(size)[:size]
            host.copy_(data)
            decoded_crc = _crcs(host.numpy(), _spans(decoded_sizes))
        compressed = ans_compress_device(data, chunk_size, data_type)
        del data
        lengths = [int(n) for n in compressed.lengths]
        stride = compressed.stride
        host = self._host_buffer(compressed.dst.numel())[: compressed.dst.numel()]
        host.copy_(compressed.dst)  # synchronous: ``host`` is reused by the next group
        del compressed
        bodies = [(i * stride, n) for i, n in enumerate(lengths)]
        body_crc = _crcs(host.numpy(), bodies) if checksums else [0] * len(bodies)
        chunks, offset = [], 0
        for n, dsize, crc, dcrc in zip(lengths, decoded_sizes, body_crc, decoded_crc, strict=True):
            chunks.append(Chunk(offset, n, dsize, crc, dcrc))
            offset += align_up(n, ANS_ALIGNMENT)
        strided = host.numpy()

        def write(dest: torch.Tensor) -> None:
            # compact the strided bodies into ``dest``, zero padded to ANS_ALIGNMENT like ans_encode_chunks
            out = dest.numpy()
            for chunk, (start, n) in zip(chunks, bodies, strict=True):
                out[chunk.offset : chunk.offset + n] = strided[start : start + n]
                out[chunk.offset + n : chunk.offset + align_up(n, ANS_ALIGNMENT)] = 0

        params = {"chunk_size": chunk_size, "data_type": data_type}
        return _Encoded(chunks, params, None, offset, write)

    def _host_buffer(self, nbytes: int) -> torch.Tensor:
        if self._host is None or self._host.numel() < nbytes:
            self._host = None  # free the old one first
            self._host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        return self._host

    def _check_same(self, entry: GroupEntry, encoded: _Encoded, payload: torch.Tensor) -> None:
        """Compare the second encoding (and the bytes copied out) with the first, chunk by chunk."""
        hint = "the generator or encoder is not deterministic on this device; use codec='raw' or 'zstd'"
        if encoded.stored_size != entry.stored_size or len(encoded.chunks) != len(entry.chunks):
            raise CorruptCheckpointError(
                "synthetic group re-encoded to a different size",
                group=entry.name,
                expected=f"{entry.stored_size} bytes in {len(entry.chunks)} chunks",
                actual=f"{encoded.stored_size} bytes in {len(encoded.chunks)} chunks",
                hint=hint,
            )
        spans = [(c.offset, c.size) for c in entry.chunks]
        actual = _crcs(payload.numpy(), spans)
        for i, (first, again, crc) in enumerate(zip(entry.chunks, encoded.chunks, actual, strict=True)):
            if (first.offset, first.size) != (again.offset, again.size) or crc != first.crc32:
                raise CorruptCheckpointError(
                    "synthetic group re-encoded to different bytes (chunk CRC-32 mismatch)",
                    group=entry.name,
                    chunk=i,
                    expected=f"{first.crc32:#010x} ({first.size} bytes at {first.offset})",
                    actual=f"{crc:#010x} ({again.size} bytes at {again.offset})",
                    hint=hint,
                )


def _spans(sizes: Sequence[int]) -> list[tuple[int, int]]:
    spans, offset = [], 0
    for n in sizes:
        spans.append((offset, n))
        offset += n
    return spans


def _crcs(data: np.ndarray, spans: Sequence[tuple[int, int]]) -> list[int]:
    """CRC-32 of each ``(offset, size)`` span of ``data``, on :data:`CRC_THREADS` threads."""
    view = memoryview(data).cast("B")
    pieces = [view[offset : offset + size] for offset, size in spans]
    if len(pieces) < 64 or CRC_THREADS == 1:
        return [crc32(p) for p in pieces]
    with ThreadPoolExecutor(CRC_THREADS) as pool:
        return list(pool.map(crc32, pieces, chunksize=max(1, len(pieces) // (4 * CRC_THREADS))))
