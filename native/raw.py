"""``raw``: no compression. The baseline, and what accelerate streams."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from offload_runtime.native.base import (
    Chunk,
    DecoderSizes,
    EncodedGroup,
    GpuDecoder,
    GroupCodec,
    check_cpu_output,
    register,
)
from offload_runtime.native.chunking import check_decoded_crcs, crc32, split
from offload_runtime.native.layout import GroupLayout
from offload_runtime.native.workspace import Allocate

RAW_CHUNK_SIZE = 4 << 20  # only granularity for checksums: raw chunks are contiguous


@register
class RawCodec(GroupCodec):
    name = "raw"
    lossless = True
    stores_verbatim = True

    def __init__(self, chunk_size: int = RAW_CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size

    def encode(self, layout: GroupLayout, data: np.ndarray) -> EncodedGroup:
        chunks, offset = [], 0
        for piece in split(data, self.chunk_size):
            crc = crc32(piece)
            chunks.append(Chunk(offset, piece.size, piece.size, crc, crc))
            offset += piece.size
        return EncodedGroup(np.ascontiguousarray(data), chunks, {"chunk_size": self.chunk_size})

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
        size = sum(c.decoded_size for c in chunks)
        check_cpu_output(out, size)
        # through numpy: torch.frombuffer warns on the read-only views a container's payloads are
        src = np.frombuffer(payload, dtype=np.uint8, count=size)
        dst = out[:size].numpy()
        np.copyto(dst, src)
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
        return _RawGpuDecoder(sum(c.decoded_size for c in chunks))  # a copy: no device state of its own

    def batch_decoder_sizes(self, max_chunks: int, max_chunk_bytes: int) -> DecoderSizes:
        return DecoderSizes()

    def batch_decoder(
        self, max_chunks: int, max_chunk_bytes: int, device: torch.device, allocate: Allocate | None = None
    ):
        from offload_runtime.native.batch_decode import CopyBatchDecoder

        return CopyBatchDecoder()


class _RawGpuDecoder(GpuDecoder):
    def __init__(self, size: int) -> None:
        self.size = size

    def decode(
        self, src: torch.Tensor, out: torch.Tensor, stream: torch.cuda.Stream, check: bool = False
    ) -> None:
        with torch.cuda.stream(stream):
            out[: self.size].copy_(src[: self.size], non_blocking=True)
        return None  # a copy: the payload's chunk CRCs, checked when it was read, cover the output
