"""CRC-32 of chunk spans (native/chunking.py): long spans cut into pieces on threads, CRCs combined."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from offload_runtime.native import chunking


@pytest.mark.parametrize("left, right", [(0, 0), (0, 5), (5, 0), (1, 1), (1000, 777), (4096, 65537)])
def test_combine_equals_the_crc_of_the_concatenation(left, right):
    data = np.random.default_rng(left + right).integers(0, 256, left + right, dtype=np.uint8)
    a, b = data[:left], data[left:]
    assert chunking.crc32_combine(zlib.crc32(a), zlib.crc32(b), right) == zlib.crc32(data)


def test_long_spans_are_cut_into_pieces_and_combined(monkeypatch):
    """Pieces of 1 KiB on 4 threads: spans of 0 bytes, less than a piece, exactly pieces, and a ragged tail,
    overlapping and out of order, each equal to zlib's CRC of the whole span."""
    monkeypatch.setattr(chunking, "CRC_PIECE", 1024)
    monkeypatch.setattr(chunking, "CRC_THREADS", 4)
    data = np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8)
    spans = [(0, 20_000), (7, 0), (100, 1000), (2048, 4096), (19_000, 1000), (3, 10_001), (5, 1024)]
    cut = []
    real_crc = chunking.crc32

    def counting(piece):
        cut.append(len(piece))
        return real_crc(piece)

    monkeypatch.setattr(chunking, "crc32", counting)
    got = chunking.crc32_spans(data, spans)
    assert got == [zlib.crc32(data[o : o + n]) for o, n in spans]
    assert max(cut) == 1024 and len(cut) > len(spans)  # really cut, and no piece longer than CRC_PIECE
