"""Synthetic models on the CPU: the regenerate-on-demand path equals materialise -> pack -> load, bitwise."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from offload_runtime import load_compressed, remove_offload
from offload_runtime.errors import BudgetError, CorruptCheckpointError
from offload_runtime.loaders import ContainerReader, pack
from offload_runtime.loaders.groups import find_groups
from offload_runtime.native import int8 as int8_module
from offload_runtime.native.zstd import ZstdCodec
from offload_runtime.scheduler.tiers import DISK, HOST
from offload_runtime.synthetic import (
    dispatch_synthetic,
    init_group,
    materialize,
    synthetic_config,
    synthetic_skeleton,
    synthetic_source,
)

IDS = torch.tensor([[3, 17, 42, 99, 7]])
# llama-like small shapes: the tiny one, an odd layer count with tied embeddings, and one with a bias-free
# MLP wider than the hidden size by a non-power-of-two factor
SHAPES = {
    "tiny": synthetic_config("tiny"),
    "tied-5": synthetic_config("tiny", num_hidden_layers=5, tie_word_embeddings=True),
    "wide": synthetic_config("tiny", hidden_size=96, intermediate_size=288, num_attention_heads=6),
    "tiny-mixtral": synthetic_config("tiny-mixtral"),
    "tiny-qwen3-moe": synthetic_config("tiny-qwen3-moe"),
}
MOE_SHAPES = ("tiny-mixtral", "tiny-qwen3-moe")


def run(model):
    with torch.no_grad():
        logits = model(IDS).logits
        tokens = model.generate(
            IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    return logits, tokens


def ordinary(config, codec, tmp_path, budget_gb, seed=0, **kwargs):
    model = materialize(synthetic_skeleton(config), seed)
    path = pack(model, tmp_path / "model.safetensors", codec=codec, progress=False, device="cpu")
    return load_compressed(path, budget_gb, device="cpu", **kwargs)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_synthetic_equals_ordinary_path(shape, codec, tmp_path):
    config = SHAPES[shape]
    synthetic = dispatch_synthetic(config, 1.0, codec=codec, device="cpu")
    reference = ordinary(config, codec, tmp_path, 1.0)
    got, want = run(synthetic), run(reference)
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])
    assert got[0].abs().sum() > 0  # not a model of zeros
    # same payload sizes, hence the same plan
    assert [(g.name, g.tier) for g in synthetic.offload_plan.groups] == [
        (g.name, g.tier) for g in reference.offload_plan.groups
    ]


def test_int8_quantised_by_the_source_equals_the_codec(tmp_path, monkeypatch):
    """int8 (inner zstd on the CPU): the source quantises on the generating device itself, in blocks of
    rows (here 1,000 elements, so several per tensor); same bytes as the codec."""
    monkeypatch.setattr(int8_module, "QUANTISE_BLOCK_ELEMENTS", 1000)
    config = SHAPES["wide"]
    synthetic = dispatch_synthetic(config, 1.0, codec="int8", device="cpu")
    reference = ordinary(config, "int8", tmp_path, 1.0)
    got, want = run(synthetic), run(reference)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    lossless = run(dispatch_synthetic(config, 1.0, codec="raw", device="cpu"))
    assert not torch.equal(got[0], lossless[0])  # it did quantise


@pytest.mark.parametrize("host_budget_gb", [1.0, 0.0], ids=["host-tier", "regenerated-each-use"])
def test_streamed_synthetic_equals_ordinary_path(host_budget_gb, tmp_path):
    """Every block streamed: from the host tier, or (host budget 0) regenerated on every use."""
    config = SHAPES["tied-5"]
    budget = _minimum_gb(config)
    synthetic = dispatch_synthetic(config, budget, codec="zstd", device="cpu", host_budget_gb=host_budget_gb)
    reference = ordinary(config, "zstd", tmp_path, budget, host_budget_gb=host_budget_gb)
    tiers = {g.tier for g in synthetic.offload_plan.streamed}
    assert tiers == ({HOST} if host_budget_gb else {DISK})
    got, want = run(synthetic), run(reference)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # remove_offload decodes every group once more, again equal
    remove_offload(synthetic)
    with torch.no_grad():
        assert torch.equal(synthetic(IDS).logits, want[0])


def _minimum_gb(config) -> float:
    with pytest.raises(BudgetError) as info:
        dispatch_synthetic(config, 1e-9, codec="raw", device="cpu")
    return info.value.expected / (1 << 30)


def test_group_weights_are_reproducible_per_seed_and_differ_across_groups():
    model = synthetic_skeleton(SHAPES["tiny"])
    groups = find_groups(model)
    block0, block1 = groups[1], groups[2]
    a = init_group(model, block0, seed=0, device="cpu")
    again = init_group(model, block0, seed=0, device="cpu")
    other_seed = init_group(model, block0, seed=1, device="cpu")
    other_group = init_group(model, block1, seed=0, device="cpu")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(a[n], again[n]) for n in a)
    assert not torch.equal(a[q], other_seed[q])
    assert not torch.equal(a[q], other_group[q.replace("layers.0", "layers.1")])
    assert a[q].dtype == torch.bfloat16
    assert abs(a[q].float().std().item() - 0.02) < 0.003  # normal(0, 0.02)
    assert torch.equal(a["model.layers.0.input_layernorm.weight"], torch.ones(64, dtype=torch.bfloat16))


def test_source_holds_one_group_at_a_time_and_no_payloads():
    model = synthetic_skeleton(SHAPES["tied-5"])
    source = synthetic_source(model, codec="zstd")
    largest = max(g.decoded_size for g in source.groups)
    total = sum(g.decoded_size for g in source.groups)
    assert source.peak_group_bytes == largest < total
    assert all(n == 1 for n in source.generated.values())  # phase 1: each group generated once
    assert not any(hasattr(g, "payload") for g in source.groups)
    name = source.groups[1].name
    out = torch.empty(source.group(name).stored_size, dtype=torch.uint8)
    source.read_into(name, out)
    assert source.generated[name] == 2 and source.peak_group_bytes == largest


def test_nondeterministic_encoder_raises_naming_group_and_chunk(monkeypatch):
    model = synthetic_skeleton(SHAPES["tiny"])
    source = synthetic_source(model, codec="zstd")
    name = source.groups[1].name
    real_encode = ZstdCodec.encode

    def drifting(self, layout, data):  # the re-encoding differs in one byte of chunk 0
        encoded = real_encode(self, layout, data)
        encoded.payload = encoded.payload.copy()
        encoded.payload[encoded.chunks[0].offset + 8] ^= 0xFF
        return encoded

    monkeypatch.setattr(ZstdCodec, "encode", drifting)
    out = torch.empty(source.group(name).stored_size, dtype=torch.uint8)
    with pytest.raises(CorruptCheckpointError) as info:
        source.read_into(name, out)
    assert info.value.group == name and info.value.chunk == 0
    assert f"group={name}" in str(info.value) and "chunk=0" in str(info.value)


def test_budget_error_before_generating_anything():
    with pytest.raises(BudgetError) as info:
        dispatch_synthetic("llama-70b", 1.0, codec="raw", device="cpu")
    assert info.value.expected > (1 << 30)  # the minimum working set of the 70B shape


def test_unknown_shape_names_the_known_ones():
    with pytest.raises(ValueError, match="llama-70b"):
        synthetic_config("llama-1t")


def test_cli_bench_synthetic_tiny():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "offload_runtime",
            "bench",
            "--synthetic",
            "tiny",
            "--device",
            "cpu",
            "--codec",
            "zstd",
            "--max-new-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr
    assert "offload plan on cpu" in result.stdout
    assert "tok/s" in result.stdout and "model.layers.0" in result.stdout


@pytest.mark.parametrize("shape", MOE_SHAPES)
def test_moe_source_holds_the_groups_pack_stores(shape, tmp_path):
    """Expert groups included: same names, kinds, expert records, layouts and bytes as a packed container
    of the materialised model (read at expert granularity)."""
    config = SHAPES[shape]
    source = synthetic_source(synthetic_skeleton(config), codec="raw")
    path = pack(materialize(synthetic_skeleton(config)), tmp_path / "m.ort", codec="raw", progress=False)
    with ContainerReader(path, granularity="expert") as reader:
        packed = reader.groups
        assert [(g.name, g.kind, g.expert, g.layout) for g in source.groups] == [
            (g.name, g.kind, g.expert, g.layout) for g in packed
        ]
        assert [g.chunks for g in source.groups] == [g.chunks for g in packed]  # raw: same bytes, same CRCs
    experts = [g for g in source.groups if g.kind == "expert"]
    num_experts = config.num_local_experts if shape == "tiny-mixtral" else config.num_experts
    assert len(experts) == config.num_hidden_layers * num_experts
    model = synthetic_skeleton(config)
    expert = init_group(
        model, next(s for s in find_groups(model, experts=True) if s.kind == "expert"), 0, "cpu"
    )
    assert all(t.dim() == 2 and abs(t.float().std().item() - 0.02) < 0.004 for t in expert.values())


def test_moe_shapes_have_the_published_sizes():
    from offload_runtime.loaders.groups import find_groups as groups_of
    from offload_runtime.synthetic import group_layout

    sizes = {}
    for shape in ("mixtral-8x7b", "qwen3-30b-a3b"):
        model = synthetic_skeleton(synthetic_config(shape))
        specs = groups_of(model, experts=True)
        state = model.state_dict()
        sizes[shape] = sum(group_layout(model, s, state=state).size for s in specs) / 1e9
        experts = [s for s in specs if s.kind == "expert"]
        assert len(experts) == {"mixtral-8x7b": 32 * 8, "qwen3-30b-a3b": 48 * 128}[shape]
    assert 92 < sizes["mixtral-8x7b"] < 94 and 60 < sizes["qwen3-30b-a3b"] < 62
