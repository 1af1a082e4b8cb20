"""CPU tests of the codecs in ``offload_runtime.native``: round trips, int8 error bound, codec selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload_runtime.errors import CodecUnavailableError, CorruptCheckpointError
from offload_runtime.native import GroupLayout, get_codec, resolve_codec
from offload_runtime.native.availability import NVCOMP_EXTRA_HINT, gpu_codecs_unavailable_reason
from offload_runtime.native.int8 import SCALE_SUFFIX, Int8Codec, stored_layout_for
from offload_runtime.native.zstd import ZSTD_FRAME_ALIGN, ZstdCodec

NO_GPU = gpu_codecs_unavailable_reason() is not None


def _group(tensors: dict[str, torch.Tensor]) -> tuple[GroupLayout, np.ndarray]:
    layout = GroupLayout.from_tensors(tensors.items())
    return layout, layout.pack(tensors)


def _round_trip(codec, layout: GroupLayout, data: np.ndarray) -> torch.Tensor:
    encoded = codec.encode(layout, data)
    out = torch.full((layout.size,), 0xAB, dtype=torch.uint8)  # garbage: every byte must be overwritten
    codec.decode_cpu(encoded.payload, encoded.chunks, encoded.params, layout, out)
    return out


def _mixed_tensors() -> dict[str, torch.Tensor]:
    wide = torch.randn(64, 90)
    return {
        "fp32": torch.randn(33, 17),
        "fp16": torch.randn(7, 5).half(),
        "bf16": torch.randn(301).bfloat16(),  # odd size
        "int8": torch.randint(-128, 127, (13,), dtype=torch.int8),
        "empty": torch.empty(0, 4),
        "strided": wide[:, ::3],  # non-contiguous source
        "transposed": torch.randn(9, 11).t(),
    }


@pytest.mark.parametrize("name", ["raw", "zstd"])
def test_lossless_round_trip_is_bit_exact_on_mixed_dtypes(name):
    layout, data = _group(_mixed_tensors())
    out = _round_trip(get_codec(name), layout, data)
    assert torch.equal(out, torch.from_numpy(data))


@pytest.mark.parametrize("name", ["raw", "zstd"])
def test_lossless_round_trip_of_an_empty_group(name):
    # GroupLayout.pack cannot view a 0-byte buffer, so build the (empty) packed bytes directly
    layout, data = GroupLayout.from_tensors([("empty", torch.empty(0))]), np.zeros(0, np.uint8)
    encoded = get_codec(name).encode(layout, data)
    assert encoded.chunks == []
    get_codec(name).decode_cpu(
        encoded.payload, encoded.chunks, encoded.params, layout, torch.empty(0, dtype=torch.uint8)
    )


@pytest.mark.parametrize("name", ["raw", "fused12"])
@pytest.mark.parametrize(
    "bad",
    [
        torch.empty(0, dtype=torch.uint8),  # too short
        torch.empty(1 << 12, dtype=torch.int8),
        torch.empty(2, 1 << 11, dtype=torch.uint8),
        torch.empty(1 << 12, dtype=torch.uint8, device="meta"),
    ],
    ids=["short", "int8", "2-D", "not-cpu"],
)
def test_cpu_decoders_refuse_an_output_they_cannot_write(name, bad):
    layout, data = _group({"w": torch.randn(8, 16).bfloat16(), "b": torch.randn(5)})
    encoded = get_codec(name).encode(layout, data)
    with pytest.raises(ValueError, match=rf"need a 1-D uint8 CPU output of >= {layout.size} bytes"):
        get_codec(name).decode_cpu(encoded.payload, encoded.chunks, encoded.params, layout, bad)


def test_zstd_multi_chunk_group_gives_aligned_independent_frames():
    codec = ZstdCodec(chunk_size=4096)
    layout, data = _group({"w": torch.randn(10_000).bfloat16(), "b": torch.randn(3)})
    encoded = codec.encode(layout, data)
    assert len(encoded.chunks) == -(-layout.size // 4096)
    assert all(c.offset % ZSTD_FRAME_ALIGN == 0 for c in encoded.chunks)
    assert [c.decoded_size for c in encoded.chunks][:-1] == [4096] * (len(encoded.chunks) - 1)
    # each frame decodes alone (what nvCOMP's batched GPU Zstd relies on)
    import zstandard

    third = encoded.chunks[2]
    frame = encoded.payload[third.offset : third.offset + third.size].tobytes()
    assert zstandard.ZstdDecompressor().decompress(frame) == data[2 * 4096 : 3 * 4096].tobytes()
    out = _round_trip(codec, layout, data)
    assert torch.equal(out, torch.from_numpy(data))


def test_zstd_decodes_into_a_non_contiguous_output():
    layout, data = _group({"w": torch.randn(2000)})
    encoded = ZstdCodec(chunk_size=1024).encode(layout, data)
    backing = torch.zeros(2 * layout.size, dtype=torch.uint8)
    out = backing[::2]
    ZstdCodec().decode_cpu(encoded.payload, encoded.chunks, encoded.params, layout, out)
    assert torch.equal(out, torch.from_numpy(data))


def test_zstd_corrupt_frame_names_the_chunk():
    layout, data = _group({"w": torch.randn(5000)})
    encoded = ZstdCodec(chunk_size=4096).encode(layout, data)
    bad = encoded.payload.copy()
    second = encoded.chunks[1]
    bad[second.offset : second.offset + 8] = 0xFF  # clobber the frame's magic number
    with pytest.raises(CorruptCheckpointError, match=r"chunk=1"):
        ZstdCodec().decode_cpu(
            bad, encoded.chunks, encoded.params, layout, torch.empty(layout.size, dtype=torch.uint8)
        )


def test_zstd_frame_longer_than_the_index_says_is_rejected():
    layout, data = _group({"w": torch.randn(2048)})
    encoded = ZstdCodec(chunk_size=4096).encode(layout, data)
    first = encoded.chunks[0]
    lying = [
        type(first)(first.offset, first.size, first.decoded_size - 256, first.crc32, first.decoded_crc32)
    ]
    with pytest.raises(CorruptCheckpointError, match="wrong size"):
        ZstdCodec().decode_cpu(
            encoded.payload, lying, encoded.params, layout, torch.empty(layout.size, dtype=torch.uint8)
        )


@pytest.mark.parametrize("name", ["raw", "zstd"])
def test_lossless_round_trip_on_minilm_weights(name, minilm):
    model, _ = minilm
    tensors = dict(list(model.state_dict().items())[:12])
    layout, data = _group(tensors)
    out = _round_trip(get_codec(name), layout, data)
    assert torch.equal(out, torch.from_numpy(data))
    decoded = layout.views(out)
    assert all(torch.equal(decoded[k], v) for k, v in tensors.items())


def _assert_int8_bound(original: dict[str, torch.Tensor], layout: GroupLayout, out: torch.Tensor) -> int:
    """Check every quantised row is within scale/2 (+ target rounding); return how many tensors checked."""
    decoded, checked = layout.views(out), 0
    for name, w in original.items():
        got = decoded[name]
        assert got.dtype == w.dtype
        if w.dim() != 2 or not w.is_floating_point() or w.numel() == 0:
            assert torch.equal(got, w), name  # stored losslessly
            continue
        ref = w.float()
        scale = ref.abs().amax(dim=1) / 127
        eps = torch.finfo(w.dtype).eps
        bound = scale[:, None] / 2 * (1 + 1e-5) + ref.abs() * eps + 1e-30
        assert ((got.float() - ref).abs() <= bound).all(), name
        checked += 1
    return checked


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_error_per_row_is_at_most_half_a_scale(dtype):
    weights = torch.randn(48, 40) * torch.logspace(-3, 2, 48)[:, None]  # rows of very different ranges
    weights[5] = 0  # an all-zero row must decode to zeros
    tensors = {"w": weights.to(dtype), "bias": torch.randn(48).to(dtype), "ids": torch.arange(6)}
    layout, data = _group(tensors)
    out = _round_trip(Int8Codec(inner="zstd"), layout, data)
    assert _assert_int8_bound(tensors, layout, out) == 1
    assert torch.equal(layout.views(out)["w"][5], torch.zeros(40, dtype=dtype))


def test_int8_stored_layout_holds_int8_values_and_fp32_scales():
    layout, data = _group({"w": torch.randn(16, 8).half(), "b": torch.randn(16).half()})
    encoded = Int8Codec(inner="zstd").encode(layout, data)
    stored = encoded.stored_layout
    assert stored == stored_layout_for(layout)
    assert stored.spec("w").dtype == "int8" and stored.spec("w").shape == (16, 8)
    assert stored.spec("w" + SCALE_SUFFIX).dtype == "float32" and stored.spec("w" + SCALE_SUFFIX).shape == (
        16,
    )
    assert stored.spec("b").dtype == "float16"
    assert sum(c.decoded_size for c in encoded.chunks) == stored.size
    assert encoded.params["inner"] == "zstd" and encoded.params["inner_params"]["chunk_size"] > 0


def test_int8_on_minilm_weights_meets_the_bound(minilm):
    model, _ = minilm
    tensors = {k: v.bfloat16() for k, v in list(model.state_dict().items())[:10]}
    layout, data = _group(tensors)
    encoded = Int8Codec(inner="zstd").encode(layout, data)
    out = torch.empty(layout.size, dtype=torch.uint8)
    Int8Codec().decode_cpu(encoded.payload, encoded.chunks, encoded.params, layout, out)
    assert _assert_int8_bound(tensors, layout, out) >= 3
    assert encoded.payload.size < 0.6 * data.size  # int8 halves bf16 before the inner codec


def test_int8_rejects_non_finite_weights_naming_the_tensor():
    weights = torch.randn(4, 4)
    weights[2, 1] = float("nan")
    layout, data = _group({"layer.w": weights})
    with pytest.raises(ValueError, match=r"'layer.w': row 2"):
        Int8Codec(inner="zstd").encode(layout, data)


def test_int8_chunk_table_that_disagrees_with_the_layout_is_corrupt():
    layout, data = _group({"w": torch.randn(8, 8)})
    encoded = Int8Codec(inner="zstd").encode(layout, data)
    other = GroupLayout.from_tensors([("w", torch.randn(40, 8))])
    with pytest.raises(CorruptCheckpointError, match="stored layout"):
        Int8Codec().decode_cpu(
            encoded.payload, encoded.chunks, encoded.params, other, torch.empty(other.size, dtype=torch.uint8)
        )


def test_ans_has_no_cpu_decoder():
    with pytest.raises(CodecUnavailableError) as info:
        get_codec("ans").decode_cpu(
            np.zeros(0, np.uint8), [], {}, GroupLayout((), 0), torch.empty(0, dtype=torch.uint8)
        )
    assert info.value.codec == "ans" and info.value.alternative == "zstd"
    assert "a CPU ANS decoder (nvCOMP has none)" in str(info.value)


@pytest.mark.skipif(not NO_GPU, reason="checks the behaviour without CUDA/nvCOMP")
def test_auto_resolves_to_zstd_without_a_gpu():
    bf16 = GroupLayout.from_tensors([("w", torch.zeros(4, 4, dtype=torch.bfloat16))])
    assert resolve_codec("auto").name == "zstd"
    assert resolve_codec("auto", bf16).name == "zstd"


def test_auto_resolves_to_zstd_on_cpu_or_for_fp32_groups():
    fp32 = GroupLayout.from_tensors([("w", torch.zeros(4, 4))])
    assert resolve_codec("auto", None, device="cpu").name == "zstd"
    assert resolve_codec("auto", fp32).name == "zstd"


@pytest.mark.skipif(not NO_GPU, reason="checks the behaviour without CUDA/nvCOMP")
def test_ans_without_a_gpu_raises_with_the_install_hint():
    with pytest.raises(CodecUnavailableError) as info:
        resolve_codec("ans")
    err = info.value
    assert err.codec == "ans" and err.alternative == "zstd"
    assert gpu_codecs_unavailable_reason() in str(err) and NVCOMP_EXTRA_HINT in str(err)
    with pytest.raises(CodecUnavailableError, match="offload-runtime"):
        get_codec("ans").encode(GroupLayout((), 0), np.zeros(0, np.uint8))
    assert "cu12" in NVCOMP_EXTRA_HINT


def test_ans_for_cpu_decoding_raises():
    with pytest.raises(CodecUnavailableError, match="a CPU ANS decoder"):
        resolve_codec("ans", device="cpu")


def test_resolve_int8_picks_an_inner_codec_that_runs_here():
    assert resolve_codec("int8", device="cpu").inner == "zstd"
    expected = "zstd" if NO_GPU else "ans"
    assert resolve_codec("int8").inner == expected


def test_resolve_by_name_and_unknown_names():
    assert resolve_codec("raw").name == "raw"
    assert get_codec("zstd").name == "zstd"
    with pytest.raises(CodecUnavailableError, match="known codecs: ") as info:
        resolve_codec("lz5")
    # every stored codec is listed (loaders may have registered their in-memory one too, when imported)
    listed = str(info.value).split("known codecs: ")[1].split(" [")[0].split(", ")
    assert {"ans", "fused12", "int8", "raw", "zstd"} <= set(listed) and listed == sorted(listed)


@pytest.mark.parametrize("name", ["raw", "zstd", "int8", "fused12"])
def test_decode_from_a_read_only_payload_warns_nothing(name):
    """Container payloads are read-only views: decoding one must not raise torch's non-writable warning."""
    import warnings

    layout, data = _group(_mixed_tensors())
    codec = Int8Codec(inner="zstd") if name == "int8" else get_codec(name)
    encoded = codec.encode(layout, data)
    payload = memoryview(encoded.payload.tobytes())  # read-only, like a view of the container's mmap
    assert payload.readonly
    out = torch.empty(layout.size, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codec.decode_cpu(payload, encoded.chunks, encoded.params, layout, out, verify_decoded=True)
    if name != "int8":
        assert bytes(out.numpy()) == bytes(data)


@pytest.mark.parametrize("name", ["raw", "zstd"])
def test_verify_decoded_names_the_chunk(name):
    layout, data = _group({"w": torch.randn(600, 1024)})  # 2.4 MB: several chunks of 1 MiB
    codec = get_codec(name)
    encoded = type(codec)(chunk_size=1 << 20).encode(layout, data)
    chunks = list(encoded.chunks)
    assert len(chunks) >= 3
    bad = chunks[2]
    chunks[2] = type(bad)(bad.offset, bad.size, bad.decoded_size, bad.crc32, bad.decoded_crc32 ^ 1)
    out = torch.empty(layout.size, dtype=torch.uint8)
    codec.decode_cpu(encoded.payload, chunks, encoded.params, layout, out)  # not asked: not checked
    with pytest.raises(CorruptCheckpointError, match="decoded chunk CRC-32 mismatch") as info:
        codec.decode_cpu(encoded.payload, chunks, encoded.params, layout, out, verify_decoded=True)
    assert info.value.chunk == 2


def test_gpu_decode_report_names_every_faulty_chunk():
    from offload_runtime.native.nvcomp_backend import chunk_faults

    sizes = np.array([256, 256, 256, 100], dtype=np.int64)
    crcs = np.array([1, 2, 3, 4], dtype=np.uint32)
    ok = np.zeros(4, dtype=np.int32)
    report = dict(expected_sizes=sizes, expected_crcs=crcs, crc_statuses=ok)
    assert chunk_faults(statuses=ok, actual_sizes=sizes, crcs=crcs, **report) == []
    statuses = np.array([0, 0, 5, 0], dtype=np.int32)
    short = np.array([256, 200, 256, 100], dtype=np.int64)
    flipped = np.array([1, 2, 3, 0xDEADBEEF], dtype=np.uint32)
    faults = chunk_faults(statuses=statuses, actual_sizes=short, crcs=flipped, **report)
    assert faults == [
        (1, "decoded 200 bytes, expected 256"),
        (2, "nvCOMP decode status 5"),
        (3, "decoded CRC-32 0xdeadbeef, expected 0x00000004"),
    ]
    # without CRCs (an nvCOMP without the CRC32 API) statuses and sizes are still checked
    assert chunk_faults(statuses=statuses, actual_sizes=sizes, expected_sizes=sizes) == [
        (2, "nvCOMP decode status 5")
    ]
