"""Write the corpus of malformed containers that ``tests/test_fuzz_container.py`` replays.

Run from the repository root: ``python tests/corpus/make_corpus.py``. Each file is a tiny valid container
(one-layer llama, 1 KiB chunks) damaged in one way its name describes; ``expected.json`` records the error
type and a message fragment each must raise. Files stay well under 50 KB.
"""

from __future__ import annotations

import json
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: the shared container helpers
from container_surgery import join, split, write_tiny_container, write_tiny_moe_container

HERE = Path(__file__).parent


def valid_container(path: Path, codec_name: str = "zstd") -> bytes:
    if codec_name == "moe":
        write_tiny_moe_container(path)
    else:
        write_tiny_container(path, codec_name)
    data = path.read_bytes()
    path.unlink()
    return data


def edit(raw: bytes, fn: Callable[[dict, dict], None]) -> bytes:
    header, index, data = split(raw)
    fn(header, index)
    return join(header, index, data)


def payload_at(raw: bytes, group: int) -> tuple[int, list]:
    header, index, _ = split(raw)
    (n,) = struct.unpack("<Q", raw[:8])
    entry = index["groups"][group]
    return 8 + n + header[entry["tensor"]]["data_offsets"][0], entry["chunks"]


def flip_chunk(raw: bytes, group: int, forge_crc: bool) -> bytes:
    start, chunks = payload_at(raw, group)
    out = bytearray(raw)
    offset, size = chunks[0][0], chunks[0][1]
    out[start + offset + size // 2] ^= 0x01
    if not forge_crc:
        return bytes(out)
    crc = zlib.crc32(bytes(out[start + offset : start + offset + size])) & 0xFFFFFFFF
    return edit(bytes(out), lambda h, ix: ix["groups"][group]["chunks"][0].__setitem__(3, crc))


def chunk_set(group: int, column: int, value) -> Callable[[dict, dict], None]:
    return lambda h, ix: ix["groups"][group]["chunks"][0].__setitem__(column, value)


def shape_overflow(h: dict, ix: dict) -> None:
    group = ix["groups"][1]
    last = group["layout"]["tensors"][-1]
    shrink = group["layout"]["size"] - last["offset"]
    last["shape"] = [2**32, 2**32]
    group["layout"]["size"] -= shrink
    group["chunks"][-1][2] -= shrink


EXPERT = 3  # group position of expert 1 in the MoE container: embed, block 0, expert 0, expert 1, ...


def expert_set(fn: Callable[[dict], None], position: int = EXPERT) -> Callable[[dict, dict], None]:
    return lambda h, ix: fn(ix["groups"][position])


def set_index(record: dict, value: int) -> None:
    record["expert"]["index"] = value
    for s in record["expert"]["slices"]:
        s["index"] = value


def moe_cases(moe: bytes) -> dict[str, tuple[bytes, str, str]]:
    """Expert records (format version 2) damaged one way each."""

    def version_1(h: dict, ix: dict) -> None:
        h["__metadata__"]["format_version"] = "1"
        ix["format_version"] = 1

    def drop_expert(h: dict, ix: dict) -> None:
        ix["groups"].pop(EXPERT)  # its payload stays: the index is checked before unreferenced payloads

    return {
        "expert_index_out_of_range.ort": (
            edit(moe, expert_set(lambda g: set_index(g, 7))),
            "CorruptCheckpointError",
            "expert index out of range",
        ),
        "expert_stored_twice.ort": (
            edit(moe, expert_set(lambda g: set_index(g, 0))),
            "CorruptCheckpointError",
            "is stored twice",
        ),
        "expert_missing.ort": (edit(moe, drop_expert), "CorruptCheckpointError", "lacks experts [1]"),
        "expert_slice_shape_disagrees.ort": (
            edit(moe, expert_set(lambda g: g["expert"]["slices"][0]["shape"].__setitem__(1, 99))),
            "CorruptCheckpointError",
            "does not fit its stacked parameter",
        ),
        "expert_num_experts_huge.ort": (
            edit(moe, expert_set(lambda g: g["expert"].update(num_experts=2**40))),
            "CorruptCheckpointError",
            "num_experts is out of range",
        ),
        "expert_record_in_version_1.ort": (
            edit(moe, version_1),
            "CorruptCheckpointError",
            "expert record in a format version 1 index",
        ),
        "expert_kind_without_record.ort": (
            edit(moe, expert_set(lambda g: g.pop("expert"))),
            "CorruptCheckpointError",
            "exactly when it has an expert record",
        ),
        "expert_record_malformed.ort": (
            edit(moe, expert_set(lambda g: g["expert"]["slices"][0].update(param=5))),
            "CorruptCheckpointError",
            "malformed expert record",
        ),
        "reassembled_codec_on_disk.ort": (
            edit(moe, lambda h, ix: ix["groups"][1].update(codec="reassembled")),
            "CorruptCheckpointError",
            "never stored",
        ),
    }


def cases(zstd: bytes, raw: bytes) -> dict[str, tuple[bytes, str, str]]:
    """file name -> (bytes, error class name, message fragment)."""
    (n,) = struct.unpack("<Q", zstd[:8])
    first, chunks = payload_at(zstd, 1)
    huge_len, beyond_len = bytearray(zstd), bytearray(zstd)
    huge_len[:8] = struct.pack("<Q", 2**64 - 1)
    beyond_len[:8] = struct.pack("<Q", len(zstd))
    return {
        "empty_file.ort": (b"", "CorruptCheckpointError", "too short"),
        "truncated_in_length_field.ort": (zstd[:5], "CorruptCheckpointError", "too short"),
        "truncated_in_header.ort": (zstd[: 8 + n // 2], "CorruptCheckpointError", "beyond the end"),
        "truncated_at_data_start.ort": (zstd[: 8 + n], "CorruptCheckpointError", "truncated"),
        "truncated_inside_chunk.ort": (
            zstd[: first + chunks[0][0] + chunks[0][1] // 2],
            "CorruptCheckpointError",
            "truncated inside a chunk",
        ),
        "bytes_appended.ort": (zstd + b"\0" * 100, "CorruptCheckpointError", "bytes after the end"),
        "header_length_u64_max.ort": (bytes(huge_len), "CorruptCheckpointError", "too large"),
        "header_length_beyond_file.ort": (bytes(beyond_len), "CorruptCheckpointError", "beyond the end"),
        "header_not_json.ort": (
            zstd[:8] + b"[" + zstd[9:],
            "CorruptCheckpointError",
            "not valid JSON",
        ),
        "header_nested_5000_deep.ort": (
            join(*split(zstd), extra=b'"x": ' + b"[" * 5000 + b"]" * 5000),
            "CorruptCheckpointError",
            "not valid JSON",
        ),
        "header_int_5000_digits.ort": (
            join(*split(zstd), extra=b'"x": ' + b"9" * 5000),
            "CorruptCheckpointError",
            "not valid JSON",
        ),
        "unknown_format_version.ort": (
            edit(zstd, lambda h, ix: h["__metadata__"].update(format_version="99")),
            "CheckpointError",
            "unknown container format version",
        ),
        "unknown_codec.ort": (
            edit(zstd, lambda h, ix: ix["groups"][1].update(codec="brotli")),
            "CodecUnavailableError",
            "brotli",
        ),
        "tensor_offsets_overlap.ort": (
            edit(zstd, lambda h, ix: h["group.0001"].update(data_offsets=[0, h["group.0001"]["shape"][0]])),
            "CorruptCheckpointError",
            "overlaps the previous tensor",
        ),
        "chunk_offset_u64_max.ort": (
            edit(zstd, chunk_set(1, 0, 2**64 - 1)),
            "CorruptCheckpointError",
            "not a sane non-negative integer",
        ),
        "chunk_offset_negative.ort": (
            edit(zstd, chunk_set(1, 0, -16)),
            "CorruptCheckpointError",
            "not a sane non-negative integer",
        ),
        "chunk_decoded_size_huge.ort": (
            edit(zstd, chunk_set(1, 2, 2**40)),
            "CorruptCheckpointError",
            "more bytes than the layout holds",
        ),
        "layout_shape_product_overflows_int64.ort": (
            edit(raw, shape_overflow),
            "CorruptCheckpointError",
            "implausibly large",
        ),
        "raw_chunk_shorter_than_decoded.ort": (
            edit(
                raw,
                lambda h, ix: (
                    ix["groups"][1].update(stored_size=ix["groups"][1]["stored_size"] - 8),
                    ix["groups"][1]["chunks"][-1].__setitem__(1, ix["groups"][1]["chunks"][-1][1] - 8),
                ),
            ),
            "CorruptCheckpointError",
            "raw chunk",
        ),
        "alias_to_missing_tensor.ort": (
            edit(zstd, lambda h, ix: ix["groups"][1].update(aliases={"tied": "missing.weight"})),
            "CorruptCheckpointError",
            "does not name one stored tensor",
        ),
        "tensor_name_forged_to_number.ort": (
            edit(zstd, lambda h, ix: ix["groups"][1]["layout"]["tensors"][0].update(name=7)),
            "CorruptCheckpointError",
            "malformed layout",
        ),
        "flipped_compressed_byte.ort": (flip_chunk(zstd, 1, False), "CorruptCheckpointError", "chunk CRC-32"),
        "flipped_byte_forged_crc_raw.ort": (
            flip_chunk(raw, 1, True),
            "CorruptCheckpointError",
            "decoded chunk CRC-32 mismatch",
        ),
        ".interrupted.ort.4194305.tmp": (zstd, "CheckpointError", "temporary file"),
    }


def main() -> None:
    zstd = valid_container(HERE / "_valid_zstd.ort", "zstd")
    raw = valid_container(HERE / "_valid_raw.ort", "raw")
    moe = valid_container(HERE / "_valid_moe.ort", "moe")
    expected = {}
    for name, (data, error, fragment) in {**cases(zstd, raw), **moe_cases(moe)}.items():
        (HERE / name).write_bytes(data)
        expected[name] = {"error": error, "fragment": fragment}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
