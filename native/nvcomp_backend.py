"""nvCOMP plumbing shared by the GPU codecs: availability checks, the batched GPU decoder, ANS encoding.

Decodes go through nvCOMP's batched C API (:mod:`offload_runtime.native.nvcomp_capi`): one call per group
decodes every chunk, on the caller's stream, into caller-owned torch memory, without a host sync. All
per-group state (sizes, statuses, the table of chunk pointers) is built once in the decoder's constructor,
in device memory the caller hands it (a runtime's arena: :func:`decoder_sizes` is the size query); the
pointer table is rewritten in place only when a decode uses new addresses, so the steady state allocates
nothing. nvCOMP's temp workspace is not per group: it is drawn from a
:class:`~offload_runtime.native.workspace.DecodeWorkspace` shared by every decoder of a runtime (one
buffer per codec, sized for the largest group), which is safe because those decodes are ordered on one
decode stream.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from offload_runtime.errors import CodecUnavailableError
from offload_runtime.native import nvcomp_capi as capi
from offload_runtime.native.availability import (
    NVCOMP_EXTRA_HINT,
    gpu_codecs_unavailable_reason,
    nvcomp_module,
)
from offload_runtime.native.base import Chunk, DecoderSizes, GpuDecoder, allocator_or_default
from offload_runtime.native.chunking import crc32
from offload_runtime.native.layout import align_up
from offload_runtime.native.workspace import Allocate, DecodeWorkspace

_ALIGNMENT = {"ans": capi.ANS_ALIGNMENT, "zstd": capi.ZSTD_ALIGNMENT}


def require_gpu_codecs(codec: str, alternative: str = "zstd") -> None:
    """Raise :class:`CodecUnavailableError` for ``codec`` unless CUDA, nvCOMP and ``libnvcomp.so`` load."""
    reason = gpu_codecs_unavailable_reason()
    if reason is None and capi.library() is None:
        reason = f"libnvcomp.so (the nvCOMP C library) cannot be loaded: {NVCOMP_EXTRA_HINT}"
    if reason is not None:
        raise CodecUnavailableError(
            f"codec {codec!r} needs a CUDA GPU and nvCOMP",
            codec=codec,
            missing=reason,
            alternative=alternative,
            hint=NVCOMP_EXTRA_HINT,
        )


_ALLOCATOR_INSTALLED = False


class _TorchDeviceBuffer:
    """A device allocation from torch's caching allocator, in the shape nvCOMP's allocator hook wants."""

    def __init__(self, nbytes: int, stream) -> None:
        self.tensor = torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device="cuda")
        self.ptr = self.tensor.data_ptr()


def install_torch_allocator() -> None:
    """Route the nvCOMP Python API's device scratch through torch's allocator (once per process).

    The C-API decoders already allocate their scratch as torch tensors; this covers the Python API
    (used for comparisons in the benchmarks), so every nvCOMP byte shows in ``torch.cuda.memory_stats``.
    """
    global _ALLOCATOR_INSTALLED
    nvcomp = nvcomp_module()
    if _ALLOCATOR_INSTALLED or nvcomp is None:
        return
    nvcomp.set_device_allocator(_TorchDeviceBuffer)
    _ALLOCATOR_INSTALLED = True


def _device_array(values: Sequence[int], device: torch.device) -> torch.Tensor:
    # int64 on the device == size_t / pointers for nvCOMP (both 8 bytes on every platform CUDA supports)
    return torch.tensor(np.asarray(values, dtype=np.int64), dtype=torch.int64).to(device)


def _piece_sizes(num_chunks: int) -> tuple[int, ...]:
    """Bytes of each device array a decoder of ``num_chunks`` chunks allocates, in allocation order:
    compressed sizes, decoded sizes, actual sizes (int64), statuses, CRCs, CRC statuses (int32), then the
    pointer table (input and output pointer per chunk)."""
    m = max(num_chunks, 1)
    return (8 * num_chunks, 8 * num_chunks, 8 * m, 4 * m, 4 * m, 4 * m, 16 * num_chunks)


def decoder_sizes(algorithm: str, chunks: Sequence[Chunk]) -> DecoderSizes:
    """Device memory of an :class:`NvcompGpuDecoder` for ``chunks`` (host-only queries, nothing allocated)."""
    n = len(chunks)
    if not n:
        return DecoderSizes(_piece_sizes(0), ())
    decoded = [c.decoded_size for c in chunks]
    temp = capi.decompress_temp_bytes(algorithm, n, max(decoded), sum(decoded))
    return DecoderSizes(_piece_sizes(n), ((f"nvcomp-{algorithm}", temp),))


class NvcompGpuDecoder(GpuDecoder):
    """Batched nvCOMP decode of one group's chunks (``"ans"`` or ``"zstd"``), built once, reused.

    Args:
        algorithm (`str`): ``"ans"`` or ``"zstd"``.
        chunks (`Sequence[Chunk]`): the group's chunk table; chunk ``i`` decodes to the bytes after chunk
            ``i-1``'s.
        device (`torch.device`): the CUDA device of every payload and output passed to :meth:`decode`.
        allocate (*optional*): where its device arrays come from (:func:`decoder_sizes` says how much);
            torch when ``None``.

    The table of chunk pointers depends on the (payload, output) addresses; it is rebuilt in place, on the
    decode's stream, when a decode uses other addresses than the previous one (a runtime decodes each
    streamed group from one staging buffer into one slot, so that happens once).

    Attributes:
        statuses: per-chunk ``nvcompStatus_t`` (int32, device) of the latest decode; ``decode(check=True)``
            reads them back with the decoded sizes and the CRC-32 of each decoded chunk, computed on the GPU
            by nvCOMP's CRC32 API (:class:`DecodeCheck`).
    """

    def __init__(
        self,
        algorithm: str,
        chunks: Sequence[Chunk],
        device: torch.device | str,
        allocate: Allocate | None = None,
    ) -> None:
        require_gpu_codecs(algorithm)
        self.algorithm = algorithm
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.lib = capi.library()
        self.alignment = _ALIGNMENT[algorithm]
        self.num_chunks = len(chunks)
        self.src_offsets = np.array([c.offset for c in chunks], dtype=np.int64)
        decoded = np.array([c.decoded_size for c in chunks], dtype=np.int64)
        self.out_offsets = np.concatenate(([0], np.cumsum(decoded)[:-1])).astype(np.int64)
        self.payload_end = max((c.offset + c.size for c in chunks), default=0)
        self.decoded_size = int(decoded.sum())
        misaligned = [i for i, off in enumerate(self.src_offsets) if off % self.alignment]
        misaligned += [i for i, off in enumerate(self.out_offsets) if off % self.alignment]
        if misaligned:
            raise ValueError(
                f"{algorithm} chunks {sorted(set(misaligned))[:8]} are not {self.alignment}-byte aligned "
                "in the payload or output; re-encode the group"
            )
        sizes = decoder_sizes(algorithm, chunks)
        take = allocator_or_default(allocate, self.device)
        n = self.num_chunks
        with torch.cuda.device(self.device):
            pieces = [take(nbytes)[:nbytes] for nbytes in sizes.pieces]
            self.comp_bytes = pieces[0].view(torch.int64)
            self.buffer_bytes = pieces[1].view(torch.int64)
            self.actual_bytes = pieces[2].view(torch.int64)
            self.statuses = pieces[3].view(torch.int32)
            self.crcs = pieces[4].view(torch.int32)
            self.crc_statuses = pieces[5].view(torch.int32)
            self.pointers = pieces[6].view(torch.int64)
            # from host memory straight into the pieces: no temporary device tensor outside them
            self.comp_bytes.copy_(torch.tensor([c.size for c in chunks], dtype=torch.int64))
            self.buffer_bytes.copy_(torch.from_numpy(decoded))
            for tensor in (self.actual_bytes, self.statuses, self.crcs, self.crc_statuses):
                tensor.zero_()
            max_chunk = int(decoded.max()) if n else 0
            self.opts = capi.ans_decompress_opts() if algorithm == "ans" else capi.zstd_decompress_opts()
            self._call = (
                self.lib.nvcompBatchedANSDecompressAsync
                if algorithm == "ans"
                else self.lib.nvcompBatchedZstdDecompressAsync
            )
            self.done = torch.cuda.Event()  # orders reuse of statuses/actual sizes/pointers across streams
            # decoded-chunk CRC-32s on the GPU (checked decodes only); the host reads a small report back
            self.crc_opts = capi.crc32_opts(n, max_chunk)
        self.expected_sizes = decoded
        self.expected_crcs = np.array([c.decoded_crc32 for c in chunks], dtype=np.uint32)
        self._report: torch.Tensor | None = None  # pinned, allocated by the first checked decode
        self._report_ready = torch.cuda.Event()
        self._last_stream: torch.cuda.Stream | None = None
        self._pointer_pair: tuple[int, int] | None = None  # (payload, output) addresses the table holds
        self._pointer_host: torch.Tensor | None = None  # pinned source of the table's H2D copy
        self._pointer_copied = torch.cuda.Event()
        self.scratch_bytes = sum(sizes.pieces)
        # nvCOMP's temp workspace is only live during a decode: drawn from a workspace shared per kind
        self.workspace_kind = f"nvcomp-{algorithm}"
        self.workspace_needs = dict(sizes.workspace)
        self.use_workspace(DecodeWorkspace(self.device))  # private until the runtime binds a shared one

    def _point_at(self, src_ptr: int, out_ptr: int, stream: torch.cuda.Stream) -> None:
        """Make the pointer table describe (``src_ptr``, ``out_ptr``), enqueued on ``stream`` (which is
        already ordered after the previous decode, the table's last reader)."""
        if self._pointer_pair == (src_ptr, out_ptr):
            return
        n = self.num_chunks
        if self._pointer_host is None:
            self._pointer_host = torch.empty(2 * n, dtype=torch.int64, pin_memory=True)
        else:
            self._pointer_copied.synchronize()  # the previous copy out of the pinned table has run
        host_np = self._pointer_host.numpy()
        host_np[:n] = src_ptr + self.src_offsets
        host_np[n:] = out_ptr + self.out_offsets
        with torch.cuda.stream(stream):
            self.pointers.copy_(self._pointer_host, non_blocking=True)
        self._pointer_copied.record(stream)
        self._pointer_pair = (src_ptr, out_ptr)

    def decode(
        self, src: torch.Tensor, out: torch.Tensor, stream: torch.cuda.Stream, check: bool = False
    ) -> DecodeCheck | None:
        """Enqueue the decode of all chunks of ``src`` into ``out`` on ``stream``; returns at once.

        With ``check``, also enqueues the CRC-32 of every decoded chunk and the copy of a small report
        (statuses, decoded sizes, CRCs) to the host, and returns the :class:`DecodeCheck` to resolve it.

        Raises:
            ValueError: wrong device, dtype, size or alignment of ``src``/``out`` (checked on the host).
        """
        self._check(src, "payload", self.payload_end)
        self._check(out, "output", self.decoded_size)
        if not self.num_chunks:
            return None
        if self._last_stream is not None and self._last_stream != stream:
            stream.wait_event(self.done)  # statuses and pointers are reused: the previous decode must be done
        self._point_at(src.data_ptr(), out.data_ptr(), stream)
        temp = self.workspace.acquire(self.workspace_kind, stream)  # ordered after its previous user
        n = self.num_chunks
        base = self.pointers.data_ptr()
        status = self._call(
            base,
            self.comp_bytes.data_ptr(),
            self.buffer_bytes.data_ptr(),
            self.actual_bytes.data_ptr(),
            n,
            temp.data_ptr(),
            temp.numel(),  # >= this group's need: the buffer is sized for the largest group bound to it
            base + 8 * n,
            self.opts,
            self.statuses.data_ptr(),
            ctypes.c_void_p(stream.cuda_stream),
        )
        capi.check(status, self._call.__name__)
        self.workspace.release(self.workspace_kind, stream)
        report = self._enqueue_report(base + 8 * n, stream) if check else None
        self.done.record(stream)
        self._last_stream = stream
        return report

    def _enqueue_report(self, out_pointers: int, stream: torch.cuda.Stream) -> DecodeCheck:
        """CRC-32 of the decoded chunks (at ``out_pointers``), then statuses, sizes and CRCs to the host."""
        n = self.num_chunks
        crc = capi.crc32_library()
        if crc is not None and self.crc_opts is not None:
            status = crc.nvcompBatchedCRC32Async(
                out_pointers,
                self.buffer_bytes.data_ptr(),  # the expected sizes: a short chunk shows in actual_bytes
                n,
                self.crcs.data_ptr(),
                self.crc_opts,
                capi.CRC32_ONLY_SEGMENT,
                self.crc_statuses.data_ptr(),
                ctypes.c_void_p(stream.cuda_stream),
            )
            capi.check(status, "nvcompBatchedCRC32Async")
        if self._report is None:
            self._report = torch.empty(5 * n, dtype=torch.int32, pin_memory=True)
        with torch.cuda.stream(stream):  # int32 statuses, CRC statuses, CRCs, then int64 sizes as 2 x int32
            parts = (self.statuses, self.crc_statuses, self.crcs, self.actual_bytes.view(torch.int32))
            start = 0
            for part, count in zip(parts, (n, n, n, 2 * n), strict=True):
                self._report[start : start + count].copy_(part[:count], non_blocking=True)
                start += count
        self._report_ready.record(stream)
        return DecodeCheck(self, crc is not None and self.crc_opts is not None)

    def report_faults(self, with_crcs: bool) -> list[tuple[int, str]]:
        """Wait for the last checked decode's report; its faulty chunks (see :func:`chunk_faults`)."""
        self._report_ready.synchronize()
        n = self.num_chunks
        report = self._report.numpy()
        return chunk_faults(
            statuses=report[:n],
            crc_statuses=report[n : 2 * n] if with_crcs else None,
            crcs=report[2 * n : 3 * n].view(np.uint32) if with_crcs else None,
            actual_sizes=report[3 * n :].view(np.int64),
            expected_sizes=self.expected_sizes,
            expected_crcs=self.expected_crcs,
        )

    def _check(self, tensor: torch.Tensor, what: str, needed: int) -> None:
        if (
            tensor.device != self.device
            or tensor.dtype != torch.uint8
            or not tensor.is_contiguous()
            or tensor.numel() < needed
            or tensor.data_ptr() % self.alignment
        ):
            raise ValueError(
                f"{self.algorithm} decode needs a contiguous uint8 {what} on {self.device} of >= {needed} "
                f"bytes at a {self.alignment}-byte aligned address; got {tensor.dtype} "
                f"{tuple(tensor.shape)} on {tensor.device} at address {tensor.data_ptr():#x}"
            )


def chunk_faults(
    *,
    statuses: np.ndarray,
    actual_sizes: np.ndarray,
    expected_sizes: np.ndarray,
    crc_statuses: np.ndarray | None = None,
    crcs: np.ndarray | None = None,
    expected_crcs: np.ndarray | None = None,
) -> list[tuple[int, str]]:
    """``(chunk, what is wrong)`` for each chunk whose decode failed, came out short or long, or whose
    decoded bytes have another CRC-32 than the index records (when ``crcs`` are given)."""
    faults = []
    for i in range(len(statuses)):
        if statuses[i] != capi.NVCOMP_SUCCESS:
            faults.append((i, f"nvCOMP decode status {int(statuses[i])}"))
        elif actual_sizes[i] != expected_sizes[i]:
            faults.append((i, f"decoded {int(actual_sizes[i])} bytes, expected {int(expected_sizes[i])}"))
        elif crcs is not None and crc_statuses is not None and crc_statuses[i] != capi.NVCOMP_SUCCESS:
            faults.append((i, f"nvCOMP CRC32 status {int(crc_statuses[i])}"))
        elif crcs is not None and expected_crcs is not None and crcs[i] != expected_crcs[i]:
            faults.append((i, f"decoded CRC-32 {int(crcs[i]):#010x}, expected {int(expected_crcs[i]):#010x}"))
    return faults


class DecodeCheck:
    """A checked decode in flight: :meth:`result` waits for it and raises if any chunk is wrong.

    One per decoder at a time (the report buffer is the decoder's): resolve it before the decoder's next
    checked decode, which the runtime does in the forward of the group, before its next load.
    """

    def __init__(self, decoder: NvcompGpuDecoder, with_crcs: bool) -> None:
        self.decoder = decoder
        self.with_crcs = with_crcs

    def result(self) -> None:
        """Raises:
        CorruptCheckpointError: naming the first faulty chunk and how many are faulty (the caller adds
            the file and group)."""
        from offload_runtime.errors import CorruptCheckpointError

        faults = self.decoder.report_faults(self.with_crcs)
        if faults:
            chunk, what = faults[0]
            raise CorruptCheckpointError(
                f"GPU decode of chunk {chunk} is wrong: {what}"
                + (f" ({len(faults)} chunks faulty)" if len(faults) > 1 else ""),
                chunk=chunk,
                hint="the payload in memory or on disk is damaged; re-open the container or re-pack it",
            )


@dataclass
class AnsCompressed:
    """nvCOMP ANS output still on the device: chunk ``i``'s body is ``dst[i * stride :][: lengths[i]]``.

    Attributes:
        dst: uint8 CUDA tensor of ``len(lengths) * stride`` bytes (bytes past each body are undefined).
        stride: bytes reserved per chunk (nvCOMP's maximum output size, aligned to ``ANS_ALIGNMENT``).
        lengths: compressed bytes of each chunk (int64, host).
        sizes: decoded bytes of each chunk (int64, host).
    """

    dst: torch.Tensor
    stride: int
    lengths: np.ndarray
    sizes: np.ndarray


def ans_compress_device(src: torch.Tensor, chunk_size: int, data_type: str) -> AnsCompressed:
    """Compress the contiguous uint8 CUDA tensor ``src`` with nvCOMP ANS, one chunk per ``chunk_size`` bytes.

    Runs on ``src``'s device and current stream; returns once the compressed lengths are known (the host
    waits for the stream). Nothing is copied to the host but the lengths and statuses.

    Raises:
        ValueError: ``src`` is not a contiguous uint8 CUDA tensor, or ``<f2`` with an odd byte count.
        NvcompCallError: nvCOMP failed on some chunk.
    """
    if src.dtype != torch.uint8 or src.device.type != "cuda" or src.dim() != 1 or not src.is_contiguous():
        raise ValueError(f"need a contiguous 1-D uint8 CUDA tensor, got {src.dtype} {tuple(src.shape)}")
    lib = capi.library()
    size = int(src.numel())
    if size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return AnsCompressed(torch.zeros(0, dtype=torch.uint8, device=src.device), 0, empty, empty)
    if data_type == "<f2" and (size % 2 or chunk_size % 2):
        raise ValueError(f"ANS <f2 needs an even byte count, got {size} bytes in chunks of {chunk_size}")
    opts = capi.ans_compress_opts(data_type)
    starts = np.arange(0, size, chunk_size, dtype=np.int64)
    sizes = np.minimum(chunk_size, size - starts)
    n = len(starts)
    max_out = ctypes.c_size_t(0)
    capi.check(
        lib.nvcompBatchedANSCompressGetMaxOutputChunkSize(chunk_size, opts, ctypes.byref(max_out)),
        "nvcompBatchedANSCompressGetMaxOutputChunkSize",
    )
    stride = align_up(int(max_out.value), capi.ANS_ALIGNMENT)
    temp_bytes = ctypes.c_size_t(0)
    capi.check(
        lib.nvcompBatchedANSCompressGetTempSize(n, chunk_size, opts, ctypes.byref(temp_bytes), size, None),
        "nvcompBatchedANSCompressGetTempSize",
    )
    device = src.device
    with torch.cuda.device(device):
        stream = torch.cuda.current_stream(device)
        # zeroed: ANS leaves alignment bytes unwritten, and the payload (and its CRCs) must not depend on
        # whatever memory the allocator hands out; re-encoding a synthetic group must give the same bytes
        dst = torch.zeros(n * stride, dtype=torch.uint8, device=device)
        temp = torch.empty(max(int(temp_bytes.value), 1), dtype=torch.uint8, device=device)
        src_ptrs = _device_array(src.data_ptr() + starts, device)
        dst_ptrs = _device_array(dst.data_ptr() + stride * np.arange(n, dtype=np.int64), device)
        in_bytes = _device_array(sizes, device)
        out_bytes = torch.zeros(n, dtype=torch.int64, device=device)
        statuses = torch.zeros(n, dtype=torch.int32, device=device)
        capi.check(
            lib.nvcompBatchedANSCompressAsync(
                src_ptrs.data_ptr(),
                in_bytes.data_ptr(),
                chunk_size,
                n,
                temp.data_ptr(),
                int(temp_bytes.value),
                dst_ptrs.data_ptr(),
                out_bytes.data_ptr(),
                opts,
                statuses.data_ptr(),
                ctypes.c_void_p(stream.cuda_stream),
            ),
            "nvcompBatchedANSCompressAsync",
        )
        lengths = out_bytes.cpu().numpy()  # synchronises
        bad = [i for i, s in enumerate(statuses.cpu().tolist()) if s != capi.NVCOMP_SUCCESS]
    if bad:
        raise capi.NvcompCallError(f"nvCOMP ANS failed to compress chunks {bad[:8]} of {n}")
    return AnsCompressed(dst, stride, lengths, sizes)


def ans_encode_chunks(data: np.ndarray, chunk_size: int, data_type: str) -> tuple[np.ndarray, list[Chunk]]:
    """Compress ``data`` with nvCOMP ANS on the GPU, one chunk per ``chunk_size`` bytes.

    Returns the payload (chunks at :data:`~offload_runtime.native.nvcomp_capi.ANS_ALIGNMENT`-aligned
    offsets, zero padded) and the chunk table with CRC-32s of both the compressed and the decoded bytes.
    """
    size = int(data.size)
    if size == 0:
        return np.zeros(0, dtype=np.uint8), []
    device = torch.device("cuda", torch.cuda.current_device())
    src = torch.from_numpy(np.ascontiguousarray(data).reshape(-1)).to(device)
    result = ans_compress_device(src, chunk_size, data_type)
    compressed = result.dst.cpu().numpy()  # synchronises: encoding is offline work
    pieces, chunks, offset, start = [], [], 0, 0
    for i, (length, decoded) in enumerate(zip(result.lengths, result.sizes, strict=True)):
        body = compressed[i * result.stride : i * result.stride + int(length)]
        raw = data[start : start + int(decoded)]
        chunks.append(Chunk(offset, body.size, int(decoded), crc32(body), crc32(raw)))
        padded = align_up(body.size, capi.ANS_ALIGNMENT)
        pieces.append(np.pad(body, (0, padded - body.size)))
        offset += padded
        start += int(decoded)
    return np.concatenate(pieces), chunks
