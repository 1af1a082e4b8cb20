"""The container format: constants, the index dataclasses, and their JSON form (see ``FORMAT.md``).

A container is a safetensors file: one ``U8`` tensor per group holding the group's payload padded with
zeros to :data:`PAYLOAD_ALIGN` bytes, and the index (JSON) in ``__metadata__[INDEX_KEY]``. This module
only converts between Python objects and JSON; validation of untrusted input lives in ``validate.py``.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from offload_runtime.native.base import Chunk
from offload_runtime.native.layout import GroupLayout, align_up

FORMAT_NAME = "offload_runtime"
# version 2 adds expert groups (kind "expert", with an "expert" record); a container without any is
# written as version 1, byte for byte as before, so older readers still open every dense container
FORMAT_VERSION = 2
DENSE_FORMAT_VERSION = 1
FORMAT_VERSIONS = (DENSE_FORMAT_VERSION, FORMAT_VERSION)
INDEX_KEY = "offload_runtime.index"
# CRC-32 (8 hex digits) of the index text: an edit that keeps the index self-consistent (a shape, a
# dtype, a chunk's CRC) is still caught. Containers written before it existed have no such key.
INDEX_CRC_KEY = "offload_runtime.index_crc32"
# the index stores tokenizer files as text; a binary one (a sentencepiece model) is stored base64-encoded
# under its name plus this suffix, and written back under its own name
TOKENIZER_BINARY_SUFFIX = ".base64"
PAYLOAD_ALIGN = 4096  # every payload starts on a page boundary: O_DIRECT-, mmap- and DMA-friendly
HEADER_LEN_BYTES = 8  # safetensors: little-endian u64 length of the JSON header
MAX_HEADER_SIZE = 100_000_000  # the limit safetensors itself enforces
MAX_GROUP_DECODED_SIZE = 1 << 38  # 256 GiB: far above any real layer, far below a forged 2**63


def tensor_name(position: int) -> str:
    """Safetensors name of the payload tensor of the ``position``-th group (``group.0003``)."""
    return f"group.{position:04d}"


@dataclass(frozen=True)
class ExpertSlice:
    """One tensor of an expert group: slice ``index`` of a stacked parameter of its experts module.

    Attributes:
        tensor: the name of the tensor in the group's layout (``"...experts.gate_up_proj[3]"``).
        param: the stacked parameter's state-dict name (``"...experts.gate_up_proj"``).
        index: which slice of ``param`` the tensor is (``param[index]``; the group's expert index).
        shape: the stacked parameter's full shape; its first dimension is the number of experts and the
            tensor's shape is the rest.
    """

    tensor: str
    param: str
    index: int
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "param": self.param, "index": self.index, "shape": list(self.shape)}


@dataclass(frozen=True)
class ExpertInfo:
    """What the index says about an expert group (``kind == "expert"``): expert ``index`` of ``module``.

    Attributes:
        module: the experts module's path (``"model.layers.1.mlp.experts"``).
        index: the expert (``0 <= index < num_experts``).
        num_experts: the experts module's number of experts.
        slices: one per tensor of the group's layout, in layout order.
    """

    module: str
    index: int
    num_experts: int
    slices: tuple[ExpertSlice, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "index": self.index,
            "num_experts": self.num_experts,
            "slices": [s.to_json() for s in self.slices],
        }


@dataclass
class GroupEntry:
    """Everything the index says about one group.

    Attributes:
        name: module path of the group (``"model.layers.3"``; ``"model.layers.3.mlp.experts.5"`` for an
            expert).
        kind: ``"block"``, ``"module"`` or ``"expert"`` (one routed expert of an experts module).
        users: module paths whose forward reads this group (the group's own module first).
        aliases: tied names not stored -> stored name they share.
        tensor: safetensors tensor name of the payload.
        codec: codec name (``"raw"``, ``"zstd"``, ...); ``params``: its JSON-able parameters.
        layout: what the group decodes to (the slot layout).
        stored_layout: what the chunks decode to when it differs from ``layout`` (lossy codecs), else None.
        stored_size: payload bytes, without the 4 KiB padding.
        chunks: the chunk table, in decode order.
        expert: for an expert group, which expert of which stacked parameters it holds; else None.
    """

    name: str
    kind: str
    users: list[str]
    aliases: dict[str, str]
    tensor: str
    codec: str
    params: dict
    layout: GroupLayout
    stored_layout: GroupLayout | None
    stored_size: int
    chunks: list[Chunk]
    expert: ExpertInfo | None = None

    @property
    def decoded_size(self) -> int:
        """Bytes of the decoded group (the slot size)."""
        return self.layout.size

    @property
    def padded_size(self) -> int:
        """Bytes the payload tensor occupies in the file."""
        return align_up(self.stored_size, PAYLOAD_ALIGN)

    def to_json(self) -> dict[str, Any]:
        row = {
            "name": self.name,
            "kind": self.kind,
            "users": list(self.users),
            "aliases": dict(self.aliases),
            "tensor": self.tensor,
            "codec": self.codec,
            "params": self.params,
            "layout": self.layout.to_json(),
            "stored_layout": self.stored_layout.to_json() if self.stored_layout is not None else None,
            "stored_size": self.stored_size,
            "chunks": [c.to_json() for c in self.chunks],
        }
        if self.expert is not None:  # absent, not null, elsewhere: dense indexes stay as they were
            row["expert"] = self.expert.to_json()
        return row


@dataclass
class ContainerIndex:
    """The whole index of a container.

    Attributes:
        format_version: :data:`FORMAT_VERSION` when the container has expert groups, else
            :data:`DENSE_FORMAT_VERSION`.
        groups: every group, in stored (= execution) order.
        model_class: transformers class name (``"LlamaForCausalLM"``) or None for a bare checkpoint.
        config: the HF ``config.to_dict()`` or None.
        generation_config: the HF generation config as a dict, or None.
        tokenizer: tokenizer file name -> file text, or None (binary files: see
            :data:`TOKENIZER_BINARY_SUFFIX`).
        dtype: the floating dtype of the stored weights (``"bfloat16"``), or None when there are none.
    """

    format_version: int
    groups: list[GroupEntry]
    model_class: str | None
    config: dict | None
    generation_config: dict | None
    tokenizer: dict[str, str] | None
    dtype: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "dtype": self.dtype,
            "model": {
                "model_class": self.model_class,
                "config": self.config,
                "generation_config": self.generation_config,
                "tokenizer": self.tokenizer,
            },
            "groups": [g.to_json() for g in self.groups],
        }


def index_format_version(groups: list[GroupEntry]) -> int:
    """The version a container of ``groups`` is written as: the oldest that can describe it."""
    return FORMAT_VERSION if any(g.expert is not None for g in groups) else DENSE_FORMAT_VERSION


def encode_header(index: ContainerIndex) -> bytes:
    """The safetensors prefix (u64 length + JSON header, space padded) of a container with ``index``.

    The header is padded so that the data section, hence every payload, starts on a 4 KiB boundary.
    """
    header: dict[str, Any] = {
        "__metadata__": {
            "format": FORMAT_NAME,
            "format_version": str(index.format_version),
        }
    }
    index_text = json.dumps(index.to_json(), separators=(",", ":"))
    header["__metadata__"][INDEX_KEY] = index_text
    header["__metadata__"][INDEX_CRC_KEY] = index_crc32(index_text)
    offset = 0
    for group in index.groups:
        padded = group.padded_size
        header[group.tensor] = {"dtype": "U8", "shape": [padded], "data_offsets": [offset, offset + padded]}
        offset += padded
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    total = align_up(HEADER_LEN_BYTES + len(text), PAYLOAD_ALIGN)
    text += b" " * (total - HEADER_LEN_BYTES - len(text))
    return struct.pack("<Q", len(text)) + text


def index_crc32(index_text: str) -> str:
    """The checksum stored under :data:`INDEX_CRC_KEY` for ``index_text``."""
    # surrogatepass: a forged index may hold a lone surrogate, which must fail the check, not the encoder
    return f"{zlib.crc32(index_text.encode('utf-8', 'surrogatepass')) & 0xFFFFFFFF:08x}"
