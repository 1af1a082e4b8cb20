"""Decode the chunks of many groups in one call, each chunk to an output address of its own.

An expert runtime decodes, per MoE layer and step, the few experts the router picked: each from its cache
entry (or staging buffer) into its slice of the layer's stacked parameters. One batched nvCOMP call for all
of them keeps the host cost per layer flat (one table upload, one library call) instead of one call per
expert. Chunks are described per group once (:class:`BatchItem`: where each chunk sits in the payload, how
large it is, where its decoded bytes go relative to an output base); a call names, per group, the payload
tensor and the output tensor, and the decoder builds the pointer table on the host, uploads it from a
pinned ring on the decode stream and enqueues the decode. Nothing waits for the GPU except the rare reuse
of a pinned table whose upload has not run yet.

A chunk's output must lie inside the output tensor; where a group's chunks decode back to back the output
offsets are simply their running sum (``BatchItem.contiguous``).
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from offload_runtime.native.base import Chunk, DecoderSizes, allocator_or_default
from offload_runtime.native.workspace import Allocate, DecodeWorkspace

TABLE_RING = 4  # pinned host tables in flight: a fifth call waits for the first upload (never in practice)


@dataclass(frozen=True)
class BatchItem:
    """One group's chunks, as a batched decode needs them.

    Attributes:
        offsets: each chunk's offset in the group's payload.
        sizes: each chunk's compressed bytes.
        decoded: each chunk's decoded bytes.
        out_offsets: where each chunk's decoded bytes go, relative to the call's output base.
        crcs: each chunk's decoded CRC-32 (what a checked decode compares with).
    """

    offsets: np.ndarray
    sizes: np.ndarray
    decoded: np.ndarray
    out_offsets: np.ndarray
    crcs: np.ndarray

    @classmethod
    def contiguous(cls, chunks: Sequence[Chunk]) -> BatchItem:
        """Chunks decoding back to back from the output base (the group's own layout)."""
        decoded = np.array([c.decoded_size for c in chunks], dtype=np.int64)
        out = np.concatenate(([0], np.cumsum(decoded)[:-1])).astype(np.int64) if len(chunks) else decoded
        return cls.mapped(chunks, out)

    @classmethod
    def mapped(cls, chunks: Sequence[Chunk], out_offsets: Sequence[int]) -> BatchItem:
        """Chunks decoding to ``out_offsets`` (one per chunk) from the output base."""
        return cls(
            np.array([c.offset for c in chunks], dtype=np.int64),
            np.array([c.size for c in chunks], dtype=np.int64),
            np.array([c.decoded_size for c in chunks], dtype=np.int64),
            np.asarray(out_offsets, dtype=np.int64),
            np.array([c.decoded_crc32 for c in chunks], dtype=np.uint32),
        )

    @property
    def num_chunks(self) -> int:
        return len(self.sizes)


Job = tuple[BatchItem, torch.Tensor, torch.Tensor]  # (chunks, payload tensor, output base tensor)


class BatchDecoder(ABC):
    """Decodes many groups' chunks per call on one stream (see the module docstring)."""

    @abstractmethod
    def decode(
        self, jobs: Sequence[Job], stream: torch.cuda.Stream, check: bool = False
    ) -> BatchCheck | None:
        """Enqueue the decode of every job on ``stream``; with ``check``, also the decoded CRC-32s, resolved
        by the returned :class:`BatchCheck`."""


class CopyBatchDecoder(BatchDecoder):
    """``raw`` payloads: each chunk is its decoded bytes; a decode is a device copy per chunk."""

    def decode(self, jobs: Sequence[Job], stream: torch.cuda.Stream, check: bool = False) -> None:
        with torch.cuda.stream(stream):
            for item, src, out in jobs:
                for off, n, dst in zip(item.offsets, item.decoded, item.out_offsets, strict=True):
                    out[int(dst) : int(dst) + int(n)].copy_(
                        src[int(off) : int(off) + int(n)], non_blocking=True
                    )
        return None  # the payload's chunk CRCs, checked when it was read, cover a copy


def nvcomp_batch_sizes(algorithm: str, max_chunks: int, max_chunk_bytes: int) -> DecoderSizes:
    """Device memory of an :class:`NvcompBatchDecoder` (host-only queries)."""
    from offload_runtime.native import nvcomp_capi as capi

    temp = capi.decompress_temp_bytes(algorithm, max_chunks, max_chunk_bytes, max_chunks * max_chunk_bytes)
    pieces = (32 * max_chunks, 8 * max_chunks, 4 * max_chunks, 4 * max_chunks, 4 * max_chunks)
    return DecoderSizes(pieces, ((f"nvcomp-{algorithm}", temp),))


class NvcompBatchDecoder(BatchDecoder):
    """nvCOMP batched decode of up to ``max_chunks`` chunks per library call, from any groups.

    Args:
        algorithm (`str`): ``"ans"`` or ``"zstd"``.
        max_chunks (`int`): chunks per library call (a larger batch is split into several calls).
        max_chunk_bytes (`int`): the largest decoded chunk.
        device (`torch.device`): the CUDA device.
        allocate (*optional*): where the device arrays come from (:func:`nvcomp_batch_sizes`).
    """

    def __init__(
        self,
        algorithm: str,
        max_chunks: int,
        max_chunk_bytes: int,
        device: torch.device,
        allocate: Allocate | None = None,
    ) -> None:
        from offload_runtime.native import nvcomp_capi as capi
        from offload_runtime.native.nvcomp_backend import require_gpu_codecs

        require_gpu_codecs(algorithm)
        self.capi, self.lib = capi, capi.library()
        self.algorithm, self.device = algorithm, torch.device(device)
        self.max_chunks, self.max_chunk_bytes = max_chunks, max_chunk_bytes
        sizes = nvcomp_batch_sizes(algorithm, max_chunks, max_chunk_bytes)
        take = allocator_or_default(allocate, self.device)
        pieces = [take(n)[:n] for n in sizes.pieces]
        m = max_chunks
        self.table = pieces[0].view(torch.int64)  # src ptrs | out ptrs | compressed sizes | decoded sizes
        self.actual = pieces[1].view(torch.int64)
        self.statuses = pieces[2].view(torch.int32)
        self.crcs = pieces[3].view(torch.int32)
        self.crc_statuses = pieces[4].view(torch.int32)
        self.workspace_kind = f"nvcomp-{algorithm}"
        self.workspace_needs = dict(sizes.workspace)
        self.workspace = DecodeWorkspace(self.device)
        self.workspace.reserve(self.workspace_needs)
        self.opts = capi.ans_decompress_opts() if algorithm == "ans" else capi.zstd_decompress_opts()
        self._call = (
            self.lib.nvcompBatchedANSDecompressAsync
            if algorithm == "ans"
            else self.lib.nvcompBatchedZstdDecompressAsync
        )
        self._ring = [torch.empty(4 * m, dtype=torch.int64, pin_memory=True) for _ in range(TABLE_RING)]
        self._ring_done = [torch.cuda.Event() for _ in range(TABLE_RING)]
        self._ring_used = [False] * TABLE_RING
        self._next = 0

    def use_workspace(self, workspace: DecodeWorkspace) -> None:
        """Draw nvCOMP's temp space from ``workspace`` (shared with the runtime's other decoders)."""
        workspace.reserve(self.workspace_needs)
        self.workspace = workspace

    def decode(
        self, jobs: Sequence[Job], stream: torch.cuda.Stream, check: bool = False
    ) -> BatchCheck | None:
        checks = []
        batch: list[Job] = []
        count = 0
        for job in jobs:
            if count + job[0].num_chunks > self.max_chunks and batch:
                checks.append(self._call_once(batch, stream, check))
                batch, count = [], 0
            batch.append(job)
            count += job[0].num_chunks
        if batch:
            checks.append(self._call_once(batch, stream, check))
        checks = [c for c in checks if c is not None]
        return BatchCheck(checks) if checks else None

    def _call_once(self, jobs: Sequence[Job], stream: torch.cuda.Stream, check: bool) -> _CallCheck | None:
        n = sum(item.num_chunks for item, _, _ in jobs)
        if n > self.max_chunks:
            raise ValueError(f"one group has {n} chunks, more than the batch decoder's {self.max_chunks}")
        r = self._next
        self._next = (r + 1) % TABLE_RING
        if self._ring_used[r]:
            self._ring_done[r].synchronize()  # its previous upload has run
        host = self._ring[r].numpy()
        m = self.max_chunks
        at = 0
        for item, src, out in jobs:
            k = item.num_chunks
            host[at : at + k] = src.data_ptr() + item.offsets
            host[m + at : m + at + k] = out.data_ptr() + item.out_offsets
            host[2 * m + at : 2 * m + at + k] = item.sizes
            host[3 * m + at : 3 * m + at + k] = item.decoded
            at += k
        with torch.cuda.stream(stream):
            self.table.copy_(self._ring[r], non_blocking=True)
        self._ring_done[r].record(stream)
        self._ring_used[r] = True
        temp = self.workspace.acquire(self.workspace_kind, stream)
        base = self.table.data_ptr()
        status = self._call(
            base,
            base + 16 * m,
            base + 24 * m,
            self.actual.data_ptr(),
            n,
            temp.data_ptr(),
            temp.numel(),
            base + 8 * m,
            self.opts,
            self.statuses.data_ptr(),
            ctypes.c_void_p(stream.cuda_stream),
        )
        self.capi.check(status, self._call.__name__)
        self.workspace.release(self.workspace_kind, stream)
        if not check:
            return None
        return self._enqueue_check(jobs, n, stream)

    def _enqueue_check(self, jobs: Sequence[Job], n: int, stream: torch.cuda.Stream) -> _CallCheck:
        crc = self.capi.crc32_library()
        max_chunk = int(max(int(item.decoded.max()) for item, _, _ in jobs if item.num_chunks))
        opts = self.capi.crc32_opts(n, max_chunk)
        with_crcs = crc is not None and opts is not None
        base = self.table.data_ptr()
        m = self.max_chunks
        if with_crcs:
            status = crc.nvcompBatchedCRC32Async(
                base + 8 * m,
                base + 24 * m,
                n,
                self.crcs.data_ptr(),
                opts,
                self.capi.CRC32_ONLY_SEGMENT,
                self.crc_statuses.data_ptr(),
                ctypes.c_void_p(stream.cuda_stream),
            )
            self.capi.check(status, "nvcompBatchedCRC32Async")
        report = torch.empty(5 * n, dtype=torch.int32, pin_memory=True)
        with torch.cuda.stream(stream):
            parts = (self.statuses, self.crc_statuses, self.crcs, self.actual.view(torch.int32))
            start = 0
            for part, count in zip(parts, (n, n, n, 2 * n), strict=True):
                report[start : start + count].copy_(part[:count], non_blocking=True)
                start += count
        ready = torch.cuda.Event()
        ready.record(stream)
        expected_sizes = np.concatenate([item.decoded for item, _, _ in jobs])
        expected_crcs = np.concatenate([item.crcs for item, _, _ in jobs])
        return _CallCheck(report, ready, n, with_crcs, expected_sizes, expected_crcs)


@dataclass
class _CallCheck:
    report: torch.Tensor
    ready: torch.cuda.Event
    n: int
    with_crcs: bool
    expected_sizes: np.ndarray
    expected_crcs: np.ndarray

    def faults(self) -> list[tuple[int, str]]:
        from offload_runtime.native.nvcomp_backend import chunk_faults

        self.ready.synchronize()
        n, report = self.n, self.report.numpy()
        return chunk_faults(
            statuses=report[:n],
            crc_statuses=report[n : 2 * n] if self.with_crcs else None,
            crcs=report[2 * n : 3 * n].view(np.uint32) if self.with_crcs else None,
            actual_sizes=report[3 * n :].view(np.int64),
            expected_sizes=self.expected_sizes,
            expected_crcs=self.expected_crcs,
        )


class BatchCheck:
    """A checked batched decode in flight; :meth:`faulty_chunks` waits for it."""

    def __init__(self, calls: list[_CallCheck]) -> None:
        self.calls = calls

    def faulty_chunks(self) -> list[tuple[int, str]]:
        """``(chunk index over the whole batch, what is wrong)`` of every faulty chunk (waits)."""
        faults, offset = [], 0
        for call in self.calls:
            faults += [(offset + i, what) for i, what in call.faults()]
            offset += call.n
        return faults
