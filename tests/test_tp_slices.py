"""Tensor-parallel slices in containers (format version 3), in one process: geometry, pack, rank views,
what each rank reads, validation. The multi-process runs are in ``test_tp_offload.py``."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from container_surgery import rewrite_header, split

from offload_runtime.errors import CheckpointMismatchError, CorruptCheckpointError, UsageError
from offload_runtime.loaders import ContainerReader, load_state_dict, pack
from offload_runtime.loaders.format import TP_SLICE_KIND, tp_slice_name
from offload_runtime.loaders.moe import parse_slice_name
from offload_runtime.loaders.reassemble import Place
from offload_runtime.loaders.tp import planned_shard_dims
from offload_runtime.loaders.tp_slices import MAX_TP_SLICES, RankShards, shard_places
from offload_runtime.tiny import tiny_model


def torch_shard(full: torch.Tensor, dim: int, split: int, index: int, count: int) -> torch.Tensor:
    """What ``Shard(dim)`` (split 1) or ``_StridedShard(dim, split)`` gives rank ``index`` of ``count``."""
    parts = full.chunk(split, dim)
    return torch.cat([p.chunk(count, dim)[index] for p in parts], dim)


def apply(places: list[Place], src: torch.Tensor, dst: torch.Tensor) -> None:
    s, d = src.reshape(-1).view(torch.uint8), dst.reshape(-1).view(torch.uint8)
    for p in places:
        p.copy(s, d)


@pytest.mark.parametrize(
    "shape,dim,split", [((8, 12), 0, 1), ((8, 12), 1, 1), ((4, 8, 6), 1, 2), ((3, 4, 16), 2, 2)]
)
def test_shard_places_move_exactly_the_overlap(shape, dim, split):
    full = torch.arange(int(torch.tensor(shape).prod()), dtype=torch.float32).reshape(shape)
    for (si, sn), (di, dn) in itertools.product([(0, 1), (1, 2), (3, 4), (0, 4)], [(0, 1), (1, 2), (2, 4)]):
        src = torch_shard(full, dim, split, si, sn).contiguous()
        dst = torch.full_like(torch_shard(full, dim, split, di, dn).contiguous(), -1.0)
        apply(shard_places(shape, 4, dim, split, (si, sn), (di, dn)), src, dst)
        want = torch_shard(full, dim, split, di, dn)
        # exactly the elements both shards hold are written; the others keep -1
        index = torch.arange(full.numel(), dtype=torch.float32).reshape(shape)
        held = set(torch_shard(index, dim, split, si, sn).flatten().tolist())
        mask = torch.tensor([v in held for v in torch_shard(index, dim, split, di, dn).flatten().tolist()])
        assert torch.equal(dst.flatten()[mask], want.flatten()[mask]), (si, sn, di, dn)
        assert bool((dst.flatten()[~mask] == -1).all())


def _pack(model, tmp_path, slices, codec="zstd"):
    return pack(model, tmp_path / f"tp{slices}.ort", codec=codec, progress=False, tp_slices=slices)


def _expected_local(model, world, rank):
    """Each stored tensor name -> this rank's local tensor under the model's TP plan."""
    dims = planned_shard_dims(model)
    out = {}
    for name, tensor in model.state_dict().items():
        if name in dims:
            dim, split = dims[name]
            out[name] = torch_shard(tensor, dim, split, rank, world).contiguous()
        else:
            out[name] = tensor
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_pack_slices_what_the_plan_shards_and_reads_back_whole(arch, tmp_path):
    model = tiny_model(arch, num_layers=2)
    path = _pack(model, tmp_path, 4)
    with ContainerReader(path) as reader:
        assert reader.index.format_version == 3
        sliced = {t.name for g in reader.index.groups if g.tp for t in g.tp.sliced}
        planned = set(planned_shard_dims(model))
        for name in sliced:
            sliced_param = parse_slice_name(name)
            assert (sliced_param[0] if sliced_param else name) in planned
        assert "model.layers.0.self_attn.q_proj.weight" in sliced
        names = [g.name for g in reader.index.groups]
        assert names[names.index("model.layers.0") + 1 : names.index("model.layers.0") + 5] == [
            tp_slice_name("model.layers.0", s) for s in range(4)
        ]
        state = load_state_dict(reader)
    want = model.state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)


@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_reads_only_its_slices_and_sees_its_local_tensors(arch, world, tmp_path):
    model = tiny_model(arch, num_layers=2)
    path = _pack(model, tmp_path, 4)
    dims = planned_shard_dims(model)
    total = None
    for rank in range(world):
        expected = _expected_local(model, world, rank)
        with ContainerReader(path) as reader:
            total = sum(g.stored_size for g in reader.index.groups)
            reader.shard(RankShards(rank, world, dims))
            state = load_state_dict(reader)
            mine = {g.name for g in reader.index.groups if g.tp_slice is None and g.stored_size}
            mine |= {
                g.name
                for g in reader.index.groups
                if g.tp_slice is not None and g.tp_slice.index * world // 4 == rank
            }
            assert reader.stored_read == mine
            assert reader.bytes_read == sum(g.stored_size for g in reader.index.groups if g.name in mine)
            slices = [g for g in reader.index.groups if g.tp_slice is not None]
            read = sum(g.stored_size for g in slices if g.name in reader.stored_read)
            assert read <= sum(g.stored_size for g in slices) / world * 1.2  # its 1/world, give or take zstd
            if world > 1:
                assert reader.bytes_read < total
        assert state.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(state[name], tensor), (rank, name)


def test_one_slice_per_rank_decodes_in_place(tmp_path):
    """With as many slices as ranks a rank's slice is its shard byte for byte: no scratch, no copy."""
    model = tiny_model("llama", num_layers=2)
    path = _pack(model, tmp_path, 2)
    with ContainerReader(path) as reader:
        reader.shard(RankShards(1, 2, planned_shard_dims(model)))
        parts = [p for g in reader.groups if g.codec == "reassembled" for p in g.params["parts"]]
        assert parts and all(p.direct is not None for p in parts)
    with ContainerReader(path) as reader:  # whole tensors from slices: strided copies
        parts = [p for g in reader.groups if g.codec == "reassembled" for p in g.params["parts"]]
        assert any(p.direct is None for p in parts)


def test_ranks_that_do_not_divide_the_slices_are_refused(tmp_path):
    model = tiny_model("llama", num_layers=1)
    path = _pack(model, tmp_path, 4)
    with ContainerReader(path) as reader, pytest.raises(CheckpointMismatchError, match="3 ranks"):
        reader.shard(RankShards(0, 3, planned_shard_dims(model)))


def test_a_model_sharding_another_dimension_is_refused_naming_the_tensor(tmp_path):
    model = tiny_model("llama", num_layers=1)
    path = _pack(model, tmp_path, 2)
    dims = dict(planned_shard_dims(model))
    dims["model.layers.0.self_attn.q_proj.weight"] = (1, 1)
    with ContainerReader(path) as reader, pytest.raises(CheckpointMismatchError, match="q_proj") as info:
        reader.shard(RankShards(0, 2, dims))
    assert info.value.group == "model.layers.0"


def test_an_unsliced_container_shards_on_load_by_reading_whole_tensors(tmp_path):
    model = tiny_model("llama", num_layers=1)
    path = pack(model, tmp_path / "dense.ort", codec="zstd", progress=False)
    for rank in range(2):
        with ContainerReader(path) as reader:
            assert reader.index.format_version == 1
            reader.shard(RankShards(rank, 2, planned_shard_dims(model)))
            state = load_state_dict(reader)
        for name, tensor in _expected_local(model, 2, rank).items():
            assert torch.equal(state[name], tensor)


def test_dense_pack_is_unchanged_by_the_tp_option(tmp_path):
    model = tiny_model("llama", num_layers=1)
    dense = pack(model, tmp_path / "dense.ort", codec="zstd", progress=False, tp_slices=None)
    with ContainerReader(dense) as reader:
        assert reader.index.format_version == 1
        groups = reader.index.groups
        assert all(g.tp is None and g.tp_slice is None and g.kind != TP_SLICE_KIND for g in groups)
        state = load_state_dict(reader)
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    rows = split(dense.read_bytes())[1]["groups"]  # the index as stored
    assert not any("tp" in row or "tp_slice" in row for row in rows)
    sliced = split(_pack(model, tmp_path, 2).read_bytes())[1]["groups"]  # where a sliced pack writes them
    assert any("tp" in row for row in sliced) and any("tp_slice" in row for row in sliced)
    plain = pack(model, tmp_path / "plain.ort", codec="zstd", progress=False)  # without the option
    assert dense.read_bytes() == plain.read_bytes()


@pytest.mark.parametrize("slices", [1, 0, -2, MAX_TP_SLICES + 1])
def test_pack_refuses_slice_counts_out_of_range_before_reading(tmp_path, slices, monkeypatch):
    monkeypatch.setattr(sys.modules["offload_runtime.loaders.pack"], "_plan", _must_not_run)
    with pytest.raises(
        UsageError, match=f"tp_slices must be an integer from 2 to {MAX_TP_SLICES}, got {slices}"
    ):
        _pack(tiny_model("llama", num_layers=1), tmp_path, slices)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("slices", [2.0, "2", True])
def test_pack_refuses_slice_counts_that_are_not_integers(tmp_path, slices):
    with pytest.raises(TypeError, match="tp_slices must be an integer"):
        _pack(tiny_model("llama", num_layers=1), tmp_path, slices)


def test_pack_refuses_slices_of_models_without_a_plan(tmp_path):
    with pytest.raises(UsageError, match="tp_slices needs a model with a tensor-parallel plan"):
        pack(torch.nn.Linear(4, 4), tmp_path / "x.ort", progress=False, tp_slices=2)
    assert not any(tmp_path.iterdir())


def _must_not_run(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


# -- validation of forged records ---------------------------------------------------------------------


def _forged(tmp_path, edit):
    path = _pack(
        tiny_model("llama", num_layers=1, hidden_size=16, intermediate_size=32, vocab_size=64), tmp_path, 2
    )
    rewrite_header(path, edit_index=edit)
    return path


def _swap(index, a, b):
    groups = index["groups"]
    i, j = groups.index(_group(index, a)), groups.index(_group(index, b))
    groups[i], groups[j] = groups[j], groups[i]


def _group(index, name):
    return next(g for g in index["groups"] if g["name"] == name)


@pytest.mark.parametrize(
    "what,edit,fragment",
    [
        ("version 2", lambda ix: ix.update(format_version=2), "format version 2"),
        ("slice missing", lambda ix: ix["groups"].remove(_group(ix, "model.layers.0#tp1")), "missing"),
        (
            "slices swapped",
            lambda ix: _swap(ix, "model.layers.0#tp0", "model.layers.0#tp1"),
            "out of order",
        ),
        (
            "indivisible",
            lambda ix: _group(ix, "model.layers.0")["tp"].update(slices=3),
            "divide",
        ),
        (
            "dim out of range",
            lambda ix: _group(ix, "model.layers.0")["tp"]["sliced"][0].update(dim=5),
            "invalid dim",
        ),
        (
            "slice kind without record",
            lambda ix: _group(ix, "model.layers.0#tp0").pop("tp_slice"),
            "tp_slice record",
        ),
        (
            "malformed",
            lambda ix: _group(ix, "model.layers.0")["tp"].update(sliced="all"),
            "malformed tp record",
        ),
        (
            "a sliced tensor said whole",
            lambda ix: _group(ix, "model.layers.0")["tp"]["sliced"].pop(),
            "unsliced tensors",
        ),
    ],
)
def test_forged_tp_records_are_refused_naming_file_and_group(tmp_path, what, edit, fragment):
    path = _forged(tmp_path, edit)
    with pytest.raises(CorruptCheckpointError, match=fragment) as info:
        ContainerReader(path)
    assert info.value.file == str(path) and info.value.group, what
