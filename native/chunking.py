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


CRC_PIECE = 8 << 20  # spans longer than this are cut into pieces CRC'd on several threads, then combined
_CRC_POLY = 0xEDB88320  # zlib's, bit-reflected


def _multmodp(a: int, b: int) -> int:
    """``a * b`` modulo the CRC polynomial (bit-reflected: zlib's ``multmodp``)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if (a & (m - 1)) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _CRC_POLY if b & 1 else b >> 1


_X2N = [1 << 30]  # x^(2^k) modulo the polynomial, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)`` (zlib's ``crc32_combine``,
    which Python's zlib does not expose)."""
    n, k, power = length2, 3, 1 << 31  # x^(8 * length2): shifting A's CRC past B's bytes
    while n:
        if n & 1:
            power = _multmodp(_X2N[k & 31], power)
        n >>= 1
        k += 1
    return _multmodp(power, crc1) ^ crc2


def crc32_spans(data, spans: Sequence[tuple[int, int]]) -> list[int]:
    """CRC-32 of each ``(offset, size)`` span of ``data`` (bytes-like or uint8 array). Many spans, or long
    ones, spread over :data:`CRC_THREADS` threads: a long span as :data:`CRC_PIECE`-byte pieces whose CRCs
    are combined (one 470 MB weight of a 70 B layer would otherwise take one core ~0.2 s)."""
    view = memoryview(data).cast("B")
    total = sum(size for _, size in spans)
    if CRC_THREADS == 1 or (len(spans) < 64 and total < 2 * CRC_PIECE):
        return [crc32(view[offset : offset + size]) for offset, size in spans]
    pieces, owners = [], []
    for which, (offset, size) in enumerate(spans):
        for start in range(offset, offset + size, CRC_PIECE):
            pieces.append(view[start : min(start + CRC_PIECE, offset + size)])
            owners.append(which)
    with ThreadPoolExecutor(CRC_THREADS) as pool:
        crcs = list(pool.map(crc32, pieces, chunksize=max(1, len(pieces) // (4 * CRC_THREADS))))
    out = [0] * len(spans)  # an empty span's CRC is 0, and combining onto 0 gives the piece's own
    for which, piece, crc in zip(owners, pieces, crcs, strict=True):
        out[which] = crc32_combine(out[which], crc, len(piece))
    return out


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
