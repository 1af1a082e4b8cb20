"""pack throughput on real weights (MiniLM, 90 MB fp32), checked: the container decodes bit-exactly."""

import pytest
import torch

from offload_runtime.loaders import ContainerReader, load_state_dict, pack


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_pack_throughput(benchmark, minilm, codec, tmp_path):
    model, _ = minilm
    out = tmp_path / "m.ort"

    # overwrite=True: each round replaces the previous round's container
    kwargs = {"codec": codec, "progress": False, "overwrite": True}
    benchmark.pedantic(pack, args=(model, out), kwargs=kwargs, rounds=3)

    with ContainerReader(out) as reader:
        state = load_state_dict(reader)
        stored = sum(g.stored_size for g in reader.groups)
        decoded = sum(g.decoded_size for g in reader.groups)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["decoded_bytes"] = decoded
    benchmark.extra_info["ratio"] = decoded / stored
    benchmark.extra_info["pack_MBps"] = decoded / seconds / 1e6
    if codec == "zstd":
        assert decoded / stored > 1.0  # zstd must compress real fp32 weights at least a little
