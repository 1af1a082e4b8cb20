"""The one interface every codec implements, and the types a container stores about encoded groups.

A codec turns the bytes of a decoded group (laid out by :class:`~offload_runtime.native.layout.GroupLayout`)
into a *payload* made of independently decodable chunks, and back. The chunk table (offsets, sizes,
checksums) is stored in the container's index; ``params`` (JSON-able) record whatever the codec needs to
decode (chunk size, nvCOMP data type, quantisation scales' layout, ...).

Decoding writes into caller-owned memory: on the CPU into a uint8 tensor, on the GPU into a uint8 CUDA
tensor on a caller-given stream, asynchronously, with no host synchronisation and no allocation in the
steady state (a :class:`GpuDecoder` is built once per group at load time and reused for every decode).

Codec knowledge stays here: what a codec can do is asked of the codec (``decodes_on_cpu``,
``encodes_on_device``), the device memory of its GPU decoder is a pure query
(:meth:`GroupCodec.gpu_decoder_sizes`, no allocation) and the decoder takes that memory from the caller's
allocator, so a runtime can size every byte in its plan and hand the decoder pieces of its one arena.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from offload_runtime.native.layout import GroupLayout
from offload_runtime.native.workspace import Allocate, DecodeWorkspace, device_allocator


@dataclass(frozen=True)
class Chunk:
    """One independently decodable piece of a group's payload.

    Attributes:
        offset: byte offset of the compressed chunk inside the group's payload.
        size: compressed bytes.
        decoded_size: bytes it decodes to; chunks decode back to back into the group buffer.
        crc32: CRC-32 (zlib) of the compressed bytes: checked before any decoder sees them.
        decoded_crc32: CRC-32 of the decoded bytes: catches a corruption that still decodes.
    """

    offset: int
    size: int
    decoded_size: int
    crc32: int
    decoded_crc32: int

    def to_json(self) -> list[int]:
        return [self.offset, self.size, self.decoded_size, self.crc32, self.decoded_crc32]

    @classmethod
    def from_json(cls, row: Sequence[int]) -> Chunk:
        offset, size, decoded_size, crc, dcrc = (int(v) for v in row)
        return cls(offset, size, decoded_size, crc, dcrc)


@dataclass
class EncodedGroup:
    """What :meth:`GroupCodec.encode` returns.

    Attributes:
        payload: the compressed bytes (uint8, contiguous), chunks at the offsets of ``chunks``.
        chunks: the chunk table, in decode order; decoded sizes add up to the stored layout's size.
        params: JSON-able parameters the decoder needs; stored in the index as the group's codec params.
        stored_layout: for lossy codecs, the layout of what the chunks decode to (e.g. int8 values and
            fp32 scales) when it differs from the group's layout; ``None`` when they decode to the layout.
    """

    payload: np.ndarray
    chunks: list[Chunk]
    params: dict[str, Any] = field(default_factory=dict)
    stored_layout: GroupLayout | None = None


@dataclass(frozen=True)
class DecoderSizes:
    """Device memory one group's GPU decoder needs, known without allocating anything.

    Attributes:
        pieces: sizes of the allocations the decoder makes through its ``allocate`` for itself (chunk size,
            status and pointer arrays), in the order it makes them; they live as long as the decoder.
        workspace: ``(kind, bytes)`` pairs of shared workspace one decode needs (nvCOMP temp space, int8's
            stored bytes); only live during a decode, so decoders sharing a workspace pay the largest once.
    """

    pieces: tuple[int, ...] = ()
    workspace: tuple[tuple[str, int], ...] = ()


@dataclass
class EncodedTensor:
    """An encoding made from a group buffer that may live on a device (:meth:`GroupCodec.encode_tensor`).

    Attributes:
        chunks, params, stored_layout: as in :class:`EncodedGroup`.
        stored_size: payload bytes.
        write: copies the compact payload (``stored_size`` bytes) into a 1-D uint8 CPU tensor.
    """

    chunks: list[Chunk]
    params: dict[str, Any]
    stored_layout: GroupLayout | None
    stored_size: int
    write: Callable[[torch.Tensor], None]


class HostBuffer:
    """A host buffer reused one group after another (what device encoders copy back, the ``host_buffer`` of
    :meth:`GroupCodec.encode_tensor`; a payload read at dispatch on its way to the device): grown on
    demand, pinned when ``pinned``, so the pinning (~0.5 s/GB) is paid for the largest group once, not for
    every group. A caller reuses it only once the copy that read the previous contents is done."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._buffer: torch.Tensor | None = None

    def __call__(self, nbytes: int) -> torch.Tensor:
        """A uint8 host tensor of at least ``nbytes`` (the same memory as the last call's, when it fits)."""
        if self._buffer is None or self._buffer.numel() < nbytes:
            self._buffer = None  # free the old one first
            self._buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
        return self._buffer

    def release(self) -> None:
        """Free the buffer (a later call allocates it again)."""
        self._buffer = None


class GpuDecoder(ABC):
    """Decodes one group on a CUDA device; built once (caches nvCOMP configs), then reused.

    Device memory comes in two parts. ``scratch_bytes`` is what this decoder holds for its group alone
    (chunk size/pointer/status arrays): every streamed group's decoder pays it. ``workspace_needs`` is
    scratch that is only live during a decode (nvCOMP's temp workspace, int8's stored bytes): it comes
    from a :class:`~offload_runtime.native.workspace.DecodeWorkspace`, one buffer per kind shared by all
    decoders bound to it (:meth:`use_workspace`), so a budget pays the largest need of each kind once.
    A decoder not bound to a shared workspace uses a private one.

    Attributes:
        scratch_bytes: device bytes this decoder holds for its group beyond the output and the workspace.
        workspace_needs: shared-workspace bytes per kind one decode needs (``{}`` when none).
        workspace: the workspace decodes draw their temporary scratch from (``None`` when none is needed).
    """

    scratch_bytes: int = 0
    workspace_needs: Mapping[str, int] = {}  # read-only default; decoders assign their own dict
    workspace: DecodeWorkspace | None = None

    @property
    def shared_workspace_bytes(self) -> int:
        """Bytes this decoder draws from its workspace per decode (all kinds)."""
        return sum(self.workspace_needs.values())

    def use_workspace(self, workspace: DecodeWorkspace) -> None:
        """Draw temporary scratch from ``workspace`` (shared with other decoders) from now on.

        Decodes of decoders sharing a workspace must be enqueued in order on one stream (the workspace
        makes a decode on another stream wait, on the device, for the previous one) from one host thread.
        """
        workspace.reserve(self.workspace_needs)
        self.workspace = workspace

    @abstractmethod
    def decode(
        self, src: torch.Tensor, out: torch.Tensor, stream: torch.cuda.Stream, check: bool = False
    ) -> Any:
        """Enqueue the decode of the payload ``src`` (uint8, CUDA) into ``out`` (uint8, CUDA) on ``stream``.

        Must not synchronise the host, and must not allocate after the first call. With ``check``, also
        enqueue a check of the decoded bytes against the chunk table (decoder statuses, sizes, decoded
        CRC-32s, on the GPU) and return an object whose ``result()`` waits for it and raises
        ``CorruptCheckpointError`` naming the chunk; return ``None`` when there is nothing beyond the
        payload's own checksums to check (a plain copy).
        """


class GroupCodec(ABC):
    """A codec for whole groups.

    Subclasses set ``name`` and ``lossless`` and register themselves with :func:`register`; the class
    attributes below say what the codec can do, so code outside ``native/`` never switches on codec names.

    Attributes:
        encodes_on_device: :meth:`encode_tensor` encodes a CUDA buffer on its device (no host round trip).
        requires_gpu: encoding and decoding both need CUDA and nvCOMP (``ans``).
        stores_verbatim: chunks are the decoded bytes themselves, back to back (``raw``): the container
            validator then requires ``size == decoded_size`` and contiguous offsets.
        executes_compressed: kernels compute from the stored payload itself (``fused12``):
            :meth:`compute_views` gives each tensor in the form they take.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool] = True
    encodes_on_device: ClassVar[bool] = False
    requires_gpu: ClassVar[bool] = False
    stores_verbatim: ClassVar[bool] = False
    executes_compressed: ClassVar[bool] = False

    def decodes_on_cpu(self, params: Mapping[str, Any]) -> bool:
        """Whether a group stored with ``params`` has a CPU decoder (``int8`` asks its inner codec)."""
        return not self.requires_gpu

    def gpu_decoder_sizes(
        self, chunks: Sequence[Chunk], params: Mapping[str, Any], layout: GroupLayout
    ) -> DecoderSizes:
        """Device memory :meth:`gpu_decoder` will take for this group, without allocating (no device needed
        for codecs without per-group device state; nvCOMP's temp size is a host-only library query)."""
        return DecoderSizes()

    def compute_views(
        self, payload: torch.Tensor, params: Mapping[str, Any], layout: GroupLayout, chunks: Sequence[Chunk]
    ) -> dict[str, Any]:
        """Zero-copy views of every tensor of a payload held on a device, in the form kernels compute from
        (codecs that ``executes_compressed``): a tensor stored in a compute format maps to its format's
        object, any other to a typed tensor view."""
        raise NotImplementedError(f"codec {self.name!r} does not execute compressed")

    def compute_tensors(
        self, params: Mapping[str, Any], layout: GroupLayout, chunks: Sequence[Chunk]
    ) -> set[str]:
        """Names of the tensors :meth:`compute_views` gives in a compute format (not as plain tensors)."""
        return set()

    def compute_scratch_bytes(
        self, params: Mapping[str, Any], layout: GroupLayout, chunks: Sequence[Chunk]
    ) -> int:
        """Device bytes a group executed compressed may need besides its payload, held by the kernels'
        wrapper (for ``fused12``: a long input decodes one weight to bf16 and multiplies with cuBLAS)."""
        return 0

    def batch_decoder_sizes(self, max_chunks: int, max_chunk_bytes: int) -> DecoderSizes | None:
        """Device memory of :meth:`batch_decoder` (a pure query), or ``None`` when the codec has none."""
        return None

    def batch_decoder(
        self, max_chunks: int, max_chunk_bytes: int, device: torch.device, allocate: Allocate | None = None
    ) -> Any:
        """A :class:`~offload_runtime.native.batch_decode.BatchDecoder` decoding many groups' chunks per
        call, each chunk to its own address (expert runtimes), or ``None`` when the codec has none."""
        return None

    def encode_tensor(
        self,
        layout: GroupLayout,
        held: list[torch.Tensor],
        checksums: bool = True,
        host_buffer: Callable[[int], torch.Tensor] | None = None,
    ) -> EncodedTensor:
        """Encode the group bytes ``held.pop()`` (uint8, on any device; popped so the caller keeps no
        reference and the buffer is freed as soon as the encoder is done with it).

        The default copies the bytes to the host and calls :meth:`encode`; codecs that encode on the device
        override it. ``checksums=False`` may skip the chunk CRCs (a caller that compares the payload with an
        earlier encoding's CRCs does not need them). ``host_buffer(nbytes)`` lends a reusable (pinned) host
        buffer for what a device encoder copies back; ``None``: allocate.
        """
        data = held.pop()
        host = data.cpu() if data.device.type != "cpu" else data
        del data
        encoded = self.encode(layout, host.numpy())
        payload = torch.from_numpy(np.ascontiguousarray(encoded.payload))

        def write(dest: torch.Tensor) -> None:
            dest.copy_(payload)

        return EncodedTensor(
            list(encoded.chunks), dict(encoded.params), encoded.stored_layout, int(payload.numel()), write
        )

    @abstractmethod
    def encode(self, layout: GroupLayout, data: np.ndarray) -> EncodedGroup:
        """Encode ``data`` (uint8, ``layout.size`` bytes, as made by :meth:`GroupLayout.pack`)."""

    def check_params(
        self, params: Mapping[str, Any], layout: GroupLayout, chunks: Sequence[Chunk], stored_size: int
    ) -> None:
        """Validate a container's (untrusted) ``params`` against the group's layout and chunk table.

        Called by the container validator when a container is opened, before any payload byte is read;
        the default accepts anything (codecs whose params hold no offsets or sizes).

        Raises:
            CorruptCheckpointError: naming the chunk and what is wrong (the validator adds file and group).
        """
        return None

    @abstractmethod
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
        """Decode ``payload`` into ``out`` (uint8 CPU tensor of ``layout.size`` bytes).

        Args:
            verify_decoded (`bool`, defaults to `False`): check each chunk's decoded bytes against its
                ``decoded_crc32`` (for lossy codecs: the stored bytes the chunks decode to, before the
                transform back to the layout).

        Raises:
            CodecUnavailableError: when this codec has no CPU decoder (nvCOMP ANS).
            CorruptCheckpointError: a chunk that does not decode, or (``verify_decoded``) whose decoded
                CRC-32 differs, naming the chunk.
        """

    @abstractmethod
    def gpu_decoder(
        self,
        chunks: Sequence[Chunk],
        params: Mapping[str, Any],
        layout: GroupLayout,
        device: torch.device,
        allocate: Allocate | None = None,
    ) -> GpuDecoder:
        """Build the reusable GPU decoder of one group.

        Args:
            allocate (*optional*): where the decoder's own device arrays come from (``nbytes -> uint8
                tensor``, e.g. pieces of a runtime's arena), in the sizes :meth:`gpu_decoder_sizes` reports;
                ``None`` allocates them from torch.

        Raises:
            CodecUnavailableError: when CUDA or nvCOMP is missing, naming what to install.
        """


def check_cpu_output(out: torch.Tensor, size: int) -> None:
    """Refuse an output :meth:`GroupCodec.decode_cpu` cannot write ``size`` bytes into through numpy.

    Raises:
        ValueError: unless ``out`` is a 1-D uint8 CPU tensor of at least ``size`` elements.
    """
    if out.dtype != torch.uint8 or out.dim() != 1 or out.device.type != "cpu" or out.numel() < size:
        got = f"{out.dtype} {tuple(out.shape)} on {out.device}"
        raise ValueError(f"need a 1-D uint8 CPU output of >= {size} bytes, got {got}")


def allocator_or_default(allocate: Allocate | None, device: torch.device) -> Allocate:
    """``allocate``, or plain torch allocations on ``device`` when none is given."""
    return allocate if allocate is not None else device_allocator(device)


_REGISTRY: dict[str, type[GroupCodec]] = {}


def register(cls: type[GroupCodec]) -> type[GroupCodec]:
    """Class decorator: make a codec available to :func:`offload_runtime.native.get_codec` by its name."""
    _REGISTRY[cls.name] = cls
    return cls


def registered_codecs() -> dict[str, type[GroupCodec]]:
    return dict(_REGISTRY)
