"""GPU tests of the nvCOMP codecs, with the CPU codecs (or the original bytes) as the oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from offload_runtime.native import GroupLayout, get_codec
from offload_runtime.native.ans import AnsCodec
from offload_runtime.native.int8 import Int8Codec
from offload_runtime.native.workspace import DecodeWorkspace
from offload_runtime.native.zstd import ZstdCodec

pytestmark = pytest.mark.gpu


def _bf16_group(rows: int = 700, cols: int = 1024) -> tuple[GroupLayout, np.ndarray, dict[str, torch.Tensor]]:
    tensors = {
        "w": (torch.randn(rows, cols) * 0.02).bfloat16(),  # ~1.4 MB: several ANS/zstd chunks
        "norm": torch.ones(cols, dtype=torch.bfloat16) + torch.randn(cols).bfloat16() * 0.01,
        "odd": torch.randn(37).bfloat16(),
    }
    layout = GroupLayout.from_tensors(tensors.items())
    return layout, layout.pack(tensors), tensors


def _decode_on_side_stream(codec, encoded, layout: GroupLayout, offset: int = 512) -> torch.Tensor:
    """Decode into a slice of a larger, garbage-filled buffer on a non-default stream; return the slice."""
    decoder = codec.gpu_decoder(encoded.chunks, encoded.params, layout, torch.device("cuda"))
    src = torch.from_numpy(encoded.payload).cuda()
    big = torch.full((layout.size + 2 * offset,), 0xCD, dtype=torch.uint8, device="cuda")
    out = big[offset : offset + layout.size]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    decoder.decode(src, out, stream)
    decoder.decode(src, out, stream)  # second call: cached pointer arrays
    stream.synchronize()
    assert (big[:offset] == 0xCD).all() and (big[offset + layout.size :] == 0xCD).all()  # no overrun
    statuses = getattr(getattr(decoder, "inner", decoder), "statuses", None)
    if statuses is not None:
        assert (statuses[: len(encoded.chunks)] == 0).all()
    return out.cpu()


def test_zstd_gpu_decodes_cpu_frames_bit_exact():
    layout, data, _ = _bf16_group()
    codec = ZstdCodec(chunk_size=256 << 10)
    encoded = codec.encode(layout, data)
    assert len(encoded.chunks) > 2
    oracle = torch.empty(layout.size, dtype=torch.uint8)
    codec.decode_cpu(encoded.payload, encoded.chunks, encoded.params, layout, oracle)
    assert torch.equal(_decode_on_side_stream(codec, encoded, layout), oracle)


def test_ans_round_trip_is_bit_exact_and_chunks_are_aligned():
    layout, data, _ = _bf16_group()
    encoded = AnsCodec().encode(layout, data)
    assert encoded.params == {"chunk_size": 256 << 10, "data_type": "<f2"}
    assert len(encoded.chunks) == -(-layout.size // (256 << 10))
    assert all(c.offset % 16 == 0 for c in encoded.chunks)
    assert torch.equal(_decode_on_side_stream(AnsCodec(), encoded, layout), torch.from_numpy(data))


def test_ans_uses_byte_symbols_for_mixed_groups():
    tensors = {"w": torch.randn(300, 300), "ids": torch.arange(100)}
    layout = GroupLayout.from_tensors(tensors.items())
    data = layout.pack(tensors)
    encoded = get_codec("ans").encode(layout, data)
    assert encoded.params["data_type"] == "|u1"
    assert torch.equal(_decode_on_side_stream(AnsCodec(), encoded, layout), torch.from_numpy(data))


def test_ans_decoder_allocates_nothing_after_the_first_call():
    layout, data, _ = _bf16_group()
    encoded = AnsCodec().encode(layout, data)
    decoder = AnsCodec().gpu_decoder(encoded.chunks, encoded.params, layout, torch.device("cuda"))
    src = torch.from_numpy(encoded.payload).cuda()
    out = torch.empty(layout.size, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    decoder.decode(src, out, stream)
    stream.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(5):
        decoder.decode(src, out, stream)
    stream.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    assert decoder.scratch_bytes > 0


@pytest.mark.parametrize("inner", ["zstd", "ans"])
def test_int8_gpu_dequant_meets_the_bound(inner):
    layout, data, tensors = _bf16_group(rows=300, cols=512)
    encoded = Int8Codec(inner=inner).encode(layout, data)
    decoder = Int8Codec().gpu_decoder(encoded.chunks, encoded.params, layout, torch.device("cuda"))
    # the stored bytes are only live during a decode: they come from the (shareable) workspace
    assert decoder.workspace_needs["int8-stored"] == encoded.stored_layout.size
    assert decoder.shared_workspace_bytes >= encoded.stored_layout.size
    out = _decode_on_side_stream(Int8Codec(), encoded, layout)
    decoded = layout.views(out)
    w, got = tensors["w"].float(), decoded["w"].float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    bound = scale / 2 * (1 + 1e-5) + w.abs() * torch.finfo(torch.bfloat16).eps
    assert ((got - w).abs() <= bound).all()
    assert torch.equal(decoded["norm"], tensors["norm"]) and torch.equal(decoded["odd"], tensors["odd"])
    if inner == "zstd":  # the CPU path is the oracle: same fp32 multiply, same rounding to bf16
        oracle = torch.empty(layout.size, dtype=torch.uint8)
        Int8Codec().decode_cpu(encoded.payload, encoded.chunks, encoded.params, layout, oracle)
        expected = layout.views(oracle)  # compare tensors: the layout's padding bytes are never written
        assert all(torch.equal(decoded[name], expected[name]) for name in tensors)


def test_ans_ratio_on_minilm_bf16_is_at_least_1_40():
    from offload_runtime.packaged import minilm_dir

    try:
        folder = minilm_dir()
    except ModuleNotFoundError as exc:
        pytest.skip(f"MiniLM weights not installed here: {exc}")
    from safetensors.torch import load_file

    tensors = {
        k: v.bfloat16() for k, v in load_file(folder / "model.safetensors").items() if v.is_floating_point()
    }
    layout = GroupLayout.from_tensors(tensors.items())
    data = layout.pack(tensors)
    encoded = AnsCodec().encode(layout, data)
    ratio = data.size / encoded.payload.size
    assert ratio >= 1.40, f"ANS <f2 ratio on MiniLM bf16 is {ratio:.3f}"
    assert torch.equal(_decode_on_side_stream(AnsCodec(), encoded, layout), torch.from_numpy(data))


@pytest.mark.parametrize("name", ["ans", "zstd", "int8"])
def test_decoders_share_one_workspace_bit_exact_and_allocation_free(name):
    """Groups of different sizes decode through one shared workspace, on one stream and then another."""
    codecs = {"ans": AnsCodec(), "zstd": ZstdCodec(chunk_size=256 << 10), "int8": Int8Codec(inner="zstd")}
    codec = codecs[name]
    device = torch.device("cuda", torch.cuda.current_device())
    workspace = DecodeWorkspace(device)
    cases = []
    for rows in (200, 900):  # the larger group needs more nvCOMP temp space
        layout, data, _ = _bf16_group(rows=rows)
        encoded = codec.encode(layout, data)
        decoder = codec.gpu_decoder(encoded.chunks, encoded.params, layout, device)
        decoder.use_workspace(workspace)
        oracle = torch.from_numpy(data.copy())  # lossless: the original bytes
        if name == "int8":  # the CPU path is the oracle of the GPU dequantisation
            codec.decode_cpu(encoded.payload, encoded.chunks, encoded.params, layout, oracle)
        src = torch.from_numpy(encoded.payload).to(device)
        out = torch.empty(layout.size, dtype=torch.uint8, device=device)
        cases.append((decoder, src, out, layout, oracle))
    needs = [c[0].workspace_needs for c in cases]
    assert workspace.sizes == {k: max(n.get(k, 0) for n in needs) for k in set().union(*needs)}
    if name != "ans":  # nvCOMP ANS needs no temp space (measured: 0 bytes); Zstd and int8 do
        assert 0 < workspace.nbytes < sum(c[0].shared_workspace_bytes for c in cases)  # shared, not summed
    stream, other = torch.cuda.Stream(device), torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    workspace.allocate(stream)
    for decoder, src, out, *_ in cases:  # first decodes build the cached pointer arrays
        decoder.decode(src, out, stream)
    stream.synchronize()
    before = torch.cuda.memory_stats(device)["allocation.all.allocated"]
    for _ in range(3):
        for decoder, src, out, *_ in cases:
            with torch.cuda.stream(stream):
                out.fill_(0xCD)  # garbage, in stream order: each decode must rewrite every byte
            decoder.decode(src, out, stream)
    # another stream, with no explicit ordering: the workspace's event orders it after the decodes above
    for decoder, src, out, *_ in reversed(cases):
        decoder.decode(src, out, other)
    other.synchronize()
    stream.synchronize()
    assert torch.cuda.memory_stats(device)["allocation.all.allocated"] == before
    for _, _, out, layout, oracle in cases:
        got, want = layout.views(out.cpu()), layout.views(oracle)
        assert all(torch.equal(got[k], want[k]) for k in want)
