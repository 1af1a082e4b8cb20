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
