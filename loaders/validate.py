"""Validation of an untrusted container header and index, before any payload byte is touched.

Every size and offset read from a file is checked (type, range, bounds, overlap, sum) so that a forged or
damaged container raises a typed error naming the file, group and chunk instead of making a decoder read
out of bounds or allocate terabytes. Mirrors safetensors' own checks for the outer format.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from offload_runtime.errors import CheckpointError, CodecUnavailableError, CorruptCheckpointError
from offload_runtime.loaders.format import (
    DENSE_FORMAT_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMAT_VERSIONS,
    HEADER_LEN_BYTES,
    INDEX_CRC_KEY,
    INDEX_KEY,
    MAX_HEADER_SIZE,
    PAYLOAD_ALIGN,
    TP_FORMAT_VERSION,
    TP_SLICE_KIND,
    ContainerIndex,
    GroupEntry,
    index_crc32,
)
from offload_runtime.loaders.validate_experts import check_expert_groups, parse_expert
from offload_runtime.loaders.validate_fields import parse_layout, sane_int, typed
from offload_runtime.loaders.validate_tp import check_tp_groups, parse_tp, parse_tp_slice
from offload_runtime.native.base import Chunk
from offload_runtime.native.layout import torch_dtype


@dataclass(frozen=True)
class ParsedContainer:
    """A validated container: its index and where each payload lies in the file."""

    index: ContainerIndex
    data_start: int  # file offset of the safetensors data section
    offsets: dict[str, int]  # group name -> absolute file offset of its payload


def read_container_header(fh: BinaryIO, path: str | os.PathLike) -> ParsedContainer:
    """Read and validate the header and index of the open container ``fh``.

    Raises:
        CorruptCheckpointError: the bytes are damaged, truncated, extended or inconsistent.
        CheckpointError: a valid safetensors file that is not an offload_runtime container of a known version.
        CodecUnavailableError: a group uses a codec this installation does not know.
    """
    path = os.fspath(path)
    file_size = os.fstat(fh.fileno()).st_size
    fh.seek(0)
    prefix = fh.read(HEADER_LEN_BYTES)
    if len(prefix) < HEADER_LEN_BYTES:
        raise CorruptCheckpointError(
            "file too short for a safetensors header",
            file=path,
            expected=f">= {HEADER_LEN_BYTES} bytes",
            actual=f"{file_size} bytes",
        )
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_SIZE:
        raise CorruptCheckpointError(
            "header length is too large", file=path, expected=f"<= {MAX_HEADER_SIZE}", actual=header_len
        )
    if HEADER_LEN_BYTES + header_len > file_size:
        raise CorruptCheckpointError(
            "header extends beyond the end of the file (truncated?)",
            file=path,
            expected=f">= {HEADER_LEN_BYTES + header_len} bytes",
            actual=f"{file_size} bytes",
        )
    raw = fh.read(header_len)
    header = _json_object(raw, path, "safetensors header")
    metadata = header.pop("__metadata__", None)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(
            "not an offload_runtime container",
            file=path,
            expected=f'__metadata__["format"] == {FORMAT_NAME!r}',
            actual=metadata.get("format") if isinstance(metadata, dict) else None,
            hint="pack the checkpoint first: `offload-runtime pack SRC OUT`",
        )
    if metadata.get("format_version") not in [str(v) for v in FORMAT_VERSIONS]:
        raise CheckpointError(
            "unknown container format version",
            file=path,
            expected=" or ".join(str(v) for v in FORMAT_VERSIONS),
            actual=metadata.get("format_version"),
            hint="upgrade offload-runtime or re-pack the checkpoint",
        )
    data_start = HEADER_LEN_BYTES + header_len
    tensor_spans = _check_tensors(header, path, data_start, file_size)
    index_text = metadata.get(INDEX_KEY)
    if not isinstance(index_text, str):
        raise CorruptCheckpointError(f"__metadata__ has no {INDEX_KEY!r} string", file=path)
    index = parse_index(_json_object(index_text, path, "index"), path)
    if str(index.format_version) != metadata["format_version"]:
        raise CorruptCheckpointError(
            "the index's format version disagrees with the header's",
            file=path,
            expected=metadata["format_version"],
            actual=index.format_version,
        )
    offsets: dict[str, int] = {}
    unused = set(tensor_spans)
    for group in index.groups:
        span = tensor_spans.get(group.tensor)
        if span is None or group.tensor not in unused:
            raise CorruptCheckpointError(
                "group payload tensor is missing or shared", file=path, group=group.name, actual=group.tensor
            )
        unused.discard(group.tensor)
        if span[1] - span[0] != group.padded_size:
            raise CorruptCheckpointError(
                "payload tensor size disagrees with the index's stored size",
                file=path,
                group=group.name,
                expected=group.padded_size,
                actual=span[1] - span[0],
            )
        offsets[group.name] = data_start + span[0]
    if unused:
        raise CorruptCheckpointError(
            "tensors not referenced by the index", file=path, actual=sorted(unused)[:5]
        )
    end = max((data_start + span[1] for span in tensor_spans.values()), default=data_start)
    if end > file_size:
        _raise_truncated(index, offsets, path, end, file_size)
    # last: a structurally broken index gets the error that says what is wrong with it
    stored_crc = metadata.get(INDEX_CRC_KEY)
    if stored_crc is not None and stored_crc != index_crc32(index_text):
        raise CorruptCheckpointError(
            "index checksum mismatch: the index was damaged or edited after packing",
            file=path,
            expected=stored_crc,
            actual=index_crc32(index_text),
            hint="re-pack the checkpoint",
        )
    return ParsedContainer(index, data_start, offsets)


def _raise_truncated(index: ContainerIndex, offsets: dict[str, int], path: str, end: int, size: int) -> None:
    """Raise for a file that ends at ``size`` before ``end``, naming the group and chunk it cuts into."""
    group = chunk = None
    for entry in index.groups:
        start = offsets[entry.name]
        if start <= size < start + entry.padded_size:
            group = entry.name
            cut = size - start
            chunk = next((i for i, c in enumerate(entry.chunks) if c.offset + c.size > cut), None)
            break
    where = "inside a chunk" if chunk is not None else "in a payload's padding" if group else "at a payload"
    raise CorruptCheckpointError(
        f"file truncated {where}",
        file=path,
        group=group,
        chunk=chunk,
        expected=f"{end} bytes",
        actual=f"{size} bytes",
        hint="the copy or download was cut short; fetch or pack it again",
    )


def _json_object(raw: bytes | str, path: str, what: str) -> dict:
    try:
        value = json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    # ValueError also covers integers past Python's digit limit; RecursionError very deep nesting
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{what} is not valid JSON: {exc}", file=path) from None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{what} is not a JSON object", file=path, actual=type(value).__name__)
    return value


def _check_tensors(header: dict, path: str, data_start: int, file_size: int) -> dict[str, tuple[int, int]]:
    """Tensor name -> (begin, end) in the data section; contiguous, U8, and ending at the end of file."""
    spans: dict[str, tuple[int, int]] = {}
    for name, info in header.items():
        if not isinstance(info, dict) or info.get("dtype") != "U8":
            raise CorruptCheckpointError("payload tensor is not U8", file=path, group=name)
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and isinstance(shape, list) and len(shape) == 1
        ):
            raise CorruptCheckpointError(
                "tensor entry lacks data_offsets or a 1-D shape", file=path, group=name
            )
        begin, end = (sane_int(v, path, "tensor offset", name) for v in offsets)
        if end < begin or end - begin != sane_int(shape[0], path, "tensor length", name):
            raise CorruptCheckpointError(
                "tensor offsets disagree with its shape",
                file=path,
                group=name,
                expected=shape[0],
                actual=f"[{begin}, {end}]",
            )
        spans[name] = (begin, end)
    position = 0
    for name, (begin, end) in sorted(spans.items(), key=lambda kv: kv[1]):
        if begin != position:
            kind = (
                "overlaps the previous tensor" if begin < position else "leaves a gap after the previous one"
            )
            raise CorruptCheckpointError(
                f"tensor {kind}", file=path, group=name, expected=position, actual=begin
            )
        position = end
    if data_start % PAYLOAD_ALIGN:
        raise CorruptCheckpointError("data section is not 4 KiB aligned", file=path, actual=data_start)
    if data_start + position < file_size:
        raise CorruptCheckpointError(
            "file has bytes after the end of its data",
            file=path,
            expected=f"{data_start + position} bytes",
            actual=f"{file_size} bytes",
        )
    return spans


def parse_index(obj: Mapping, path: str | os.PathLike) -> ContainerIndex:
    """Build and fully validate a :class:`ContainerIndex` from its JSON object."""
    path = os.fspath(path)
    model = obj.get("model")
    groups = obj.get("groups")
    if not isinstance(model, dict) or not isinstance(groups, list):
        raise CorruptCheckpointError("index lacks its 'model' object or 'groups' list", file=path)
    version = obj.get("format_version")
    if type(version) is not int or version not in FORMAT_VERSIONS:  # strict: no True, no 1.0
        raise CheckpointError(
            "unknown index format version",
            file=path,
            expected=" or ".join(str(v) for v in FORMAT_VERSIONS),
            actual=version,
        )
    entries, seen = [], set()
    for position, row in enumerate(groups):
        entry = _parse_group(row, path, position, version)
        if entry.name in seen:
            raise CorruptCheckpointError("group appears twice in the index", file=path, group=entry.name)
        seen.add(entry.name)
        entries.append(entry)
    _check_tensor_names(entries, path)
    check_tp_groups(entries, path)
    check_expert_groups(entries, path)
    dtype, model_class = obj.get("dtype"), model.get("model_class")
    if dtype is not None and not _is_dtype_name(dtype):
        raise CorruptCheckpointError("index dtype is not a known dtype name", file=path, actual=dtype)
    if model_class is not None and not isinstance(model_class, str):
        raise CorruptCheckpointError("index model_class is not a string", file=path, actual=model_class)
    tokenizer = model.get("tokenizer")
    if tokenizer is not None and not (
        isinstance(tokenizer, dict) and all(isinstance(v, str) for v in tokenizer.values())
    ):
        raise CorruptCheckpointError("index tokenizer is not a file name -> text mapping", file=path)
    for key in ("config", "generation_config"):
        if model.get(key) is not None and not isinstance(model[key], dict):
            raise CorruptCheckpointError(f"index {key} is not an object", file=path)
    return ContainerIndex(
        format_version=version,
        groups=entries,
        model_class=model_class,
        config=model.get("config"),
        generation_config=model.get("generation_config"),
        tokenizer=tokenizer,
        dtype=dtype,
    )


def _is_dtype_name(value: Any) -> bool:
    try:
        torch_dtype(value)
    except (KeyError, TypeError):  # TypeError: an unhashable value
        return False
    return True


def _check_tensor_names(entries: list[GroupEntry], path: str) -> None:
    """Each tensor is stored once and every alias names a stored tensor (``load_state_dict`` relies on it).

    A group's tensors are those of its logical layout (its slices' tensors included: ``validate_tp``
    checks that the slices hold exactly those)."""
    owner: dict[str, str] = {}
    for entry in entries:
        if entry.tp_slice is not None:
            continue
        for spec in entry.logical_layout.tensors:
            if spec.name in owner:
                raise CorruptCheckpointError(
                    f"tensor {spec.name!r} is stored twice",
                    file=path,
                    group=entry.name,
                    expected="each tensor in one group",
                    actual=f"also in {owner[spec.name]}",
                )
            owner[spec.name] = entry.name
    for entry in entries:
        for alias, canonical in entry.aliases.items():
            if canonical not in owner or alias in owner:
                raise CorruptCheckpointError(
                    f"alias {alias!r} -> {canonical!r} does not name one stored tensor",
                    file=path,
                    group=entry.name,
                    hint="re-pack the container",
                )


def _parse_group(row: Any, path: str, position: int, version: int = FORMAT_VERSION) -> GroupEntry:
    name = row.get("name") if isinstance(row, dict) else None
    label = name if isinstance(name, str) else f"#{position}"
    try:
        # strict types, no str()/int() coercion: a name forged into a number must not load under a new name
        entry = GroupEntry(
            name=typed(row["name"], str),
            kind=typed(row["kind"], str),
            users=[typed(u, str) for u in typed(row["users"], list)],
            aliases={typed(k, str): typed(v, str) for k, v in typed(row["aliases"], dict).items()},
            tensor=typed(row["tensor"], str),
            codec=typed(row["codec"], str),
            params=typed(row["params"], dict),
            layout=parse_layout(row["layout"], path, label, "layout"),
            stored_layout=(
                parse_layout(row["stored_layout"], path, label, "stored_layout")
                if row["stored_layout"] is not None
                else None
            ),
            stored_size=sane_int(row["stored_size"], path, "stored_size", label),
            chunks=[],
        )
        chunk_rows = typed(row["chunks"], list)
    except CorruptCheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CorruptCheckpointError(
            f"malformed group entry ({type(exc).__name__}: {exc})", file=path, group=label
        ) from None
    _check_codec(entry, path)
    entry.chunks = _chunks(chunk_rows, entry, path)
    _check_codec_params(entry, path)
    has_record = "expert" in row
    if has_record and version == DENSE_FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"expert record in a format version {DENSE_FORMAT_VERSION} index (which has no experts)",
            file=path,
            group=entry.name,
        )
    if has_record != (entry.kind == "expert"):
        raise CorruptCheckpointError(
            "a group is of kind 'expert' exactly when it has an expert record",
            file=path,
            group=entry.name,
            actual=f"kind {entry.kind!r}, expert record {'present' if has_record else 'absent'}",
        )
    _parse_tp_records(row, entry, path, version)
    if has_record:
        entry.expert = parse_expert(row["expert"], entry, path)
    return entry


def _parse_tp_records(row: dict, entry: GroupEntry, path: str, version: int) -> None:
    """The ``tp`` / ``tp_slice`` records of a group (format version 3), parsed into ``entry``."""
    present = [key for key in ("tp", "tp_slice") if key in row]
    if present and version < TP_FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"tensor-parallel record in a format version {version} index (which has none)",
            file=path,
            group=entry.name,
            actual=present,
        )
    if ("tp_slice" in row) != (entry.kind == TP_SLICE_KIND):
        raise CorruptCheckpointError(
            f"a group is of kind {TP_SLICE_KIND!r} exactly when it has a tp_slice record",
            file=path,
            group=entry.name,
            actual=f"kind {entry.kind!r}, tp_slice record {'present' if 'tp_slice' in row else 'absent'}",
        )
    if "tp" in row:
        entry.tp = parse_tp(row["tp"], entry, path)
    if "tp_slice" in row:
        entry.tp_slice = parse_tp_slice(row["tp_slice"], entry, path)


def _check_codec(entry: GroupEntry, path: str) -> None:
    from offload_runtime.loaders.reassemble import REASSEMBLED_CODEC
    from offload_runtime.native import available_codecs

    if entry.codec == REASSEMBLED_CODEC:
        raise CorruptCheckpointError(
            f"group claims the in-memory codec {REASSEMBLED_CODEC!r}, which is never stored",
            file=path,
            group=entry.name,
            hint="the container is forged or damaged; re-pack it",
        )
    if entry.codec not in available_codecs():
        raise CodecUnavailableError(
            f"group uses unknown codec {entry.codec!r}; known: {', '.join(available_codecs())}",
            codec=entry.codec,
            missing="a codec of that name",
            file=path,
            group=entry.name,
            alternative="upgrade offload-runtime or re-pack with --codec raw",
        )


def _check_codec_params(entry: GroupEntry, path: str) -> None:
    """The codec's own checks of its params (offsets and sizes it will read), with file and group named."""
    from offload_runtime.native import get_codec

    try:
        get_codec(entry.codec).check_params(
            entry.params, entry.stored_layout or entry.layout, entry.chunks, entry.stored_size
        )
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(
            exc.summary,
            file=path,
            group=entry.name,
            chunk=exc.chunk,
            expected=exc.expected,
            actual=exc.actual,
            hint=exc.hint or "the container is damaged or forged; re-pack it",
        ) from None


def _chunks(rows: list, entry: GroupEntry, path: str) -> list[Chunk]:
    from offload_runtime.native import get_codec

    verbatim = get_codec(entry.codec).stores_verbatim  # known: _check_codec ran first
    chunks, end, decoded = [], 0, 0
    target = (entry.stored_layout or entry.layout).size
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 5:
            raise CorruptCheckpointError("chunk row is not 5 integers", file=path, group=entry.name, chunk=i)
        offset, size, decoded_size, crc, dcrc = (
            sane_int(v, path, what, entry.name, i)
            for v, what in zip(row, ("offset", "size", "decoded_size", "crc32", "decoded_crc32"), strict=True)
        )
        if crc > 0xFFFFFFFF or dcrc > 0xFFFFFFFF:
            raise CorruptCheckpointError("chunk CRC is not 32-bit", file=path, group=entry.name, chunk=i)
        if offset + size > entry.stored_size:
            raise CorruptCheckpointError(
                "chunk extends beyond the group payload",
                file=path,
                group=entry.name,
                chunk=i,
                expected=f"end <= {entry.stored_size}",
                actual=f"[{offset}, {offset + size})",
            )
        if offset < end:
            raise CorruptCheckpointError(
                "chunk overlaps the previous chunk",
                file=path,
                group=entry.name,
                chunk=i,
                expected=f"offset >= {end}",
                actual=offset,
            )
        decoded += decoded_size
        if decoded > target:
            raise CorruptCheckpointError(
                "chunks decode to more bytes than the layout holds",
                file=path,
                group=entry.name,
                chunk=i,
                expected=target,
                actual=decoded,
            )
        if verbatim and (offset != end or size != decoded_size):
            raise CorruptCheckpointError(
                "raw chunk is not stored as is right after the previous one",
                file=path,
                group=entry.name,
                chunk=i,
                expected=f"offset {end}, size == decoded_size",
                actual=f"offset {offset}, size {size}, decoded_size {decoded_size}",
            )
        end = offset + size
        chunks.append(Chunk(offset, size, decoded_size, crc, dcrc))
    if decoded != target:
        raise CorruptCheckpointError(
            "chunks' decoded sizes do not add up to the layout size",
            file=path,
            group=entry.name,
            expected=target,
            actual=decoded,
        )
    return chunks
