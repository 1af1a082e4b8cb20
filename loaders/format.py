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
# version 2 adds expert groups (kind "expert", with an "expert" record); version 3 tensor-parallel slices
# ("tp" records on groups whose tensors are stored in slices, groups of kind "tp_slice"). A container is
# written as the oldest version that describes it, so a dense one stays version 1 byte for byte and older
# readers still open every container without the newer records
FORMAT_VERSION = 3
DENSE_FORMAT_VERSION = 1
EXPERT_FORMAT_VERSION = 2
TP_FORMAT_VERSION = 3
FORMAT_VERSIONS = (DENSE_FORMAT_VERSION, EXPERT_FORMAT_VERSION, TP_FORMAT_VERSION)
TP_SLICE_KIND = "tp_slice"
TP_SLICE_MARK = "#tp"  # a slice group is "<group>#tp<s>", a slice of tensor T in it "T#tp<s>"
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


def tp_slice_name(name: str, index: int) -> str:
    """The stored name of slice ``index`` of group or tensor ``name`` (``"model.layers.3#tp1"``)."""
    return f"{name}{TP_SLICE_MARK}{index}"


@dataclass(frozen=True)
class TpTensor:
    """A tensor of a group stored in tensor-parallel slices.

    Attributes:
        name: its name in the group's logical layout.
        dim: the dimension it is cut along (the one tensor parallelism shards).
        split: how many packed parts that dimension holds (2 for a fused gate/up projection sharded part by
            part, ``_StridedShard``; 1 otherwise): slice ``s`` holds the ``s``-th of ``slices`` pieces of
            every part, parts one after another.
    """

    name: str
    dim: int
    split: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dim": self.dim, "split": self.split}


@dataclass(frozen=True)
class TpInfo:
    """What the index says about a group whose tensors are partly stored in tensor-parallel slices.

    Attributes:
        slices: ``S``, the number of slice groups (``<group>#tp0`` ... ``#tp<S-1>``, right after it).
        layout: the group's logical layout: every tensor whole, as a container without slices stores it.
        sliced: the tensors stored in the slices, in logical layout order; the group's own ``layout`` holds
            the others, in the same order.
    """

    slices: int
    layout: GroupLayout
    sliced: tuple[TpTensor, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "slices": self.slices,
            "layout": self.layout.to_json(),
            "sliced": [t.to_json() for t in self.sliced],
        }


@dataclass(frozen=True)
class TpSlice:
    """The record of a slice group: slice ``index`` of the tensors of group ``group``."""

    group: str
    index: int

    def to_json(self) -> dict[str, Any]:
        return {"group": self.group, "index": self.index}


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
        tp: for a group with tensors stored in tensor-parallel slices, its logical layout and which
            tensors the slices hold; else None.
        tp_slice: for a slice group (``kind == "tp_slice"``), whose slice it is; else None.
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
    tp: TpInfo | None = None
    tp_slice: TpSlice | None = None

    @property
    def logical_layout(self) -> GroupLayout:
        """Every tensor of the group whole: ``tp.layout`` when some are stored in slices, else ``layout``."""
        return self.tp.layout if self.tp is not None else self.layout

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
        # absent, not null, elsewhere: indexes without these records stay as they were
        if self.expert is not None:
            row["expert"] = self.expert.to_json()
        if self.tp is not None:
            row["tp"] = self.tp.to_json()
        if self.tp_slice is not None:
            row["tp_slice"] = self.tp_slice.to_json()
        return row


@dataclass
class ContainerIndex:
    """The whole index of a container.

    Attributes:
        format_version: the oldest version describing the groups (:func:`index_format_version`).
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
    if any(g.tp is not None or g.tp_slice is not None for g in groups):
        return TP_FORMAT_VERSION
    if any(g.expert is not None for g in groups):
        return EXPERT_FORMAT_VERSION
    return DENSE_FORMAT_VERSION


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
