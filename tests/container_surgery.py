"""Test helpers that build a tiny container and edit its header, to forge the bad inputs the reader must
refuse (used by the error tests, the fuzz test and ``tests/corpus/make_corpus.py``)."""

import json
import struct

import torch

from offload_runtime.loaders.format import INDEX_CRC_KEY, INDEX_KEY, PAYLOAD_ALIGN, index_crc32


def write_tiny_container(path, codec_name="zstd"):
    """A valid container at ``path``: one-layer llama, 1 KiB ``zstd`` or ``raw`` chunks (a few KB)."""
    from offload_runtime.loaders import ContainerWriter
    from offload_runtime.loaders.groups import find_groups
    from offload_runtime.native.layout import GroupLayout
    from offload_runtime.native.raw import RawCodec
    from offload_runtime.native.zstd import ZstdCodec
    from offload_runtime.tiny import tiny_model

    model = tiny_model("llama", num_layers=1, hidden_size=16, intermediate_size=32, vocab_size=64)
    codec = ZstdCodec(chunk_size=1024) if codec_name == "zstd" else RawCodec(chunk_size=1024)
    state = model.state_dict()
    with ContainerWriter(path) as writer:
        for spec in find_groups(model):
            layout = GroupLayout.from_tensors((name, state[name]) for name in spec.tensors)
            writer.add_group(spec, layout, codec.encode(layout, layout.pack(state)), codec.name)


def write_tiny_moe_container(path, codec_name="zstd"):
    """A valid mixture-of-experts container (format version 2) at ``path``: one-layer Mixtral, hidden 16,
    4 experts, each its own group, 1 KiB ``zstd`` or ``raw`` chunks (a few KB)."""
    from offload_runtime.loaders import ContainerWriter
    from offload_runtime.loaders.groups import find_groups
    from offload_runtime.loaders.sources import ModuleSource, SlicedSource
    from offload_runtime.native.layout import GroupLayout
    from offload_runtime.native.raw import RawCodec
    from offload_runtime.native.zstd import ZstdCodec
    from offload_runtime.tiny import tiny_model

    model = tiny_model("mixtral", num_layers=1, hidden_size=16, intermediate_size=8, vocab_size=64)
    codec = ZstdCodec(chunk_size=1024) if codec_name == "zstd" else RawCodec(chunk_size=1024)
    source = SlicedSource(ModuleSource(model.state_dict()))
    with ContainerWriter(path) as writer:
        for spec in find_groups(model, experts=True):
            metas = [(name, source.dtype_shape(name)) for name in spec.tensors]
            layout = GroupLayout.from_shapes((name, dtype, shape) for name, (dtype, shape) in metas)
            data = torch.zeros(layout.size, dtype=torch.uint8)
            for name, view in layout.views(data).items():
                source.fill(name, view)
            writer.add_group(spec, layout, codec.encode(layout, data.numpy()), codec.name)


def split(raw):
    """``(header dict, index dict, data bytes)`` of a container's bytes."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return header, json.loads(header["__metadata__"][INDEX_KEY]), raw[8 + n :]


def join(header, index, data, align=True, extra=b""):
    """Container bytes from ``split``'s parts, the index stored as is (its checksum is not updated).

    ``align``: pad the header so the data starts 4 KiB aligned; ``extra``: raw JSON text inserted into
    ``__metadata__`` before its ``"format"`` key (for values ``json`` cannot write).
    """
    header["__metadata__"][INDEX_KEY] = json.dumps(index)
    text = json.dumps(header).encode()
    if extra:
        text = text.replace(b'"format":', extra + b', "format":', 1)
    if align:
        text += b" " * (-(8 + len(text)) % PAYLOAD_ALIGN)
    return struct.pack("<Q", len(text)) + text + data


def split_header(path):
    """``(header dict, data bytes)`` of the safetensors file at ``path``."""
    header, _, data = split(path.read_bytes())
    return header, data


def rewrite_header(path, edit_header=None, edit_index=None, reseal=True):
    """Re-encode the header after ``edit_header(header)`` / ``edit_index(index)``, keeping the data.

    ``reseal`` stores the edited index's checksum, so the edit reaches the check a test is aimed at (a
    damaged index with its original checksum is refused when the container opens).
    """
    header, index, data = split(path.read_bytes())
    if edit_index:
        edit_index(index)
    if reseal and INDEX_CRC_KEY in header["__metadata__"]:
        header["__metadata__"][INDEX_CRC_KEY] = index_crc32(json.dumps(index))
    if edit_header:
        edit_header(header)
    path.write_bytes(join(header, index, data))
