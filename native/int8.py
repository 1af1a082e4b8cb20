"""``int8``: lossy per-output-channel symmetric INT8 for 2-D float weights, everything else lossless.

Each floating 2-D tensor ``w`` [out, in] is stored as ``q = round(w / scale)`` (int8 in [-127, 127]) and
``scale = max|w[row]| / 127`` (fp32, one per output channel), so every decoded element is within
``scale / 2`` of the original (plus the rounding of the compute dtype). Other tensors (biases, norms, int
buffers, 1-D or 3-D+ tensors) are stored unchanged. The stored bytes are then compressed by an inner
lossless codec: ``ans`` when CUDA and nvCOMP are present, else ``zstd``.

The stored layout is a pure function of the group's layout (:func:`stored_layout_for`), so decoders need
nothing beyond the group layout and ``params``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from offload_runtime.errors import CodecUnavailableError, CorruptCheckpointError
from offload_runtime.native.base import (
    Chunk,
    DecoderSizes,
    EncodedGroup,
    EncodedTensor,
    GpuDecoder,
    GroupCodec,
    register,
    registered_codecs,
)
from offload_runtime.native.layout import GroupLayout, TensorSpec
from offload_runtime.native.workspace import Allocate

SCALE_SUFFIX = ".__scale__"
STORED_KIND = "int8-stored"  # workspace kind of the decoded (int8 + scales) bytes awaiting dequantisation
QUANTISE_BLOCK_ELEMENTS = 1 << 25  # rows quantised at a time on a device: ~0.5 GB of fp32 temporaries
INT8_MAX = 127  # symmetric: -128 is never used, so negating a row never overflows
_FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})


def is_quantised(spec: TensorSpec) -> bool:
    """True for the tensors ``int8`` quantises: floating, 2-D, non-empty."""
    return spec.dtype in _FLOAT_DTYPES and len(spec.shape) == 2 and spec.numel > 0


def stored_layout_for(layout: GroupLayout) -> GroupLayout:
    """The layout of what ``int8`` stores for ``layout``: int8 values + fp32 row scales, others as is."""
    named: list[tuple[str, torch.Tensor]] = []
    for spec in layout.tensors:
        if is_quantised(spec):
            named.append((spec.name, torch.empty(spec.shape, dtype=torch.int8, device="meta")))
            named.append(
                (spec.name + SCALE_SUFFIX, torch.empty(spec.shape[0], dtype=torch.float32, device="meta"))
            )
        else:
            named.append((spec.name, torch.empty(spec.shape, dtype=spec.torch_dtype, device="meta")))
    return GroupLayout.from_tensors(named)


def quantise_rows(weight: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric INT8 of a 2-D float tensor: ``(q int8, scale fp32)``; zero rows get scale 1.

    Raises:
        ValueError: when ``weight`` holds NaN or infinity (no finite scale exists), naming the tensor.
    """
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).any(dim=1).nonzero()[0])
        raise ValueError(
            f"int8 cannot quantise {name!r}: row {bad} holds NaN or infinity; use a lossless codec"
        )
    scale = w.abs().amax(dim=1) / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row decodes to zeros anyway
    q = torch.round(w / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def _inner_codec(name: str) -> GroupCodec:
    cls = registered_codecs().get(name)
    if cls is None or name == "int8":
        raise CodecUnavailableError(
            f"int8 cannot use {name!r} as its inner lossless codec",
            codec="int8",
            missing=name,
            alternative="zstd",
        )
    return cls()


def default_inner() -> str:
    """``"ans"`` when CUDA, nvCOMP and libnvcomp are usable here, else ``"zstd"``."""
    from offload_runtime.native.availability import gpu_codecs_unavailable_reason

    if gpu_codecs_unavailable_reason() is not None:
        return "zstd"
    from offload_runtime.native.nvcomp_capi import library

    return "ans" if library() is not None else "zstd"


@register
class Int8Codec(GroupCodec):
    """Per-output-channel INT8 weights stored through an inner lossless codec.

    Args:
        inner (`str`, *optional*): ``"ans"``, ``"zstd"`` or ``"raw"``; ``None`` picks ``"ans"`` when a
            GPU with nvCOMP is present, else ``"zstd"``.
    """

    name = "int8"
    lossless = False

    def __init__(self, inner: str | None = None) -> None:
        self.inner = inner

    def encode(self, layout: GroupLayout, data: np.ndarray) -> EncodedGroup:
        inner_name = self.inner or default_inner()
        inner = _inner_codec(inner_name)
        source = layout.views(torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8)))
        stored: dict[str, torch.Tensor] = {}
        for spec in layout.tensors:
            if is_quantised(spec):
                q, scale = quantise_rows(source[spec.name], spec.name)
                stored[spec.name], stored[spec.name + SCALE_SUFFIX] = q, scale
            else:
                stored[spec.name] = source[spec.name]
        stored_layout = stored_layout_for(layout)
        encoded = inner.encode(stored_layout, stored_layout.pack(stored))
        params = {"inner": inner_name, "inner_params": encoded.params, "scale_dtype": "float32"}
        return EncodedGroup(encoded.payload, encoded.chunks, params, stored_layout)

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
        stored_layout = _checked_stored_layout(layout, chunks)
        scratch = torch.empty(stored_layout.size, dtype=torch.uint8)
        inner = _inner_codec(str(params["inner"]))
        # the chunks' decoded CRCs are of the stored (int8 + scales) bytes: check them before dequantising
        inner.decode_cpu(
            payload,
            chunks,
            params.get("inner_params", {}),
            stored_layout,
            scratch,
            verify_decoded=verify_decoded,
        )
        dequantise(layout, stored_layout.views(scratch), layout.views(out))

    def decodes_on_cpu(self, params: Mapping[str, Any]) -> bool:
        return _inner_codec(str(params.get("inner", "zstd"))).decodes_on_cpu(params.get("inner_params", {}))

    def gpu_decoder_sizes(
        self, chunks: Sequence[Chunk], params: Mapping[str, Any], layout: GroupLayout
    ) -> DecoderSizes:
        stored_layout = _checked_stored_layout(layout, chunks)
        inner = _inner_codec(str(params["inner"]))
        sizes = inner.gpu_decoder_sizes(chunks, params.get("inner_params", {}), stored_layout)
        return DecoderSizes(sizes.pieces, (*sizes.workspace, (STORED_KIND, stored_layout.size)))

    def gpu_decoder(
        self,
        chunks: Sequence[Chunk],
        params: Mapping[str, Any],
        layout: GroupLayout,
        device: torch.device,
        allocate: Allocate | None = None,
    ) -> GpuDecoder:
        stored_layout = _checked_stored_layout(layout, chunks)
        inner = _inner_codec(str(params["inner"]))
        inner_decoder = inner.gpu_decoder(
            chunks, params.get("inner_params", {}), stored_layout, device, allocate
        )
        return _Int8GpuDecoder(inner_decoder, layout, stored_layout, torch.device(device))

    def encode_tensor(
        self,
        layout: GroupLayout,
        held: list[torch.Tensor],
        checksums: bool = True,
        host_buffer: Callable[[int], torch.Tensor] | None = None,
    ) -> EncodedTensor:
        """Quantise on the buffer's device, then encode with the inner codec there (``ans`` on the GPU).

        Same bytes as :meth:`encode`: rows are quantised independently, so doing it in blocks of rows
        (bounded fp32 temporaries next to a full GPU) changes nothing.
        """
        data = held.pop()
        inner_name = self.inner or default_inner()
        stored_layout = stored_layout_for(layout)
        stored = [torch.zeros(stored_layout.size, dtype=torch.uint8, device=data.device)]
        source, target = layout.views(data), stored_layout.views(stored[0])
        for spec in layout.tensors:
            if not is_quantised(spec):
                target[spec.name].copy_(source[spec.name])
                continue
            rows = max(1, QUANTISE_BLOCK_ELEMENTS // spec.shape[1])
            for start in range(0, spec.shape[0], rows):
                q, scale = quantise_rows(source[spec.name][start : start + rows], spec.name)
                target[spec.name][start : start + rows].copy_(q)
                target[spec.name + SCALE_SUFFIX][start : start + rows].copy_(scale)
                del q, scale
        del data, source, target
        inner = _inner_codec(inner_name).encode_tensor(stored_layout, stored, checksums, host_buffer)
        params = {"inner": inner_name, "inner_params": inner.params, "scale_dtype": "float32"}
        return EncodedTensor(inner.chunks, params, stored_layout, inner.stored_size, inner.write)


def _checked_stored_layout(layout: GroupLayout, chunks: Sequence[Chunk]) -> GroupLayout:
    stored_layout = stored_layout_for(layout)
    decoded = sum(c.decoded_size for c in chunks)
    if decoded != stored_layout.size:
        raise CorruptCheckpointError(
            "int8 chunks do not decode to the stored layout of this group",
            expected=f"{stored_layout.size} bytes",
            actual=f"{decoded} bytes",
            hint="the container's layout and chunk table disagree; re-pack it",
        )
    return stored_layout


def dequantise(
    layout: GroupLayout, stored: Mapping[str, torch.Tensor], out: Mapping[str, torch.Tensor]
) -> None:
    """Write each tensor of ``layout`` into ``out`` (views), dequantising the int8 ones.

    ``torch.mul(..., out=)`` computes in fp32 and rounds once into the compute dtype, without a temporary.
    """
    for spec in layout.tensors:
        if is_quantised(spec):
            torch.mul(stored[spec.name], stored[spec.name + SCALE_SUFFIX][:, None], out=out[spec.name])
        else:
            out[spec.name].copy_(stored[spec.name], non_blocking=True)


class _Int8GpuDecoder(GpuDecoder):
    """Inner decode into a workspace buffer of the stored bytes, then dequantise with torch ops on the stream.

    The stored-bytes buffer is only live during a decode, so it comes from the (shared) workspace as kind
    :data:`STORED_KIND`, like the inner decoder's nvCOMP scratch.
    """

    def __init__(
        self, inner: GpuDecoder, layout: GroupLayout, stored_layout: GroupLayout, device: torch.device
    ) -> None:
        from offload_runtime.native.workspace import DecodeWorkspace

        self.inner = inner
        self.layout = layout
        self.stored_layout = stored_layout
        self.scratch_bytes = inner.scratch_bytes
        self.workspace_needs = {**inner.workspace_needs, STORED_KIND: stored_layout.size}
        self.use_workspace(DecodeWorkspace(device))  # private until the runtime binds a shared one
        self._views_of: tuple[int, dict[str, torch.Tensor]] | None = None

    def use_workspace(self, workspace) -> None:
        super().use_workspace(workspace)
        self.inner.use_workspace(workspace)

    def _stored_views(self, buffer: torch.Tensor) -> dict[str, torch.Tensor]:
        # views are rebuilt only when the workspace buffer changes (bound to another workspace, grown)
        if self._views_of is None or self._views_of[0] != buffer.data_ptr():
            self._views_of = (buffer.data_ptr(), self.stored_layout.views(buffer[: self.stored_layout.size]))
        return self._views_of[1]

    def decode(self, src: torch.Tensor, out: torch.Tensor, stream: torch.cuda.Stream, check: bool = False):
        buffer = self.workspace.acquire(STORED_KIND, stream)
        stored = buffer[: self.stored_layout.size]
        # the chunk table describes the stored bytes: they are checked before dequantising, in stream order
        report = self.inner.decode(src, stored, stream, check)
        with torch.cuda.stream(stream):
            dequantise(self.layout, self._stored_views(buffer), self.layout.views(out))
        self.workspace.release(STORED_KIND, stream)
        return report
