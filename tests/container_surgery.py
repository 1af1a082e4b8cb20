"""Test helpers that edit a container's header in place, to forge the bad inputs the reader must refuse."""

import json
import struct

from offload_runtime.loaders.format import INDEX_KEY, PAYLOAD_ALIGN


def split_header(path):
    """``(header dict, data bytes)`` of the safetensors file at ``path``."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def rewrite_header(path, edit_header=None, edit_index=None):
    """Re-encode the header after ``edit_header(header)`` / ``edit_index(index)``, keeping the data."""
    header, data = split_header(path)
    index = json.loads(header["__metadata__"][INDEX_KEY])
    if edit_index:
        edit_index(index)
    header["__metadata__"][INDEX_KEY] = json.dumps(index)
    if edit_header:
        edit_header(header)
    text = json.dumps(header).encode()
    text += b" " * (-(8 + len(text)) % PAYLOAD_ALIGN)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
