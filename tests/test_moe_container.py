"""Mixtures of experts in containers: detection, one group per expert, validation, block reassembly."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from offload_runtime import dispatch_compressed, load_compressed
from offload_runtime.errors import CheckpointMismatchError, CorruptCheckpointError
from offload_runtime.loaders import ContainerReader, ContainerWriter, load_state_dict, pack
from offload_runtime.loaders.groups import find_groups
from offload_runtime.loaders.moe import find_expert_modules, stacked_expert_params
from offload_runtime.native.layout import GroupLayout
from offload_runtime.native.zstd import ZstdCodec
from offload_runtime.scheduler.planner import GIB
from offload_runtime.scheduler.tiers import DISK
from offload_runtime.tiny import TINY_ARCHITECTURES, TINY_MOE_ARCHITECTURES, tiny_config, tiny_model

# (MoE layers of a 3-layer tiny model, experts, stacked parameters)
EXPECTED = {
    "mixtral": (3, 4, ("gate_up_proj", "down_proj")),
    "qwen2_moe": (3, 4, ("gate_up_proj", "down_proj")),
    "qwen3_moe": (3, 8, ("gate_up_proj", "down_proj")),
    "deepseek_v3": (2, 8, ("gate_up_proj", "down_proj")),  # first_k_dense_replace=1
    "gpt_oss": (3, 4, ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")),
    "olmoe": (3, 8, ("gate_up_proj", "down_proj")),
}


@pytest.fixture(params=TINY_MOE_ARCHITECTURES)
def moe_arch(request) -> str:
    return request.param


def test_tiny_moe_models_build_in_both_dtypes_and_run(moe_arch):
    for dtype in (torch.float32, torch.bfloat16):
        model = tiny_model(moe_arch, dtype=dtype)
        assert model.model.embed_tokens.weight.dtype == dtype
        with torch.no_grad():
            logits = model(torch.randint(0, 256, (3, 7))).logits
        assert logits.shape == (3, 7, 256) and torch.isfinite(logits).all()


def test_experts_modules_are_found_on_every_moe_arch(moe_arch):
    layers, experts, params = EXPECTED[moe_arch]
    found = find_expert_modules(tiny_model(moe_arch))
    assert len(found) == layers
    assert all(m.num_experts == experts and m.params == params for m in found)
    assert all(m.path.endswith(".mlp.experts") for m in found)


def test_no_experts_module_in_dense_models(tiny_arch):
    model = tiny_model(tiny_arch)
    assert find_expert_modules(model) == []
    assert find_groups(model, experts=True) == find_groups(model)


def test_routers_shared_experts_and_per_expert_lists_are_not_stacks():
    model = tiny_model("qwen2_moe")
    block = model.model.layers[0].mlp
    assert stacked_expert_params(block.gate, 4) is None  # router: 2-D [E, H] only
    assert stacked_expert_params(block.shared_expert, 4) is None
    assert stacked_expert_params(block, 4) is None  # holds submodules with parameters
    odd = nn.Module()
    odd.a = nn.Parameter(torch.zeros(4, 2, 2))
    odd.b = nn.Parameter(torch.zeros(3, 2, 2))  # first dimensions differ
    assert stacked_expert_params(odd, 4) is None
    odd.b = nn.Parameter(torch.zeros(4, 2))
    assert stacked_expert_params(odd, 4) == ("a", "b")
    assert stacked_expert_params(odd, 5) is None  # not the declared number of experts


class _ListMoe(nn.Module):
    """A model whose config declares experts kept one module per expert (not a stack)."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"num_local_experts": 2})()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"experts": nn.ModuleList(nn.Linear(4, 4) for _ in range(2))}) for _ in range(2)
        )


def test_unrecognised_moe_stays_at_block_granularity_with_one_log_line(caplog):
    model = _ListMoe()
    with caplog.at_level(logging.INFO, logger="offload_runtime"):
        groups = find_groups(model, experts=True)
    assert groups == find_groups(model)
    lines = [r for r in caplog.records if r.name == "offload_runtime"]
    assert len(lines) == 1 and "block granularity" in lines[0].getMessage()


def _pack(model, tmp_path, codec="zstd"):
    return pack(model, tmp_path / "moe.ort", codec=codec, progress=False, device="cpu")


def test_pack_stores_each_expert_as_its_own_group(moe_arch, tmp_path):
    model = tiny_model(moe_arch)
    state = model.state_dict()
    layers, experts, params = EXPECTED[moe_arch]
    with ContainerReader(_pack(model, tmp_path), granularity="expert") as reader:
        assert reader.index.format_version == 2
        expert_groups = [g for g in reader.groups if g.kind == "expert"]
        assert len(expert_groups) == layers * experts
        names = [g.name for g in reader.groups]
        for g in expert_groups:
            info = g.expert
            owner = info.module.rsplit(".mlp.", 1)[0]
            assert names.index(g.name) > names.index(owner)  # after its block
            assert g.name == f"{info.module}.{info.index}" and g.users == [info.module]
            assert [s.param.rsplit(".", 1)[1] for s in info.slices] == list(params)
            decoded = reader.decode_cpu(g.name, torch.empty(g.layout.size, dtype=torch.uint8))
            for s, (tensor, view) in zip(info.slices, g.layout.views(decoded).items(), strict=True):
                assert s.tensor == tensor and s.index == info.index
                assert s.shape == tuple(state[s.param].shape)
                assert torch.equal(view, state[s.param][info.index])  # exactly slice e
        stored = {t.name for g in reader.groups for t in g.layout.tensors}
        assert not any(n.endswith(p) for n in stored for p in params)  # no stack stored whole


def test_dense_containers_stay_format_version_1(tmp_path):
    model = tiny_model("llama")
    path = _pack(model, tmp_path)
    with ContainerReader(path) as reader:
        assert reader.index.format_version == 1
        assert reader.groups == reader.index.groups  # nothing reassembled: the index's groups as stored
        stored = [
            (g.name, g.kind, [t.name for t in g.layout.tensors], g.users, g.codec) for g in reader.groups
        ]
        assert stored == [(s.name, s.kind, s.tensors, s.users, "zstd") for s in find_groups(model)]
        assert not any(g.expert for g in reader.groups)
    text = path.read_bytes()[8 : 8 + 20000]
    assert b'\\"expert\\"' not in text and b'"format_version":"1"' in text


def test_version_1_container_of_an_moe_model_still_loads(tmp_path):
    """Containers written before expert groups (one group per block, stacks whole) load as before."""
    model = tiny_model("mixtral")
    state = model.state_dict()
    codec = ZstdCodec()
    path = tmp_path / "v1.ort"
    with ContainerWriter(path, model_class=type(model).__name__, config=model.config.to_dict()) as writer:
        for spec in find_groups(model):
            layout = GroupLayout.from_tensors((n, state[n]) for n in spec.tensors)
            writer.add_group(spec, layout, codec.encode(layout, layout.pack(state)), codec.name)
    ids = torch.randint(3, 256, (1, 6))
    loaded = load_compressed(path, 1.0, device="cpu")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    with ContainerReader(path) as reader:
        assert reader.index.format_version == 1 and not any(g.expert for g in reader.groups)


def test_reassembled_blocks_hold_whole_stacks(moe_arch, tmp_path):
    model = tiny_model(moe_arch)
    with ContainerReader(_pack(model, tmp_path)) as reader:
        assert not any(g.kind == "expert" for g in reader.groups)
        state = load_state_dict(reader)
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        block = next(g for g in reader.groups if g.codec == "reassembled")
        payload = reader.payload(block.name)  # the parts' payloads, each CRC-checked
        assert len(payload) == block.stored_size


def test_cpu_decodes_of_reassembled_blocks_reuse_one_scratch_buffer(tmp_path, monkeypatch):
    """A buffer per decode would be kept by glibc's heap and grow RSS (see ``CpuLoader``): the parts that do
    not decode in place go through one scratch buffer, on the reader's path and on the codec's (host tier)."""
    from offload_runtime.loaders import reassemble
    from offload_runtime.loaders.reader import decode_held_payload

    model = tiny_model("mixtral")  # its blocks are alike: one size of scratch
    decoded_into: list[torch.Tensor] = []  # held: a buffer freed and allocated again may get the same address
    place = reassemble._place

    def record(part, decoded, out):
        decoded_into.append(decoded)
        place(part, decoded, out)

    monkeypatch.setattr(reassemble, "_place", record)
    with ContainerReader(_pack(model, tmp_path)) as reader:
        blocks = [g for g in reader.groups if g.codec == "reassembled"]
        for block in blocks * 2:
            out = reader.decode_cpu(block.name, torch.zeros(block.layout.size, dtype=torch.uint8))
            payload = reader.read_into(block.name, torch.empty(block.stored_size, dtype=torch.uint8))
            held = torch.zeros(block.layout.size, dtype=torch.uint8)
            decode_held_payload(reader, block, payload, held)
            assert torch.equal(held, out)
    assert len(decoded_into) > 2 * len(blocks)  # several experts per block, on two paths
    assert len({t.untyped_storage().data_ptr() for t in decoded_into}) == 1


def _minimum_gb(path) -> float:
    from offload_runtime.errors import BudgetError

    with pytest.raises(BudgetError) as info:
        load_compressed(path, 1e-9, device="cpu")
    return info.value.expected / GIB


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dispatch_compressed_is_bit_identical(moe_arch, dtype, tmp_path):
    reference = tiny_model(moe_arch, dtype=dtype)
    model = copy.deepcopy(reference)
    budget = _minimum_gb(_pack(reference, tmp_path))
    dispatch_compressed(model, budget, device="cpu", codec="zstd", host_budget_gb=0)
    assert all(p.tier == DISK for p in model.offload_plan.groups if p.name.startswith("model.layers."))
    for batch in (1, 3):
        ids = torch.randint(3, 256, (batch, 7))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, reference(ids).logits)
        kwargs = {"attention_mask": mask, "max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
        assert torch.equal(model.generate(ids, **kwargs), reference.generate(ids, **kwargs))


def test_pack_from_a_directory_with_stacked_tensors_equals_pack_from_the_module(moe_arch, tmp_path):
    model = tiny_model(moe_arch)
    directory = tmp_path / "hf"
    directory.mkdir()
    config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    from_dir = pack(directory, tmp_path / "dir.ort", codec="zstd", progress=False, device="cpu")
    _same_containers(from_dir, _pack(model, tmp_path))


def _same_containers(path_a, path_b) -> None:
    with (
        ContainerReader(path_a, granularity="expert") as a,
        ContainerReader(path_b, granularity="expert") as b,
    ):
        assert [(g.name, g.kind, g.expert, g.layout) for g in a.groups] == [
            (g.name, g.kind, g.expert, g.layout) for g in b.groups
        ]
        for ga, gb in zip(a.groups, b.groups, strict=True):
            out_a, out_b = (torch.empty(ga.layout.size, dtype=torch.uint8) for _ in range(2))
            assert torch.equal(a.decode_cpu(ga.name, out_a), b.decode_cpu(gb.name, out_b))


def test_pack_from_save_pretrained_with_one_tensor_per_expert(moe_arch, tmp_path):
    """``save_pretrained`` writes Mixtral's experts as ``block_sparse_moe.experts.<e>.w1.weight`` and
    Qwen/DeepSeek/OLMoE's as ``mlp.experts.<e>.gate_proj.weight``: pack reads each expert's slices from
    them (transformers' conversion mapping, reversed) and stores the same container as from the module."""
    model = tiny_model(moe_arch)
    model.save_pretrained(tmp_path / "hf")
    from_dir = pack(tmp_path / "hf", tmp_path / "dir.ort", codec="zstd", progress=False, device="cpu")
    _same_containers(from_dir, _pack(model, tmp_path))


def test_a_checkpoint_missing_an_expert_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model("qwen3_moe", num_layers=1)
    model.save_pretrained(tmp_path / "hf")
    state = load_file(tmp_path / "hf" / "model.safetensors")
    del state["model.layers.0.mlp.experts.5.up_proj.weight"]
    save_file(state, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointMismatchError) as info:
        pack(tmp_path / "hf", tmp_path / "m.ort", codec="zstd", progress=False, device="cpu")
    assert any("experts.gate_up_proj" in m and "expert 5" in m for m in info.value.mismatches)


def test_a_damaged_expert_payload_is_named_when_its_block_is_decoded(tmp_path):
    model = tiny_model("qwen3_moe", num_layers=1)
    path = _pack(model, tmp_path, codec="raw")
    with ContainerReader(path, granularity="expert") as reader:
        victim = reader.group("model.layers.0.mlp.experts.5")
        start = reader._offsets[victim.name]
    data = bytearray(path.read_bytes())
    data[start + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    with ContainerReader(path) as reader, pytest.raises(CorruptCheckpointError) as info:
        block = reader.group("model.layers.0")
        reader.decode_cpu(block.name, torch.empty(block.layout.size, dtype=torch.uint8))
    assert info.value.group == "model.layers.0.mlp.experts.5" and info.value.chunk == 0


def test_a_part_damaged_in_host_memory_is_named_by_its_decoded_crc(tmp_path):
    """The host tier decodes a held payload (its compressed CRCs checked when it was read) through the
    reassembled codec: each part's codec checks the decoded CRCs."""
    from offload_runtime.loaders.reader import decode_held_payload

    path = _pack(tiny_model("qwen3_moe", num_layers=1), tmp_path, codec="raw")
    with ContainerReader(path, verify="always") as reader:
        block = reader.group("model.layers.0")
        payload = reader.read_into(block.name, torch.empty(block.stored_size, dtype=torch.uint8))
        victim = block.params["parts"][-1]
        payload[victim.offset + 10] ^= 0xFF
        with pytest.raises(CorruptCheckpointError, match="decoded chunk CRC-32") as info:
            decode_held_payload(reader, block, payload, torch.empty(block.layout.size, dtype=torch.uint8))
    assert info.value.group == victim.entry.name and info.value.chunk == 0


def test_unknown_granularity_is_refused(tmp_path):
    path = _pack(tiny_model("olmoe", num_layers=1), tmp_path)
    with pytest.raises(ValueError, match="granularity"):
        ContainerReader(path, granularity="layer")


def test_tiny_moe_configs_set_only_known_fields():
    for arch in TINY_MOE_ARCHITECTURES:
        cfg = tiny_config(arch)
        assert cfg.hidden_size == 64 and cfg.vocab_size == 256
    assert set(TINY_MOE_ARCHITECTURES).isdisjoint(TINY_ARCHITECTURES)
