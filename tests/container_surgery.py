"""Test helpers that edit a container's header in place, to forge the bad inputs the reader must refuse."""

import json
import struct

from offload_runtime.loaders.format import INDEX_CRC_KEY, INDEX_KEY, PAYLOAD_ALIGN, index_crc32


def split_header(path):
    """``(header dict, data bytes)`` of the safetensors file at ``path``."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def rewrite_header(path, edit_header=None, edit_index=None, reseal=True):
    """Re-encode the header after ``edit_header(header)`` / ``edit_index(index)``, keeping the data.

    ``reseal`` stores the edited index's checksum, so the edit reaches the check a test is aimed at (a
    damaged index with its original checksum is refused when the container opens).
    """
    header, data = split_header(path)
    index = json.loads(header["__metadata__"][INDEX_KEY])
    if edit_index:
        edit_index(index)
    header["__metadata__"][INDEX_KEY] = json.dumps(index)
    if reseal and INDEX_CRC_KEY in header["__metadata__"]:
        header["__metadata__"][INDEX_CRC_KEY] = index_crc32(header["__metadata__"][INDEX_KEY])
    if edit_header:
        edit_header(header)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % PAYLOAD_ALIGN)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
