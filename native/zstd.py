"""``zstd``: lossless, encoded on the CPU with ``zstandard``, decoded on the CPU or on the GPU by nvCOMP.

Every chunk is one standard, independent zstd frame (content size written in the header, no checksum,
no dictionary), which is what nvCOMP's GPU Zstd decodes when built with ``BitstreamKind.RAW``. GPU Zstd
is slower than a plain PCIe copy (32 GB/s on an H100), so it is a portable format, not a hot-path one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import zstandard

from offload_runtime.errors import CorruptCheckpointError
from offload_runtime.native.base import Chunk, DecoderSizes, EncodedGroup, GpuDecoder, GroupCodec, register
from offload_runtime.native.chunking import check_decoded_crcs, crc32, split
from offload_runtime.native.layout import GroupLayout, align_up
from offload_runtime.native.workspace import Allocate

# 1 MiB: large enough that zstd's ratio is within ~1% of one big frame and the per-frame overhead is
# negligible, small enough that a group of a few hundred MB gives hundreds of frames for nvCOMP's batched
# GPU decoder to spread over the SMs (it decodes one frame per thread block group).
ZSTD_CHUNK_SIZE = 1 << 20
# nvCOMP's GPU Zstd needs every frame at an 8-byte aligned address (nvcompZstdRequiredDecompressionAlignment);
# 16 also suits ANS, so a payload buffer aligned for one codec is aligned for both.
ZSTD_FRAME_ALIGN = 16
ZSTD_LEVEL = 3  # zstd's default: near-best ratio on float weights; higher levels gain <1% and encode slowly


@register
class ZstdCodec(GroupCodec):
    """Lossless zstd, one independent frame per chunk of :data:`ZSTD_CHUNK_SIZE` bytes.

    Args:
        chunk_size (`int`, defaults to :data:`ZSTD_CHUNK_SIZE`): decoded bytes per frame.
        level (`int`, defaults to :data:`ZSTD_LEVEL`): zstd compression level.
    """

    name = "zstd"
    lossless = True

    def __init__(self, chunk_size: int = ZSTD_CHUNK_SIZE, level: int = ZSTD_LEVEL) -> None:
        self.chunk_size = chunk_size
        self.level = level

    def encode(self, layout: GroupLayout, data: np.ndarray) -> EncodedGroup:
        # write_checksum off: chunk CRCs in the index cover it, and nvCOMP's RAW Zstd expects plain frames
        compressor = zstandard.ZstdCompressor(level=self.level, write_content_size=True, write_checksum=False)
        frames, chunks, offset = [], [], 0
        for piece in split(np.ascontiguousarray(data, dtype=np.uint8), self.chunk_size):
            frame = compressor.compress(piece)
            chunks.append(Chunk(offset, len(frame), piece.size, crc32(frame), crc32(piece)))
            padding = align_up(len(frame), ZSTD_FRAME_ALIGN) - len(frame)
            frames.append(frame + bytes(padding))
            offset += len(frame) + padding
        payload = np.frombuffer(b"".join(frames), dtype=np.uint8).copy()
        return EncodedGroup(payload, chunks, {"chunk_size": self.chunk_size, "level": self.level})

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
        decode_frames_into(payload, chunks, out)
        if verify_decoded:
            total = sum(c.decoded_size for c in chunks)
            check_decoded_crcs(out[:total].numpy(), chunks)

    def gpu_decoder(
        self,
        chunks: Sequence[Chunk],
        params: Mapping[str, Any],
        layout: GroupLayout,
        device: torch.device,
        allocate: Allocate | None = None,
    ) -> GpuDecoder:
        from offload_runtime.native.nvcomp_backend import NvcompGpuDecoder

        return NvcompGpuDecoder("zstd", chunks, device, allocate)

    def gpu_decoder_sizes(
        self, chunks: Sequence[Chunk], params: Mapping[str, Any], layout: GroupLayout
    ) -> DecoderSizes:
        from offload_runtime.native.nvcomp_backend import decoder_sizes

        return decoder_sizes("zstd", chunks)

    def batch_decoder_sizes(self, max_chunks: int, max_chunk_bytes: int) -> DecoderSizes:
        from offload_runtime.native.batch_decode import nvcomp_batch_sizes

        return nvcomp_batch_sizes("zstd", max_chunks, max_chunk_bytes)

    def batch_decoder(
        self, max_chunks: int, max_chunk_bytes: int, device: torch.device, allocate: Allocate | None = None
    ):
        from offload_runtime.native.batch_decode import NvcompBatchDecoder

        return NvcompBatchDecoder("zstd", max_chunks, max_chunk_bytes, device, allocate)


def decode_frames_into(payload: memoryview | np.ndarray, chunks: Sequence[Chunk], out: torch.Tensor) -> None:
    """Decode zstd frames at ``chunks`` of ``payload`` back to back into the uint8 CPU tensor ``out``.

    Decodes straight into ``out``'s memory when it is contiguous (no intermediate copy).

    Raises:
        CorruptCheckpointError: a frame that does not decode, or decodes to another size, naming the chunk.
    """
    src = memoryview(np.asarray(payload, dtype=np.uint8).reshape(-1))
    total = sum(c.decoded_size for c in chunks)
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() < total:
        raise ValueError(f"need a 1-D uint8 output of >= {total} bytes, got {out.dtype} {tuple(out.shape)}")
    direct = out.is_contiguous() and out.device.type == "cpu"
    target = out if direct else torch.empty(total, dtype=torch.uint8)
    dst = memoryview(target.numpy()) if total else memoryview(b"")
    decompressor = zstandard.ZstdDecompressor()
    position = 0
    for index, chunk in enumerate(chunks):
        frame = src[chunk.offset : chunk.offset + chunk.size]
        if len(frame) != chunk.size:
            raise CorruptCheckpointError(
                "zstd chunk runs past the end of the payload",
                chunk=index,
                expected=f"{chunk.offset + chunk.size} bytes",
                actual=f"{len(src)} bytes",
            )
        try:
            # decompress straight into the output window; zstd frames carry their decoded size
            written = _decompress_into(decompressor, frame, dst[position : position + chunk.decoded_size])
        except zstandard.ZstdError as exc:
            raise CorruptCheckpointError(
                f"zstd chunk does not decode: {exc}", chunk=index, hint="re-pack the container"
            ) from exc
        if written != chunk.decoded_size:
            raise CorruptCheckpointError(
                "zstd chunk decodes to the wrong size",
                chunk=index,
                expected=chunk.decoded_size,
                actual=written,
            )
        position += written
    if not direct and total:
        out[:total].copy_(target)


def _decompress_into(decompressor: zstandard.ZstdDecompressor, frame: memoryview, window: memoryview) -> int:
    """Decompress one frame into ``window``; return the bytes the frame holds (may exceed the window)."""
    written = 0
    # stream_reader.readinto lets zstd write straight into ``window`` (no intermediate bytes object)
    with decompressor.stream_reader(frame, read_across_frames=False) as reader:
        while written < len(window):
            n = reader.readinto(window[written:])
            if n == 0:
                break
            written += n
        if reader.read(1):  # the frame holds more than the index says
            return written + 1
    return written
