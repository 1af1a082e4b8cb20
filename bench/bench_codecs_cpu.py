"""CPU codec benchmarks on real weights (run in CI; results are checked, not just timed)."""

import pytest
import torch
import zstandard
from safetensors.torch import load_file

from offload_runtime.packaged import minilm_dir


@pytest.fixture(scope="module")
def minilm_embedding() -> torch.Tensor:
    weights = load_file(minilm_dir() / "model.safetensors")
    return weights["embeddings.word_embeddings.weight"]  # 30522 x 384 fp32, the largest tensor


def test_zstd_decode_minilm_embedding(benchmark, minilm_embedding):
    raw = minilm_embedding.numpy().tobytes()
    frame = zstandard.ZstdCompressor(level=3).compress(raw)
    decompressor = zstandard.ZstdDecompressor()

    decoded = benchmark(decompressor.decompress, frame)

    assert decoded == raw  # bit-exact
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["decoded_bytes"] = len(raw)
    benchmark.extra_info["ratio"] = len(raw) / len(frame)
    benchmark.extra_info["decode_GBps"] = len(raw) / seconds / 1e9


@pytest.fixture(scope="module")
def minilm_group():
    """All of MiniLM's tensors (fp32, ~90 MB) as one group, packed as a container stores it."""
    from offload_runtime.native import GroupLayout

    weights = load_file(minilm_dir() / "model.safetensors")
    layout = GroupLayout.from_tensors(weights.items())
    return layout, layout.pack(weights)


@pytest.mark.parametrize("name", ["raw", "zstd", "int8-cpu"])
def test_codec_decode_cpu_minilm(benchmark, name, minilm_group):
    from offload_runtime.native import get_codec
    from offload_runtime.native.int8 import Int8Codec

    layout, data = minilm_group
    codec = Int8Codec(inner="zstd") if name == "int8-cpu" else get_codec(name)
    encoded = codec.encode(layout, data)
    out = torch.empty(layout.size, dtype=torch.uint8)

    benchmark(codec.decode_cpu, encoded.payload, encoded.chunks, encoded.params, layout, out)

    original, decoded = torch.from_numpy(data), out
    if codec.lossless:
        assert torch.equal(decoded, original)  # bit-exact
    else:  # every quantised row within half a scale of the original
        ref, got = layout.views(original), layout.views(decoded)
        for spec in layout.tensors:
            w, d = ref[spec.name], got[spec.name]
            if w.dim() == 2 and w.is_floating_point():
                bound = w.abs().amax(dim=1, keepdim=True) / 127 / 2 * (1 + 1e-5) + w.abs() * 1.2e-7
                assert ((d - w).abs() <= bound).all(), spec.name
            else:
                assert torch.equal(d, w), spec.name
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["decoded_bytes"] = layout.size
    benchmark.extra_info["ratio"] = layout.size / encoded.payload.size
    benchmark.extra_info["decode_GBps"] = layout.size / seconds / 1e9
