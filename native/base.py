"""The one interface every codec implements, and the types a container stores about encoded groups.

A codec turns the bytes of a decoded group (laid out by :class:`~offload_runtime.native.layout.GroupLayout`)
into a *payload* made of independently decodable chunks, and back. The chunk table (offsets, sizes,
checksums) is stored in the container's index; ``params`` (JSON-able) record whatever the codec needs to
decode (chunk size, nvCOMP data type, quantisation scales' layout, ...).

Decoding writes into caller-owned memory: on the CPU into a uint8 tensor, on the GPU into a uint8 CUDA
tensor on a caller-given stream, asynchronously, with no host synchronisation and no allocation in the
steady state (a :class:`GpuDecoder` is built once per group at load time and reused for every decode).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from offload_runtime.native.layout import GroupLayout
from offload_runtime.native.workspace import DecodeWorkspace


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

    Subclasses set ``name`` and ``lossless`` and register themselves with :func:`register`.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool] = True

    @abstractmethod
    def encode(self, layout: GroupLayout, data: np.ndarray) -> EncodedGroup:
        """Encode ``data`` (uint8, ``layout.size`` bytes, as made by :meth:`GroupLayout.pack`)."""

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
    ) -> GpuDecoder:
        """Build the reusable GPU decoder of one group.

        Raises:
            CodecUnavailableError: when CUDA or nvCOMP is missing, naming what to install.
        """


_REGISTRY: dict[str, type[GroupCodec]] = {}


def register(cls: type[GroupCodec]) -> type[GroupCodec]:
    """Class decorator: make a codec available to :func:`offload_runtime.native.get_codec` by its name."""
    _REGISTRY[cls.name] = cls
    return cls


def registered_codecs() -> dict[str, type[GroupCodec]]:
    return dict(_REGISTRY)
