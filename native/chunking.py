"""Splitting a group's bytes into chunks, shared by the codecs."""

from __future__ import annotations

import zlib

import numpy as np


def crc32(data) -> int:
    """CRC-32 (zlib polynomial) of a bytes-like object, as an unsigned int."""
    return zlib.crc32(data) & 0xFFFFFFFF


def split(data: np.ndarray, chunk_size: int) -> list[np.ndarray]:
    """Cut ``data`` (1-D uint8) into consecutive views of at most ``chunk_size`` bytes; empty data -> []."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return [data[start : start + chunk_size] for start in range(0, data.size, chunk_size)]
