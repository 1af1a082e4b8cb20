"""Every way a container can be damaged or forged gets its own typed error naming file, group and chunk."""

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from container_surgery import rewrite_header, split_header

from offload_runtime.errors import (
    CheckpointError,
    CheckpointMismatchError,
    CodecUnavailableError,
    CorruptCheckpointError,
)
from offload_runtime.loaders import ContainerReader, build_empty_model, check_compatible, pack
from offload_runtime.loaders.format import INDEX_CRC_KEY, PAYLOAD_ALIGN, index_crc32
from offload_runtime.scheduler.tiers import HOST
from offload_runtime.tiny import tiny_model


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """A raw and a zstd container of a tiny llama (copied per test before damaging it)."""
    model = tiny_model("llama", num_layers=2)
    root = tmp_path_factory.mktemp("packed")
    return {c: pack(model, root / f"{c}.ort", codec=c, progress=False) for c in ("raw", "zstd")}


@pytest.fixture
def container(packed, tmp_path):
    def copy(codec: str = "zstd"):
        path = tmp_path / f"c-{codec}.ort"
        path.write_bytes(packed[codec].read_bytes())
        return path

    return copy


def _group(index, i=1):
    return index["groups"][i]


def _open_fails(path, error_type, *fragments):
    with pytest.raises(error_type) as info:
        ContainerReader(path)
    assert type(info.value) is error_type
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


# -- outer safetensors structure ----------------------------------------------------------------------


def test_header_length_huge(container):
    path = container()
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", 2**63)
    path.write_bytes(raw)
    _open_fails(path, CorruptCheckpointError, "header length is too large")


def test_header_length_beyond_file(container):
    path = container()
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw))  # under the cap, but past the end
    path.write_bytes(raw)
    _open_fails(path, CorruptCheckpointError, "beyond the end of the file")


def test_header_bad_json(container):
    path = container()
    raw = bytearray(path.read_bytes())
    raw[8] = ord("[") + 1  # '\\' instead of '{'
    path.write_bytes(raw)
    _open_fails(path, CorruptCheckpointError, "not valid JSON")


def test_not_an_offload_container(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(4)}, path)
    error = _open_fails(path, CheckpointError, "not an offload_runtime container")
    assert "offload-runtime pack" in str(error)


def test_unknown_format_version(container):
    path = container()
    rewrite_header(path, edit_header=lambda h: h["__metadata__"].update(format_version="99"))
    _open_fails(path, CheckpointError, "unknown container format version", "expected=1", "actual=99")


def test_unknown_codec(container):
    path = container()
    rewrite_header(path, edit_index=lambda ix: _group(ix).update(codec="lzma9"))
    _open_fails(path, CodecUnavailableError, "lzma9", "group=model.layers.0")


def test_tensor_offsets_overlap(container):
    path = container()

    def overlap(header):
        begin, end = header["group.0002"]["data_offsets"]
        header["group.0002"]["data_offsets"] = [begin - PAYLOAD_ALIGN, end - PAYLOAD_ALIGN]

    rewrite_header(path, edit_header=overlap)
    _open_fails(path, CorruptCheckpointError, "overlaps the previous tensor", "group=group.0002")


def test_tensor_offsets_gap(container):
    path = container()

    def gap(header):
        for name in ("group.0002", "group.0003", "group.0004"):
            begin, end = header[name]["data_offsets"]
            header[name]["data_offsets"] = [begin + PAYLOAD_ALIGN, end + PAYLOAD_ALIGN]

    rewrite_header(path, edit_header=gap)
    _open_fails(path, CorruptCheckpointError, "leaves a gap", "group=group.0002")


def test_tensor_offsets_disagree_with_shape(container):
    path = container()
    rewrite_header(
        path, edit_header=lambda h: h["group.0001"].update(shape=[h["group.0001"]["shape"][0] + 1])
    )
    _open_fails(path, CorruptCheckpointError, "offsets disagree with its shape", "group=group.0001")


@pytest.mark.parametrize("where", ["in_length", "in_header", "in_index", "in_chunk", "random"])
def test_truncated(container, where):
    path = container()
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    index_at = raw.index(b"offload_runtime.index")
    cut = {
        "in_length": 5,
        "in_header": 20,
        "in_index": index_at + 200,
        "in_chunk": 8 + n + 1000,
        "random": int(torch.randint(8 + n, len(raw) - 1, ()).item()),
    }[where]
    path.write_bytes(raw[:cut])
    with pytest.raises(CorruptCheckpointError) as info:
        ContainerReader(path)
    assert str(path) in str(info.value)
    assert any(w in str(info.value) for w in ("too short", "beyond the end", "truncated"))


def test_bytes_appended(container):
    path = container()
    with open(path, "ab") as fh:
        fh.write(b"\0" * 10)
    _open_fails(path, CorruptCheckpointError, "has bytes after the end of its data")


# -- index: chunk tables and layouts ------------------------------------------------------------------


def _edit_chunk(i, column, value):
    def edit(index):
        _group(index)["chunks"][i][column] = value

    return edit


def test_chunk_out_of_payload(container):
    path = container()
    rewrite_header(
        path, edit_index=lambda ix: _group(ix)["chunks"][0].__setitem__(1, _group(ix)["stored_size"] + 1)
    )
    _open_fails(path, CorruptCheckpointError, "beyond the group payload", "group=model.layers.0", "chunk=0")


def test_chunks_overlap(container):
    path = container()

    def overlap(index):
        chunks = _group(index)["chunks"]
        chunks.insert(1, list(chunks[0]))  # a second chunk starting where the first does
        chunks[0][2] = chunks[1][2] = chunks[0][2] // 2  # keep the decoded total right

    rewrite_header(path, edit_index=overlap)
    _open_fails(
        path, CorruptCheckpointError, "overlaps the previous chunk", "group=model.layers.0", "chunk=1"
    )


def test_chunk_offset_overflowing(container):
    path = container()
    rewrite_header(path, edit_index=_edit_chunk(0, 0, 2**64 - 1))
    _open_fails(
        path, CorruptCheckpointError, "not a sane non-negative integer", "chunk=0", "group=model.layers.0"
    )


def test_decoded_sizes_do_not_add_up(container):
    path = container()
    rewrite_header(
        path, edit_index=lambda ix: _group(ix)["chunks"][-1].__setitem__(2, _group(ix)["chunks"][-1][2] - 1)
    )
    _open_fails(path, CorruptCheckpointError, "do not add up to the layout size", "group=model.layers.0")


def test_decoded_size_exceeding_layout(container):
    path = container()
    rewrite_header(path, edit_index=_edit_chunk(0, 2, 2**40))
    _open_fails(
        path, CorruptCheckpointError, "more bytes than the layout holds", "group=model.layers.0", "chunk=0"
    )


def test_layout_size_disagrees_with_shapes(container):
    path = container()

    def widen(index):
        _group(index)["layout"]["tensors"][0]["shape"][0] += 1  # no longer fits before the next tensor

    rewrite_header(path, edit_index=widen)
    _open_fails(path, CorruptCheckpointError, "model.layers.0/", "overlap")


def test_layout_tensor_shrunk_leaving_a_gap(container):
    """A shrunken tensor that is not the last one would read other bytes as itself: a gap is refused."""
    path = container()
    rewrite_header(path, edit_index=lambda ix: _group(ix)["layout"]["tensors"][0].update(shape=[16]))
    _open_fails(path, CorruptCheckpointError, "leave a gap", "group=model.layers.0/")


def test_layout_size_not_shape_times_dtype(container):
    path = container()

    def grow(index):
        _group(index)["layout"]["size"] += 256

    rewrite_header(path, edit_index=grow)
    _open_fails(path, CorruptCheckpointError, "shapes x dtypes", "group=model.layers.0")


def test_decoded_size_huge(container):
    path = container()

    def huge(index):
        layout = _group(index)["layout"]
        layout["tensors"][-1]["shape"] = [2**20, 2**20]
        layout["size"] = layout["tensors"][-1]["offset"] + 2**42

    rewrite_header(path, edit_index=huge)
    _open_fails(path, CorruptCheckpointError, "implausibly large", "group=model.layers.0")


# -- payload bytes --------------------------------------------------------------------------------------


def _payload_start(path, group_name):
    with ContainerReader(path, verify="never") as reader:
        view = reader.payload(group_name)
        header, _ = split_header(path)
        begin = header[reader.group(group_name).tensor]["data_offsets"][0]
        return (
            len(path.read_bytes()) - len(split_header(path)[1]) + begin,
            reader.group(group_name).chunks,
            view.nbytes,
        )


def test_flipped_compressed_byte(container):
    path = container("zstd")
    start, chunks, _ = _payload_start(path, "model.layers.1")
    raw = bytearray(path.read_bytes())
    raw[start + chunks[0].offset + 7] ^= 0x10
    path.write_bytes(raw)
    with ContainerReader(path) as reader:
        with pytest.raises(CorruptCheckpointError) as info:
            reader.decode_cpu(
                "model.layers.1", torch.empty(reader.group("model.layers.1").layout.size, dtype=torch.uint8)
            )
        message = str(info.value)
        assert (
            "chunk CRC-32 mismatch" in message and "group=model.layers.1" in message and "chunk=0" in message
        )
        assert f"expected={chunks[0].crc32:#010x}" in message and str(path) in message
        with pytest.raises(CorruptCheckpointError):  # read_into checks too
            stored_size = reader.group("model.layers.1").stored_size
            reader.read_into("model.layers.1", torch.empty(stored_size, dtype=torch.uint8))
    with ContainerReader(path, verify="never") as reader:
        reader.payload("model.layers.1")  # the policy that skips checks does skip them


def test_flipped_byte_that_still_decodes(container):
    """Raw codec: flip a payload byte and forge the compressed CRC; only the decoded CRC can catch it."""
    path = container("raw")
    start, chunks, _ = _payload_start(path, "model.layers.0")
    raw = bytearray(path.read_bytes())
    raw[start + 5] ^= 0x01
    forged = zlib.crc32(bytes(raw[start : start + chunks[0].size])) & 0xFFFFFFFF
    path.write_bytes(raw)
    rewrite_header(path, edit_index=_edit_chunk(0, 3, forged))
    with ContainerReader(path) as reader:
        reader.payload("model.layers.0")  # compressed CRC now passes
        out = torch.empty(reader.group("model.layers.0").layout.size, dtype=torch.uint8)
        with pytest.raises(CorruptCheckpointError) as info:
            reader.decode_cpu("model.layers.0", out)
    message = str(info.value)
    assert (
        "decoded chunk CRC-32 mismatch" in message
        and "group=model.layers.0" in message
        and "chunk=0" in message
    )


def test_mismatch_lists_every_difference(container):
    with ContainerReader(container("raw")) as reader:
        other = build_empty_model(reader)
    other.model.layers[0].mlp.gate_proj.weight = torch.nn.Parameter(torch.empty(3, 3, device="meta"))
    other.model.norm.weight = torch.nn.Parameter(other.model.norm.weight.to(torch.float16))
    del other.model.layers[1].self_attn.q_proj.weight
    other.model.layers[1].register_parameter("extra", torch.nn.Parameter(torch.empty(2, device="meta")))
    with ContainerReader(container("raw")) as reader, pytest.raises(CheckpointMismatchError) as info:
        check_compatible(reader, other)
    lines = info.value.mismatches
    assert len(lines) == 4
    text = str(info.value)
    for fragment in (
        "model.layers.0.mlp.gate_proj.weight: container shape (128, 64), model shape (3, 3)",
        "model.norm.weight: container dtype torch.float32, model dtype torch.float16",
        "unexpected in the container: model.layers.1.self_attn.q_proj.weight",
        "missing from the container: model.layers.1.extra",
    ):
        assert fragment in text, text


def test_build_empty_model_without_config(tmp_path):
    from safetensors.torch import save_file

    save_file({"layers.0.w": torch.ones(4), "head.w": torch.ones(2)}, tmp_path / "bare.safetensors")
    out = pack(tmp_path / "bare.safetensors", tmp_path / "bare.ort", codec="raw", progress=False)
    with ContainerReader(out) as reader, pytest.raises(CheckpointError, match="no model config"):
        build_empty_model(reader)


def test_truncated_after_open_is_a_typed_error_not_sigbus(container):
    path = container("raw")
    script = textwrap.dedent(
        f"""
        import os, torch
        from offload_runtime.errors import CorruptCheckpointError
        from offload_runtime.loaders import ContainerReader
        reader = ContainerReader({str(path)!r})
        last = reader.groups[-1]
        os.truncate({str(path)!r}, 8192)
        for call in (lambda: reader.payload(last.name),
                     lambda: reader.read_into(last.name, torch.empty(last.stored_size, dtype=torch.uint8)),
                     lambda: reader.decode_cpu(last.name, torch.empty(last.layout.size, dtype=torch.uint8))):
            try:
                call()
            except CorruptCheckpointError as exc:
                print("TYPED", exc)
            else:
                print("NO ERROR")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # -7 would be SIGBUS
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("TYPED") for line in lines), proc.stdout
    assert "modified after it was opened" in lines[0] and "group=lm_head" in lines[0]


def test_replaced_after_open(container):
    path = container("raw")
    with ContainerReader(path) as reader:
        replacement = path.with_suffix(".new")
        replacement.write_bytes(path.read_bytes())
        os.replace(replacement, path)
        with pytest.raises(CorruptCheckpointError, match="replaced, truncated or modified"):
            reader.payload(reader.groups[0].name)


# -- forged indexes that used to escape validation (regression tests) ----------------------------------


def _forge_raw_header(path, replace: bytes, by: bytes):
    """Substitute bytes inside the JSON header text, keeping the data section and 4 KiB alignment."""
    rewrite_header(path)  # normalise the JSON spacing so ``replace`` matches
    header, data = split_header(path)
    text = json.dumps(header).encode()
    if replace not in text:
        raise ValueError(f"{replace!r} not in the header")
    text = text.replace(replace, by, 1)
    text += b" " * (-(8 + len(text)) % PAYLOAD_ALIGN)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_header_integer_with_too_many_digits(container):
    path = container()
    _forge_raw_header(path, b'"format":', b'"x": ' + b"9" * 5000 + b', "format":')
    _open_fails(path, CorruptCheckpointError, "not valid JSON")


def test_header_nested_too_deeply(container):
    path = container()
    _forge_raw_header(path, b'"format":', b'"x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "format":')
    _open_fails(path, CorruptCheckpointError, "not valid JSON")


def test_index_string_with_lone_surrogate(container):
    path = container()
    rewrite_header(path, edit_index=lambda ix: ix.update(x="\ud800"))
    header, data = split_header(path)
    raw = json.dumps(header).encode()  # the index string now holds an escaped lone surrogate
    text = raw.replace(b"\\\\ud800", b"\\ud800", 1)
    text += b" " * (-(8 + len(text)) % PAYLOAD_ALIGN)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    try:  # a lone surrogate is odd but harmless: it opens, or fails typed (here: the index checksum)
        with ContainerReader(path):
            pass
    except CorruptCheckpointError as exc:
        assert "index checksum mismatch" in str(exc)


def test_layout_shape_infinite(container):
    path = container()
    _forge_raw_header(path, b'"shape\\": [64, 64]', b'"shape\\": [1e999, 64]')
    _open_fails(path, CorruptCheckpointError, "malformed layout", "group=model.layers.0")


def test_layout_shape_product_overflows_int64(container):
    """[2**32, 2**32] wraps to 0 elements in int64: the layout must not pass as an empty tensor."""
    path = container("raw")

    def forge(index):
        group = _group(index)
        last = group["layout"]["tensors"][-1]
        shrink = group["layout"]["size"] - last["offset"]
        last["shape"] = [2**32, 2**32]
        group["layout"]["size"] -= shrink
        group["chunks"][-1][2] -= shrink

    rewrite_header(path, edit_index=forge)
    _open_fails(path, CorruptCheckpointError, "implausibly large", "group=model.layers.0/")


def test_raw_chunk_decoded_size_differs_from_stored(container):
    """raw copies ``decoded_size`` bytes: a chunk claiming more than it stores must fail on open."""
    path = container("raw")

    def forge(index):
        group = _group(index)
        group["stored_size"] -= 100
        group["chunks"][0][1] -= 100

    rewrite_header(path, edit_index=forge)
    _open_fails(path, CorruptCheckpointError, "raw chunk", "group=model.layers.0", "chunk=0")


def test_alias_to_a_tensor_not_stored(container):
    path = container()
    rewrite_header(path, edit_index=lambda ix: _group(ix).update(aliases={"tied.weight": "no.such.weight"}))
    _open_fails(path, CorruptCheckpointError, "alias", "no.such.weight", "group=model.layers.0")


def test_tensor_stored_twice(container):
    path = container()

    def duplicate(index):
        index["groups"][2]["layout"]["tensors"][0]["name"] = _group(index)["layout"]["tensors"][0]["name"]

    rewrite_header(path, edit_index=duplicate)
    _open_fails(path, CorruptCheckpointError, "stored twice", "group=model.layers.1")


@pytest.mark.parametrize("key, value", [("dtype", 5), ("dtype", "float13"), ("model_class", ["x"])])
def test_index_model_fields_of_the_wrong_type(container, key, value):
    path = container()
    if key == "dtype":
        rewrite_header(path, edit_index=lambda ix: ix.update(dtype=value))
    else:
        rewrite_header(path, edit_index=lambda ix: ix["model"].update(model_class=value))
    _open_fails(path, CorruptCheckpointError, key)


def test_gpu_only_codec_decoded_on_the_cpu_names_the_extra(container):
    """An ``ans`` group (forged from a zstd one: ans cannot encode without a GPU) decoded by decode_cpu."""
    from offload_runtime.native.availability import gpu_codecs_unavailable_reason

    if gpu_codecs_unavailable_reason() is None:
        pytest.skip("nvCOMP is present: the CPU message is about re-packing, not installing")
    path = container("zstd")
    rewrite_header(path, edit_index=lambda ix: _group(ix).update(codec="ans"))
    with ContainerReader(path) as reader:
        out = torch.empty(reader.group("model.layers.0").layout.size, dtype=torch.uint8)
        with pytest.raises(CodecUnavailableError) as info:
            reader.decode_cpu("model.layers.0", out)
    message = str(info.value)
    assert type(info.value) is CodecUnavailableError
    for fragment in (str(path), "group=model.layers.0", "codec=ans", "offload-runtime[cu12]", "[cu13]"):
        assert fragment in message, message


def test_codec_error_names_file_and_group(container):
    """Errors raised inside a codec (here int8 on a zstd group) gain the file and group."""
    path = container("zstd")
    rewrite_header(path, edit_index=lambda ix: _group(ix).update(codec="int8", params={"inner": "zstd"}))
    with ContainerReader(path) as reader:
        out = torch.empty(reader.group("model.layers.0").layout.size, dtype=torch.uint8)
        with pytest.raises(CorruptCheckpointError) as info:
            reader.decode_cpu("model.layers.0", out)
    message = str(info.value)
    assert "int8 chunks do not decode" in message and str(path) in message
    assert "group=model.layers.0" in message


def test_decoder_failure_after_forged_crcs_is_typed(container):
    """A zstd frame with forged CRCs that does not decode: typed error naming file, group and chunk."""
    path = container("zstd")
    start, chunks, _ = _payload_start(path, "model.layers.0")
    raw = bytearray(path.read_bytes())
    raw[start + chunks[0].offset : start + chunks[0].offset + 4] = b"\0\0\0\0"  # destroy the frame magic
    forged = zlib.crc32(bytes(raw[start + chunks[0].offset : start + chunks[0].offset + chunks[0].size]))
    path.write_bytes(raw)
    rewrite_header(path, edit_index=_edit_chunk(0, 3, forged & 0xFFFFFFFF))
    with ContainerReader(path) as reader:
        out = torch.empty(reader.group("model.layers.0").layout.size, dtype=torch.uint8)
        with pytest.raises(CorruptCheckpointError) as info:
            reader.decode_cpu("model.layers.0", out)
    message = str(info.value)
    for fragment in ("does not decode", str(path), "group=model.layers.0", "chunk=0"):
        assert fragment in message, message


@pytest.fixture(scope="module")
def int8_container(tmp_path_factory):
    """An int8 container (inner zstd: decodable on the CPU) of a tiny llama."""
    model = tiny_model("llama", num_layers=2)
    return pack(
        model, tmp_path_factory.mktemp("int8") / "int8.ort", codec="int8", progress=False, device="cpu"
    )


def test_int8_forged_decoded_crc_is_caught(int8_container, tmp_path):
    """int8: the decoded CRCs of the stored (int8 + scales) bytes are checked before dequantising."""
    path = tmp_path / "int8.ort"
    path.write_bytes(int8_container.read_bytes())
    with ContainerReader(path) as reader:
        entry = reader.group("model.layers.0")
        assert entry.codec == "int8" and entry.stored_layout is not None and len(entry.chunks) >= 1
        wrong = (entry.chunks[0].decoded_crc32 + 1) & 0xFFFFFFFF
    rewrite_header(path, edit_index=_edit_chunk(0, 4, wrong))
    with ContainerReader(path) as reader:
        out = torch.empty(reader.group("model.layers.0").layout.size, dtype=torch.uint8)
        with pytest.raises(CorruptCheckpointError) as info:
            reader.decode_cpu("model.layers.0", out)
        other = torch.empty(reader.group("model.layers.1").layout.size, dtype=torch.uint8)
        reader.decode_cpu("model.layers.1", other)  # its CRCs are intact
    message = str(info.value)
    for fragment in ("decoded chunk CRC-32 mismatch", str(path), "group=model.layers.0", "chunk=0"):
        assert fragment in message, message
    assert f"expected={wrong:#010x}" in message
    with ContainerReader(path, verify="never") as reader:  # the policy that skips checks does skip them
        reader.decode_cpu("model.layers.0", out)


def test_int8_forged_decoded_crc_fails_a_forward_from_host_ram(int8_container, tmp_path):
    """Host-tier payloads (copied into RAM at dispatch) get their decoded CRCs checked on first decode."""
    from offload_runtime import load_compressed

    path = tmp_path / "int8.ort"
    path.write_bytes(int8_container.read_bytes())
    with ContainerReader(path) as reader:
        wrong = (reader.group("model.layers.0").chunks[0].decoded_crc32 + 1) & 0xFFFFFFFF
    rewrite_header(path, edit_index=_edit_chunk(0, 4, wrong))
    from offload_runtime.errors import BudgetError

    with pytest.raises(BudgetError) as minimum:
        load_compressed(path, 1e-9, device="cpu")  # below any minimum: the BudgetError names it
    model = load_compressed(path, minimum.value.expected / (1 << 30), device="cpu")  # blocks stream
    assert model.offload_plan.placement("model.layers.0").tier is HOST
    with pytest.raises(CorruptCheckpointError) as info, torch.no_grad():
        model(torch.randint(3, 256, (1, 4)))
    message = str(info.value)
    for fragment in ("decoded chunk CRC-32 mismatch", str(path), "group=model.layers.0", "chunk=0"):
        assert fragment in message, message


def _last_tensor_as_int32(index):
    """A self-consistent edit: the last tensor's float32 read as int32 (same size, same offsets)."""
    spec = index["groups"][-1]["layout"]["tensors"][-1]
    assert spec["dtype"] == "float32"
    spec["dtype"] = "int32"


def test_self_consistent_index_edit_is_caught_by_the_index_checksum(container):
    path = container()
    rewrite_header(path, edit_index=_last_tensor_as_int32, reseal=False)
    error = _open_fails(path, CorruptCheckpointError, "index checksum mismatch")
    assert error.expected != error.actual
    # the same edit with the checksum updated passes every structure check: only the checksum stood
    # between it and weights read as another dtype
    path = container()
    rewrite_header(path, edit_index=_last_tensor_as_int32, reseal=True)
    with ContainerReader(path) as reader:
        assert str(reader.groups[-1].layout.tensors[-1].dtype).endswith("int32")


def test_containers_without_an_index_checksum_still_open(container):
    path = container()  # as written before the checksum existed
    rewrite_header(path, edit_header=lambda header: header["__metadata__"].pop(INDEX_CRC_KEY))
    with ContainerReader(path) as reader:
        assert reader.groups


# -- fused12: plane offsets and sizes in the params are validated like chunk tables ----------------------


@pytest.fixture(scope="module")
def fused12_packed(tmp_path_factory):
    """A fused12 container of a bf16 tiny llama (2-D weights as planes, norms verbatim)."""
    model = tiny_model("llama", num_layers=2, dtype=torch.bfloat16)
    return pack(
        model, tmp_path_factory.mktemp("fused12") / "f.ort", codec="fused12", progress=False, device="cpu"
    )


@pytest.fixture
def fused12_container(fused12_packed, tmp_path):
    path = tmp_path / "f.ort"
    path.write_bytes(fused12_packed.read_bytes())
    return path


def _fused12_rows(index):
    return _group(index)["params"]["tensors"]


def _offset(index, plane):
    return _fused12_rows(index)[0]["offsets"][plane]


def _first_verbatim(index):
    return next(row for row in _fused12_rows(index) if row["kind"] == "verbatim")


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda ix: _fused12_rows(ix)[0]["offsets"].update(codes=_offset(ix, "codes") + 128),
         ("not where the packer puts them", "chunk=0")),
        (lambda ix: _fused12_rows(ix)[1]["offsets"].update(sm=-128),
         ("not where the packer puts them", "chunk=1")),
        (lambda ix: _fused12_rows(ix)[0].update(escapes=10**12), ("escape count",)),
        (lambda ix: _fused12_rows(ix)[0].update(escapes=True), ("escape count",)),
        (lambda ix: _fused12_rows(ix)[0].update(kind="lzma"), ("unknown kind",)),
        (lambda ix: _first_verbatim(ix).update(kind="planes", escapes=0), ("only 2-D bf16",)),
        (lambda ix: _fused12_rows(ix)[0].update(name="model.layers.0.other"), ("does not name the layout",)),
        (lambda ix: _fused12_rows(ix)[0]["offsets"].update(sm="0"), ("name -> integer",)),
        (lambda ix: _fused12_rows(ix).pop(), ("one entry per layout tensor",)),
        (lambda ix: _group(ix)["params"].update(plane_align=16), ("plane alignment",)),
        (lambda ix: _group(ix)["params"].update(tensors=None), ("one entry per layout tensor",)),
        (lambda ix: _group(ix)["chunks"][0].__setitem__(1, _group(ix)["chunks"][0][1] - 128),
         ("does not cover the region", "chunk=0")),
    ],
)  # fmt: skip
def test_fused12_params_forged(fused12_container, edit, fragments):
    path = fused12_container
    rewrite_header(path, edit_index=edit)
    _open_fails(path, CorruptCheckpointError, "fused12", "group=model.layers.0", *fragments)


def test_fused12_damaged_planes_with_resealed_crcs_are_a_typed_error(fused12_container):
    """A payload edit whose chunk CRC was recomputed still never decodes to wrong weights."""
    import zlib

    from container_surgery import join, split

    path = fused12_container
    header, index, data = split(path.read_bytes())
    group = _group(index)
    begin = header[group["tensor"]]["data_offsets"][0]
    codes = begin + _fused12_rows(index)[0]["offsets"]["codes"]
    data = bytearray(data)
    data[codes : codes + 4] = b"\xff" * 4  # code 15 (escape) where the escape list has none
    chunk = group["chunks"][0]
    chunk[3] = zlib.crc32(bytes(data[begin + chunk[0] : begin + chunk[0] + chunk[1]])) & 0xFFFFFFFF
    header["__metadata__"][INDEX_CRC_KEY] = index_crc32(json.dumps(index))  # reseal, as a forger would
    path.write_bytes(join(header, index, bytes(data)))
    with ContainerReader(path) as reader:
        out = torch.empty(reader.group("model.layers.0").layout.size, dtype=torch.uint8)
        with pytest.raises(CorruptCheckpointError) as info:
            reader.decode_cpu("model.layers.0", out)
    message = str(info.value)
    for fragment in (
        "escape list disagrees with the code plane",
        str(path),
        "group=model.layers.0",
        "chunk=0",
    ):
        assert fragment in message, message
