"""Synthetic models on CUDA: groups generated and ans/int8-encoded on the GPU equal the ordinary path."""

from __future__ import annotations

import pytest
import torch

from offload_runtime import load_compressed
from offload_runtime.errors import BudgetError
from offload_runtime.loaders import ContainerReader, pack
from offload_runtime.loaders.groups import find_groups
from offload_runtime.scheduler.planner import GIB
from offload_runtime.scheduler.tiers import HOST
from offload_runtime.synthetic import (
    dispatch_synthetic,
    init_group,
    materialize,
    synthetic_config,
    synthetic_skeleton,
    synthetic_source,
)

pytestmark = pytest.mark.gpu

# big enough for several 256 KiB ANS chunks per block, small enough for any GPU
CONFIG = synthetic_config(
    "tiny", num_hidden_layers=4, hidden_size=512, intermediate_size=1536, vocab_size=4096
)


def ordinary(tmp_path, codec: str):
    """materialize (generated on the GPU, like the synthetic path) -> pack -> container."""
    model = materialize(synthetic_skeleton(CONFIG), seed=0, device="cuda")
    return pack(model, tmp_path / "model.safetensors", codec=codec, progress=False, device="cuda")


def run(model):
    ids = torch.tensor([[3, 17, 42, 99, 7, 1000]], device="cuda")
    with torch.inference_mode():
        logits = model(ids).logits
        tokens = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0
        )
    return logits, tokens


def test_device_encoding_equals_the_numpy_path(tmp_path):
    """ans: chunk tables (offsets, sizes, CRC-32s of payload and decoded bytes) and payloads equal pack's."""
    path = ordinary(tmp_path, "ans")
    source = synthetic_source(synthetic_skeleton(CONFIG), codec="ans", device="cuda", dtype=torch.bfloat16)
    with ContainerReader(path) as reader:
        for mine, packed in zip(source.groups, reader.groups, strict=True):
            assert (mine.name, mine.codec, mine.stored_size) == (
                packed.name,
                packed.codec,
                packed.stored_size,
            )
            assert mine.params == packed.params
            assert mine.chunks == packed.chunks
            buffer = torch.empty(mine.stored_size, dtype=torch.uint8)
            source.read_into(mine.name, buffer)
            assert bytes(buffer.numpy()) == bytes(reader.payload(mine.name))


@pytest.mark.parametrize("placement", ["resident", "streamed"])
def test_ans_on_cuda_is_bit_identical_to_the_ordinary_path(placement, tmp_path):
    path = ordinary(tmp_path, "ans")
    budget = 8.0
    if placement == "streamed":  # the minimum working set: every block streamed, from pinned host RAM
        with pytest.raises(BudgetError) as info:
            load_compressed(path, 1e-9, device="cuda")
        budget = info.value.expected * 1.001 / GIB
    reference = load_compressed(path, budget, device="cuda", host_budget_gb=1.0)
    synthetic = dispatch_synthetic(CONFIG, budget, codec="ans", device="cuda", host_budget_gb=1.0)
    assert [(g.name, g.tier) for g in synthetic.offload_plan.groups] == [
        (g.name, g.tier) for g in reference.offload_plan.groups
    ]
    if placement == "streamed":
        assert HOST in {g.tier for g in synthetic.offload_plan.streamed}
    got, want = run(synthetic), run(reference)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_int8_quantised_on_the_gpu_decodes_within_half_a_step():
    """int8 on the GPU: every decoded weight within scale/2 of the generated one (plus bf16 rounding).

    Not compared bytewise with the CPU codec: CUDA divides by a Python scalar as a multiplication by its
    reciprocal, so a row scale may differ from the CPU's in the last bit.
    """
    from offload_runtime.native import get_codec
    from offload_runtime.native.int8 import INT8_MAX

    model = synthetic_skeleton(CONFIG)
    source = synthetic_source(model, codec="int8", device="cuda", dtype=torch.bfloat16)
    spec = find_groups(model)[1]
    entry = source.group(spec.name)
    payload = torch.empty(entry.stored_size, dtype=torch.uint8)
    source.read_into(entry.name, payload)  # also checks the re-encoding against the first one
    decoder = get_codec("int8").gpu_decoder(entry.chunks, entry.params, entry.layout, torch.device("cuda"))
    out = torch.empty(entry.decoded_size, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream()
    decoder.decode(payload.cuda(), out, stream)
    stream.synchronize()
    decoded = entry.layout.views(out)
    original = init_group(model, spec, 0, "cuda")
    for name, weight in original.items():
        if weight.dim() != 2:
            assert torch.equal(decoded[name], weight), name
            continue
        w = weight.float()
        step = w.abs().amax(dim=1, keepdim=True) / INT8_MAX
        error = (decoded[name].float() - w).abs()
        assert bool((error <= step / 2 * 1.01 + w.abs() / 128).all()), name  # bf16 keeps 8 bits
