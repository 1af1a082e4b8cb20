"""The ``fused12`` container codec: exact round trips, plane views of a payload, ratio, containers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload_runtime.errors import CodecUnavailableError, CorruptCheckpointError
from offload_runtime.loaders import ContainerReader, load_state_dict, pack
from offload_runtime.loaders.load import load_model
from offload_runtime.native import GroupLayout, get_codec
from offload_runtime.native import fused12_format as fmt
from offload_runtime.native.base import Chunk
from offload_runtime.native.fused12 import PLANE_ALIGN, PLANES, VERBATIM, parse_params, tensor_views
from offload_runtime.native.layout import TENSOR_ALIGN
from offload_runtime.tiny import tiny_model


def _mixed() -> dict[str, torch.Tensor]:
    weight = (torch.randn(33, 70) * 0.02).bfloat16()
    weight[0, :4] = torch.tensor([float("nan"), float("-inf"), 0.0, 1e-40])
    zeros = torch.zeros(8, 16, dtype=torch.bfloat16)
    zeros[0, 0] = 1.0  # 99% escapes: stored verbatim
    return {
        "proj.weight": weight,
        "proj.bias": torch.randn(33).bfloat16(),
        "norm.weight": torch.ones(70, dtype=torch.bfloat16),
        "half.weight": torch.randn(9, 13).half(),
        "fp32.weight": torch.randn(5, 7),
        "mostly_zero.weight": zeros,
        "empty.weight": torch.empty(0, 4, dtype=torch.bfloat16),
        "ids": torch.arange(11, dtype=torch.int64),
        "row.weight": (torch.randn(1, 3) * 0.1).bfloat16(),
    }


def _encode(tensors):
    layout = GroupLayout.from_tensors(tensors.items())
    data = layout.pack(tensors)
    return layout, data, get_codec("fused12").encode(layout, data)


def test_round_trip_is_bit_exact_and_kinds_are_per_tensor():
    layout, data, encoded = _encode(_mixed())
    out = torch.full((layout.size,), 0xAB, dtype=torch.uint8)  # padding must be written too
    get_codec("fused12").decode_cpu(
        encoded.payload, encoded.chunks, encoded.params, layout, out, verify_decoded=True
    )
    assert torch.equal(out, torch.from_numpy(data))
    kinds = {row["name"]: row["kind"] for row in encoded.params["tensors"]}
    assert kinds["proj.weight"] == kinds["row.weight"] == PLANES
    for name in ("proj.bias", "norm.weight", "half.weight", "fp32.weight", "mostly_zero.weight", "ids"):
        assert kinds[name] == VERBATIM, name
    assert encoded.stored_layout is None  # decodes to the layout itself


def test_chunks_cover_one_tensor_each_with_crcs():
    layout, data, encoded = _encode(_mixed())
    with_bytes = [t for t in layout.tensors if t.nbytes]
    assert len(encoded.chunks) == len(with_bytes)
    assert sum(c.decoded_size for c in encoded.chunks) == layout.size
    entries = parse_params(encoded.params, layout, encoded.chunks)
    for entry in entries:
        assert entry.start % PLANE_ALIGN == 0
        assert all(offset % PLANE_ALIGN == 0 for offset in entry.offsets.values())
    # a damaged decoded byte (here: in the planes of proj.weight's chunk) is named by its chunk
    out = torch.from_numpy(data.copy())
    out[5] ^= 1
    from offload_runtime.native.chunking import check_decoded_crcs

    with pytest.raises(CorruptCheckpointError, match="chunk=0"):
        check_decoded_crcs(out.numpy(), encoded.chunks)


def test_plane_views_of_a_payload_are_the_encoding():
    tensors = _mixed()
    layout, _, encoded = _encode(tensors)
    payload = torch.from_numpy(encoded.payload)
    views = tensor_views(payload, encoded.params, layout, encoded.chunks)
    planes = views["proj.weight"]
    assert isinstance(planes, fmt.Planes)
    assert (
        planes.sm.data_ptr()
        == payload.data_ptr() + parse_params(encoded.params, layout, encoded.chunks)[0].offsets["sm"]
    )
    reference = fmt.encode(tensors["proj.weight"])
    for name, tensor in reference.planes().items():
        assert torch.equal(getattr(planes, name), tensor), name
    assert torch.equal(fmt.decode(planes).view(torch.int16), tensors["proj.weight"].view(torch.int16))
    assert torch.equal(views["proj.bias"], tensors["proj.bias"])
    assert torch.equal(views["half.weight"], tensors["half.weight"])
    assert views["empty.weight"].shape == (0, 4)


def test_random_normal_group_is_1_30x_smaller():
    tensors = {f"layer.{i}.weight": (torch.randn(256, 576) * 0.02).bfloat16() for i in range(3)}
    tensors["layer.norm"] = torch.ones(576, dtype=torch.bfloat16)
    layout, _, encoded = _encode(tensors)
    assert layout.size / encoded.payload.size >= 1.30


def test_round_trip_of_an_empty_group():
    layout = GroupLayout.from_tensors([("empty", torch.empty(0, 3, dtype=torch.bfloat16))])
    assert layout.size == 0
    encoded = get_codec("fused12").encode(layout, np.zeros(0, np.uint8))
    assert encoded.chunks == [] and encoded.payload.size == 0
    assert [(row["name"], row["kind"]) for row in encoded.params["tensors"]] == [("empty", VERBATIM)]
    get_codec("fused12").decode_cpu(
        encoded.payload, encoded.chunks, encoded.params, layout, torch.empty(0, dtype=torch.uint8)
    )
    view = tensor_views(torch.from_numpy(encoded.payload), encoded.params, layout, encoded.chunks)["empty"]
    assert view.shape == (0, 3) and view.dtype == torch.bfloat16


def test_zero_element_tensors_among_others_are_verbatim_and_have_no_chunk():
    """A tensor without elements is stored verbatim (it has no planes to compute from) and, having no
    bytes, no chunk; the tensors around it keep their planes and round-trip exactly."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": (torch.randn(16, 32, generator=generator) * 0.02).bfloat16(),
        "no_rows.weight": torch.empty(0, 32, dtype=torch.bfloat16),
        "no_cols.weight": torch.empty(4, 0, dtype=torch.bfloat16),
        "b.weight": (torch.randn(8, 32, generator=generator) * 0.02).bfloat16(),
        "empty.bias": torch.empty(0),
    }
    layout, data, encoded = _encode(tensors)
    out = torch.full((layout.size,), 0xAB, dtype=torch.uint8)
    get_codec("fused12").decode_cpu(
        encoded.payload, encoded.chunks, encoded.params, layout, out, verify_decoded=True
    )
    assert torch.equal(out, torch.from_numpy(data))
    kinds = {row["name"]: row["kind"] for row in encoded.params["tensors"]}
    assert kinds == {
        "a.weight": PLANES,
        "no_rows.weight": VERBATIM,
        "no_cols.weight": VERBATIM,
        "b.weight": PLANES,
        "empty.bias": VERBATIM,
    }
    assert len(encoded.chunks) == 2  # a.weight's and b.weight's
    views = tensor_views(torch.from_numpy(encoded.payload), encoded.params, layout, encoded.chunks)
    for name in ("no_rows.weight", "no_cols.weight", "empty.bias"):
        assert views[name].shape == tensors[name].shape and views[name].dtype == tensors[name].dtype
    assert torch.equal(fmt.decode(views["b.weight"]), tensors["b.weight"])


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 0)])
def test_format_round_trips_a_matrix_without_elements(shape):
    planes = fmt.encode(torch.empty(shape, dtype=torch.bfloat16))
    fmt.check(planes)
    assert (planes.rows, planes.cols) == shape and planes.esc.numel() == 0
    assert planes.esc_ptr.tolist() == [0] * (shape[0] + 1)
    decoded = fmt.decode(planes)
    assert decoded.shape == shape and decoded.dtype == torch.bfloat16


def test_a_corrupt_plane_is_a_typed_error_naming_the_chunk():
    layout, _, encoded = _encode(_mixed())
    entry = parse_params(encoded.params, layout, encoded.chunks)[0]
    payload = encoded.payload.copy()
    payload[entry.offsets["codes"] : entry.offsets["codes"] + 4] = 0xFF  # codes 15 without escape entries
    out = torch.empty(layout.size, dtype=torch.uint8)
    with pytest.raises(CorruptCheckpointError, match="disagrees with the code plane") as info:
        get_codec("fused12").decode_cpu(payload, encoded.chunks, encoded.params, layout, out)
    assert info.value.chunk == 0 and "proj.weight" in str(info.value)


def test_cpu_decode_unpacks_each_planes_tensor_once(monkeypatch):
    layout, data, encoded = _encode(_mixed())
    calls = []
    unpack = fmt.unpack_fields
    monkeypatch.setattr(fmt, "unpack_fields", lambda planes: calls.append(planes.rows) or unpack(planes))
    out = torch.empty(layout.size, dtype=torch.uint8)
    get_codec("fused12").decode_cpu(encoded.payload, encoded.chunks, encoded.params, layout, out)
    assert torch.equal(out, torch.from_numpy(data))
    assert sorted(calls) == [1, 33]  # row.weight and proj.weight: checked and decoded from one unpack


def test_gpu_decoder_needs_cuda_and_triton():
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the GPU decoder is tested in test_fused12_gpu.py")
    layout, _, encoded = _encode(_mixed())
    with pytest.raises(CodecUnavailableError, match="fused12"):
        get_codec("fused12").gpu_decoder(encoded.chunks, encoded.params, layout, torch.device("cpu"))


def test_tiny_llama_container_round_trip_and_identical_logits(tmp_path):
    model = tiny_model("llama", num_layers=2, dtype=torch.bfloat16)
    path = pack(model, tmp_path / "m.ort", codec="fused12", progress=False, device="cpu")
    with ContainerReader(path) as reader:
        assert {g.codec for g in reader.groups} == {"fused12"}
        state = load_state_dict(reader)
        for name, tensor in model.state_dict().items():
            assert torch.equal(state[name].view(torch.uint8), tensor.view(torch.uint8)), name
        stored = sum(g.stored_size for g in reader.groups)
        decoded = sum(g.layout.size for g in reader.groups)
        rebuilt = load_model(reader)
    assert decoded / stored > 1.0
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, rebuilt(ids).logits)


def test_layout_alignment_is_a_multiple_of_the_plane_alignment():
    assert TENSOR_ALIGN % 16 == 0 and PLANE_ALIGN % 16 == 0


@pytest.mark.parametrize("checksums", [True, False])
def test_encoding_on_the_buffers_device_equals_encode(checksums):
    """encode_held (what encode_tensor runs on a CUDA buffer) writes encode's payload and chunk table; without
    checksums, the same with CRCs 0 (a synthetic re-encode compares payloads, not CRCs)."""
    from offload_runtime.native.fused12 import encode_held

    tensors = {
        "a.weight": (torch.randn(64, 96) * 0.02).bfloat16(),
        "b.bias": torch.randn(7),
        "c.weight": (torch.randn(33, 40) * 0.02).bfloat16(),
    }
    tensors["a.weight"][0, :3] = torch.tensor([0.0, float("nan"), float("-inf")])
    layout = GroupLayout.from_tensors(tensors.items())
    data = layout.pack(tensors)
    codec = get_codec("fused12")
    reference = codec.encode(layout, data)
    got = encode_held(
        layout, [torch.from_numpy(data.copy())], checksums, lambda n: torch.empty(n, dtype=torch.uint8)
    )
    payload = torch.empty(got.stored_size, dtype=torch.uint8)
    got.write(payload)
    assert np.array_equal(payload.numpy(), reference.payload)
    assert got.params == reference.params
    expected = [c if checksums else Chunk(c.offset, c.size, c.decoded_size, 0, 0) for c in reference.chunks]
    assert got.chunks == expected
