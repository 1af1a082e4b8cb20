"""``ans``: lossless nvCOMP ANS, encoded and decoded on the GPU only (the hot-path codec).

On an H100 ANS with 2-byte symbols decodes bf16 weights at ~900 GB/s, far above the PCIe copy it saves,
at 1.45-1.50x on trained weights. nvCOMP ships no CPU ANS decoder, so containers meant for CPU-only
machines use ``zstd``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from offload_runtime.errors import CodecUnavailableError
from offload_runtime.native.base import (
    Chunk,
    DecoderSizes,
    EncodedGroup,
    EncodedTensor,
    GpuDecoder,
    GroupCodec,
    register,
)
from offload_runtime.native.chunking import crc32_spans, spans_of
from offload_runtime.native.layout import GroupLayout, align_up
from offload_runtime.native.workspace import Allocate

# 256 KiB: measured 1.50x vs 1.46x at 64 KiB on bf16 weights (per-chunk frequency tables amortise better)
# while a 457 MB layer still yields ~1,800 chunks, plenty to fill an H100's SMs in one batched call.
ANS_CHUNK_SIZE = 256 << 10


def _allocate_host(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def ans_data_type(layout: GroupLayout) -> str:
    """nvCOMP ``data_type`` for a group: ``"<f2"`` (2-byte symbols) for fp16/bf16 groups, else ``"|u1"``."""
    return "<f2" if layout.element_size == 2 else "|u1"


@register
class AnsCodec(GroupCodec):
    """nvCOMP ANS in chunks of :data:`ANS_CHUNK_SIZE` bytes; GPU only.

    Args:
        chunk_size (`int`, defaults to :data:`ANS_CHUNK_SIZE`): decoded bytes per chunk (even).
    """

    name = "ans"
    lossless = True
    encodes_on_device = True
    requires_gpu = True

    def __init__(self, chunk_size: int = ANS_CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size

    def encode(self, layout: GroupLayout, data: np.ndarray) -> EncodedGroup:
        """Encode on the GPU.

        Raises:
            CodecUnavailableError: without CUDA or nvCOMP, naming the extra to install; use ``zstd``.
        """
        from offload_runtime.native.nvcomp_backend import ans_encode_chunks, require_gpu_codecs

        require_gpu_codecs(self.name)
        data_type = ans_data_type(layout)
        payload, chunks = ans_encode_chunks(
            np.ascontiguousarray(data, dtype=np.uint8), self.chunk_size, data_type
        )
        return EncodedGroup(payload, chunks, {"chunk_size": self.chunk_size, "data_type": data_type})

    def encode_tensor(
        self,
        layout: GroupLayout,
        held: list[torch.Tensor],
        checksums: bool = True,
        host_buffer: Callable[[int], torch.Tensor] | None = None,
    ) -> EncodedTensor:
        """Encode on the buffer's device when it is a CUDA tensor: only the compressed bodies (and, for the
        decoded CRCs, the decoded bytes) come back to the host, through ``host_buffer(nbytes)`` (a reusable,
        ideally pinned, uint8 CPU tensor; allocated per call when ``None``)."""
        if not held[0].is_cuda:
            return super().encode_tensor(layout, held, checksums)
        from offload_runtime.native.nvcomp_backend import ans_compress_device, require_gpu_codecs
        from offload_runtime.native.nvcomp_capi import ANS_ALIGNMENT

        require_gpu_codecs(self.name)
        if host_buffer is None:
            host_buffer = _allocate_host
        data = held.pop()
        data_type = ans_data_type(layout)
        size = int(data.numel())
        decoded_sizes = [min(self.chunk_size, size - start) for start in range(0, size, self.chunk_size)]
        decoded_crc = [0] * len(decoded_sizes)
        if checksums:  # the decoded bytes' CRCs, for the chunk table
            host = host_buffer(size)[:size]
            host.copy_(data)
            decoded_crc = crc32_spans(host.numpy(), spans_of(decoded_sizes))
        compressed = ans_compress_device(data, self.chunk_size, data_type)
        del data
        lengths = [int(n) for n in compressed.lengths]
        stride = compressed.stride
        host = host_buffer(compressed.dst.numel())[: compressed.dst.numel()]
        host.copy_(compressed.dst)  # synchronous: ``host`` may be reused by the caller's next group
        del compressed
        bodies = [(i * stride, n) for i, n in enumerate(lengths)]
        body_crc = crc32_spans(host.numpy(), bodies) if checksums else [0] * len(bodies)
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

        params = {"chunk_size": self.chunk_size, "data_type": data_type}
        return EncodedTensor(chunks, params, None, offset, write)

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
        raise CodecUnavailableError(
            "codec 'ans' has no CPU decoder: decode on a GPU, or re-pack the container with codec='zstd'",
            codec="ans",
            missing="a CPU ANS decoder (nvCOMP has none)",
            alternative="zstd",
        )

    def gpu_decoder(
        self,
        chunks: Sequence[Chunk],
        params: Mapping[str, Any],
        layout: GroupLayout,
        device: torch.device,
        allocate: Allocate | None = None,
    ) -> GpuDecoder:
        from offload_runtime.native.nvcomp_backend import NvcompGpuDecoder

        return NvcompGpuDecoder("ans", chunks, device, allocate)

    def gpu_decoder_sizes(
        self, chunks: Sequence[Chunk], params: Mapping[str, Any], layout: GroupLayout
    ) -> DecoderSizes:
        from offload_runtime.native.nvcomp_backend import decoder_sizes

        return decoder_sizes("ans", chunks)

    def batch_decoder_sizes(self, max_chunks: int, max_chunk_bytes: int) -> DecoderSizes:
        from offload_runtime.native.batch_decode import nvcomp_batch_sizes

        return nvcomp_batch_sizes("ans", max_chunks, max_chunk_bytes)

    def batch_decoder(
        self, max_chunks: int, max_chunk_bytes: int, device: torch.device, allocate: Allocate | None = None
    ):
        from offload_runtime.native.batch_decode import NvcompBatchDecoder

        return NvcompBatchDecoder("ans", max_chunks, max_chunk_bytes, device, allocate)
