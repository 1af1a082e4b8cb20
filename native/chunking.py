"""Splitting a group's bytes into chunks, shared by the codecs."""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from offload_runtime.native.base import Chunk


def crc32(data) -> int:
    """CRC-32 (zlib polynomial) of a bytes-like object, as an unsigned int."""
    return zlib.crc32(data) & 0xFFFFFFFF


# zlib.crc32 releases the GIL on large buffers: chunk CRCs of a 1.7 GB group spread over the host's cores
CRC_THREADS = max(1, min(16, os.cpu_count() or 1))


def spans_of(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``(offset, size)`` of pieces of ``sizes`` laid back to back."""
    spans, offset = [], 0
    for n in sizes:
        spans.append((offset, n))
        offset += n
    return spans


def crc32_spans(data, spans: Sequence[tuple[int, int]]) -> list[int]:
    """CRC-32 of each ``(offset, size)`` span of ``data`` (bytes-like or uint8 array), on
    :data:`CRC_THREADS` threads when there are many spans."""
    view = memoryview(data).cast("B")
    pieces = [view[offset : offset + size] for offset, size in spans]
    if len(pieces) < 64 or CRC_THREADS == 1:
        return [crc32(p) for p in pieces]
    with ThreadPoolExecutor(CRC_THREADS) as pool:
        return list(pool.map(crc32, pieces, chunksize=max(1, len(pieces) // (4 * CRC_THREADS))))


def split(data: np.ndarray, chunk_size: int) -> list[np.ndarray]:
    """Cut ``data`` (1-D uint8) into consecutive views of at most ``chunk_size`` bytes; empty data -> []."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [data[start : start + chunk_size] for start in range(0, data.size, chunk_size)]


def check_decoded_crcs(decoded, chunks: Sequence[Chunk]) -> None:
    """Compare the CRC-32 of each chunk's decoded bytes (back to back in ``decoded``) with the chunk table.

    Args:
        decoded: bytes-like (or uint8 array) holding the chunks' decoded bytes in chunk order.
        chunks (`Sequence[Chunk]`): the chunk table.

    Raises:
        CorruptCheckpointError: at the first chunk whose decoded bytes differ, naming it (the caller adds
            the file and group).
    """
    from offload_runtime.errors import CorruptCheckpointError

    view = memoryview(decoded).cast("B")
    position = 0
    for index, chunk in enumerate(chunks):
        actual = crc32(view[position : position + chunk.decoded_size])
        if actual != chunk.decoded_crc32:
            raise CorruptCheckpointError(
                "decoded chunk CRC-32 mismatch",
                chunk=index,
                expected=f"{chunk.decoded_crc32:#010x}",
                actual=f"{actual:#010x}",
                hint="the container is damaged; re-pack it",
            )
        position += chunk.decoded_size
