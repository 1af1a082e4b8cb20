"""GPU decode of a ``fused12`` group into a slot (today's decode-to-slot path), with an optional check.

Per decode, on the caller's stream: one decode kernel and, when the tensor has escapes, one patch kernel
per planes tensor (:mod:`~offload_runtime.native.fused12_decode_kernel`), a device copy per verbatim
tensor, and a fill of the padding between tensors (the slot may hold another group's bytes). No host
synchronisation; views of the payload and the slot are built on first use of each buffer and cached, so
the steady state allocates nothing. ``check=True`` copies the decoded bytes to a pinned host buffer
(allocated by the first checked decode) and returns a :class:`HostCrcCheck` whose ``result()`` waits for
the copy and compares each chunk's CRC-32 with the index.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from offload_runtime.errors import CodecUnavailableError
from offload_runtime.native.base import Chunk, GpuDecoder
from offload_runtime.native.chunking import check_decoded_crcs
from offload_runtime.native.layout import GroupLayout

VIEW_CACHE = 4  # payload/slot buffers whose views are kept (a group cycles through a few slots)


def require_triton() -> None:
    """Raise :class:`CodecUnavailableError` unless CUDA and Triton are usable here."""
    missing = None
    if not torch.cuda.is_available():
        missing = "CUDA (torch.cuda.is_available() is False)"
    else:
        try:
            import triton  # noqa: F401
        except ImportError:
            missing = "triton (pip install triton)"
    if missing is not None:
        raise CodecUnavailableError(
            "codec 'fused12' decodes on the GPU with Triton kernels",
            codec="fused12",
            missing=missing,
            alternative="decode it on the CPU (device='cpu') or re-pack with --codec zstd",
        )


class HostCrcCheck:
    """A checked decode in flight: :meth:`result` waits for the copy of the decoded bytes, then checks CRCs.

    One per decoder at a time (the host buffer is the decoder's): resolve it before the next checked decode.
    """

    def __init__(self, host: torch.Tensor, ready: torch.cuda.Event, chunks: Sequence[Chunk]) -> None:
        self.host = host
        self.ready = ready
        self.chunks = chunks

    def result(self) -> None:
        """Raises:
        CorruptCheckpointError: naming the first chunk whose decoded CRC-32 differs from the index."""
        self.ready.synchronize()
        check_decoded_crcs(self.host.numpy(), self.chunks)


class Fused12GpuDecoder(GpuDecoder):
    """Decodes one ``fused12`` group into a slot; built once per group, reused for every load."""

    def __init__(self, entries, chunks: Sequence[Chunk], layout: GroupLayout, device: torch.device) -> None:
        from offload_runtime.native.fused12 import PLANES, decoded_ranges

        self.entries = entries
        self.chunks = list(chunks)
        self.layout = layout
        self.device = (
            device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        )
        self.payload_end = max((e.end for e in entries), default=0)
        self.planes_names = {e.spec.name for e in entries if e.kind == PLANES}
        self.gaps = [
            (begin + e.spec.nbytes, stop)
            for e, (begin, stop) in zip(entries, decoded_ranges(layout), strict=True)
            if stop > begin + e.spec.nbytes
        ]
        self.scratch_bytes = 0
        self.workspace_needs = {}
        self._src_views: OrderedDict[int, dict] = OrderedDict()
        self._out_views: OrderedDict[int, dict] = OrderedDict()
        self._host: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None

    def _views(self, cache: OrderedDict, key: int, build):
        views = cache.get(key)
        if views is None:
            views = cache[key] = build()
            if len(cache) > VIEW_CACHE:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        return views

    def decode(self, src: torch.Tensor, out: torch.Tensor, stream: torch.cuda.Stream, check: bool = False):
        from offload_runtime.native.fused12 import entry_views
        from offload_runtime.native.fused12_decode_kernel import decode_into

        for tensor, what, needed in ((src, "payload", self.payload_end), (out, "output", self.layout.size)):
            if tensor.device != self.device or tensor.dtype != torch.uint8 or not tensor.is_contiguous():
                raise ValueError(f"fused12 decode needs a contiguous uint8 {what} on {self.device}")
            if tensor.numel() < needed or tensor.data_ptr() % 16:
                raise ValueError(f"fused12 decode needs a 16-byte aligned {what} of >= {needed} bytes")
        source = self._views(self._src_views, src.data_ptr(), lambda: entry_views(src, self.entries))
        target = self._views(self._out_views, out.data_ptr(), lambda: self.layout.views(out))
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            for entry in self.entries:
                name = entry.spec.name
                if name in self.planes_names:
                    decode_into(source[name], target[name])
                elif entry.spec.nbytes:
                    target[name].copy_(source[name], non_blocking=True)
            for begin, stop in self.gaps:
                out[begin:stop].zero_()
            if not check:
                return None
            if self._host is None:
                self._host = torch.empty(self.layout.size, dtype=torch.uint8, pin_memory=True)
                self._ready = torch.cuda.Event()
            self._host.copy_(out[: self.layout.size], non_blocking=True)
            self._ready.record(stream)
        return HostCrcCheck(self._host, self._ready, self.chunks)
