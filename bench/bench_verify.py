"""Cost of the checksum policies (verify="once" | "always" | "never") on reading + decoding MiniLM (zstd).

Each round opens the container and decodes every group three times, as a runtime re-reading weights every
token would: "once" checks CRCs on the first pass only, "always" on every pass, "never" not at all. The
decoded state is checked bit-exact against the model after timing.
"""

import pytest
import torch

from offload_runtime.loaders import ContainerReader, pack

PASSES = 3


@pytest.fixture(scope="module")
def minilm_zstd(minilm, tmp_path_factory):
    model, _ = minilm
    return pack(model, tmp_path_factory.mktemp("verify") / "minilm.ort", codec="zstd", progress=False)


def _read_and_decode(path, policy):
    with ContainerReader(path, verify=policy) as reader:
        buffers = {g.name: torch.empty(g.layout.size, dtype=torch.uint8) for g in reader.groups}
        for _ in range(PASSES):
            for name, buffer in buffers.items():
                reader.decode_cpu(name, buffer)
        state = {}
        for group in reader.groups:
            for name, view in group.layout.views(buffers[group.name]).items():
                state[name] = view
            for alias, canonical in group.aliases.items():
                state[alias] = state[canonical]
        return state, sum(g.layout.size for g in reader.groups)


@pytest.mark.parametrize("policy", ["never", "once", "always"])
def test_verify_policy_cost(benchmark, minilm, minilm_zstd, policy):
    model, _ = minilm
    state, decoded = benchmark.pedantic(_read_and_decode, args=(minilm_zstd, policy), rounds=3)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["decoded_bytes_per_pass"] = decoded
    benchmark.extra_info["decode_GBps"] = PASSES * decoded / seconds / 1e9
