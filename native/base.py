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

    Attributes:
        scratch_bytes: device memory it holds or needs per decode beyond the output (counted in budgets).
    """

    scratch_bytes: int = 0

    @abstractmethod
    def decode(self, src: torch.Tensor, out: torch.Tensor, stream: torch.cuda.Stream) -> None:
        """Enqueue the decode of the payload ``src`` (uint8, CUDA) into ``out`` (uint8, CUDA) on ``stream``.

        Must not synchronise the host, and must not allocate after the first call.
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
    ) -> None:
        """Decode ``payload`` into ``out`` (uint8 CPU tensor of ``layout.size`` bytes).

        Raises:
            CodecUnavailableError: when this codec has no CPU decoder (nvCOMP ANS).
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
