"""Container round trips: bit-exact weights, ties, safetensors compatibility, models rebuilt from the file."""

import json
import struct
import sys
import threading

import pytest
import torch
from safetensors import safe_open

from offload_runtime.loaders import (
    ContainerReader,
    ContainerWriter,
    build_empty_model,
    check_compatible,
    load_state_dict,
    pack,
)
from offload_runtime.loaders.format import PAYLOAD_ALIGN
from offload_runtime.loaders.groups import find_groups
from offload_runtime.loaders.load import load_model
from offload_runtime.native import get_codec
from offload_runtime.native.layout import GroupLayout
from offload_runtime.tiny import tiny_model

CODECS = ["raw", "zstd"]


def _assert_same_state(model, state):
    reference = model.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert state[name].dtype == tensor.dtype, name
        assert torch.equal(state[name], tensor), name


def _outputs(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("codec", CODECS)
def test_tiny_round_trip_bit_exact(tiny_arch, codec, tmp_path):
    model = tiny_model(tiny_arch)
    path = pack(model, tmp_path / "m.ort", codec=codec, progress=False)
    with ContainerReader(path) as reader:
        assert [g.codec for g in reader.groups] == [codec] * len(reader.groups)
        assert [g.name for g in reader.groups] == [g.name for g in find_groups(model)]
        _assert_same_state(model, load_state_dict(reader))
        rebuilt = load_model(reader)
    ids = torch.randint(0, 256, (2, 9))
    assert torch.equal(_outputs(model, ids), _outputs(rebuilt, ids))


def test_container_is_safetensors_with_aligned_payloads(tiny_llama, tmp_path):
    path = pack(tiny_llama, tmp_path / "m.ort", codec="zstd", progress=False)
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    data_start = 8 + header_len
    assert data_start % PAYLOAD_ALIGN == 0
    with ContainerReader(path) as reader, safe_open(path, "pt") as st:
        assert st.metadata()["format"] == "offload_runtime"
        assert st.metadata()["format_version"] == "1"
        assert sorted(st.keys()) == sorted(g.tensor for g in reader.groups)
        header = json.loads(raw[8:data_start])
        for group in reader.groups:
            begin, end = header[group.tensor]["data_offsets"]
            assert (data_start + begin) % PAYLOAD_ALIGN == 0 and (end - begin) % PAYLOAD_ALIGN == 0
            tensor = st.get_tensor(group.tensor)
            assert tensor.dtype == torch.uint8
            assert bytes(tensor[: group.stored_size].numpy()) == bytes(reader.payload(group.name))
            assert not tensor[group.stored_size :].any()  # zero padding


def test_tied_weights_restored_as_one_tensor(tiny_qwen2, tmp_path):
    path = pack(tiny_qwen2, tmp_path / "q.ort", codec="raw", progress=False)
    with ContainerReader(path) as reader:
        aliases = {a: c for g in reader.groups for a, c in g.aliases.items()}
        assert aliases == {"lm_head.weight": "model.embed_tokens.weight"}
        stored = [t.name for g in reader.groups for t in g.layout.tensors]
        assert "lm_head.weight" not in stored  # stored once
        state = load_state_dict(reader)
        assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
        rebuilt = load_model(reader)
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight


def test_index_records_model_metadata(tiny_gpt2, tmp_path):
    path = pack(tiny_gpt2, tmp_path / "g.ort", codec="raw", progress=False)
    with ContainerReader(path) as reader:
        index = reader.index
        assert index.format_version == 1
        assert index.model_class == "GPT2LMHeadModel"
        assert index.config["n_layer"] == 3 and index.config["model_type"] == "gpt2"
        assert index.generation_config is not None
        assert index.dtype == "float32"
        blocks = [g for g in reader.groups if g.kind == "block"]
        assert [g.name for g in blocks] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
        for g in reader.groups:
            assert g.decoded_size == g.layout.size
            assert sum(c.decoded_size for c in g.chunks) == g.layout.size
        meta = build_empty_model(reader)
        assert all(p.device.type == "meta" for p in meta.parameters())
        check_compatible(reader, meta)


@pytest.mark.parametrize("codec", CODECS)
def test_smollm2_round_trip(smollm2, codec, tmp_path):
    model, tokenizer = smollm2
    path = pack(model, tmp_path / "s.ort", codec=codec, progress=False, tokenizer=tokenizer)
    with ContainerReader(path) as reader:
        _assert_same_state(model, load_state_dict(reader))
        if codec == "raw":  # the rebuilt-model check once is enough for this size
            rebuilt = load_model(reader)
            ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
            assert torch.equal(_outputs(model, ids), _outputs(rebuilt, ids))


@pytest.mark.parametrize("codec", CODECS)
def test_minilm_round_trip(minilm, codec, tmp_path):
    model, tokenizer = minilm
    path = pack(model, tmp_path / "m.ort", codec=codec, progress=False)
    with ContainerReader(path) as reader:
        _assert_same_state(model, load_state_dict(reader))
        rebuilt = load_model(reader)
    ids = tokenizer("offloading layers", return_tensors="pt").input_ids
    assert torch.equal(_outputs(model, ids), _outputs(rebuilt, ids))


def test_read_into_and_decode_cpu(tiny_llama, tmp_path):
    path = pack(tiny_llama, tmp_path / "m.ort", codec="zstd", progress=False)
    with ContainerReader(path, verify="always") as reader:
        codec = get_codec("zstd")
        for g in reader.groups:
            staging = torch.empty(g.stored_size + 100, dtype=torch.uint8)
            got = reader.read_into(g.name, staging)
            assert bytes(got.numpy()) == bytes(reader.payload(g.name))
            direct = torch.empty(g.layout.size, dtype=torch.uint8)
            codec.decode_cpu(got.numpy(), g.chunks, g.params, g.layout, direct)
            via_reader = reader.decode_cpu(g.name, torch.empty(g.layout.size, dtype=torch.uint8))
            assert torch.equal(direct, via_reader)


def test_writer_direct_use_and_empty_index(tmp_path):
    layout = GroupLayout.from_tensors([("w", torch.zeros(3, 5))])
    tensors = {"w": torch.arange(15.0).reshape(3, 5)}
    codec = get_codec("raw")
    spec = find_groups(torch.nn.Sequential(torch.nn.Linear(5, 3, bias=False)))[0]
    with ContainerWriter(tmp_path / "w.ort") as writer:
        writer.add_group(spec, layout, codec.encode(layout, layout.pack(tensors)), "raw")
    with ContainerReader(tmp_path / "w.ort") as reader:
        out = reader.decode_cpu(reader.groups[0].name, torch.empty(layout.size, dtype=torch.uint8))
        assert torch.equal(layout.views(out)["w"], tensors["w"])
        assert reader.index.config is None and reader.index.model_class is None
    assert [p.name for p in tmp_path.iterdir()] == ["w.ort"]  # no temp files left


def test_concurrent_reads_are_consistent(tiny_llama, tmp_path):
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # force thread switches inside reads
    try:
        path = pack(tiny_llama, tmp_path / "m.ort", codec="zstd", progress=False)
        with ContainerReader(path, verify="once") as reader:
            expected = {
                g.name: reader.decode_cpu(g.name, torch.empty(g.layout.size, dtype=torch.uint8)).clone()
                for g in reader.groups
            }
            barrier, errors = threading.Barrier(4), []

            def worker():
                barrier.wait()
                try:
                    for _ in range(5):
                        for g in reader.groups:
                            out = reader.decode_cpu(g.name, torch.empty(g.layout.size, dtype=torch.uint8))
                            if not torch.equal(out, expected[g.name]):
                                errors.append(g.name)
                except Exception as exc:  # collected, asserted below
                    errors.append(repr(exc))

            threads = [threading.Thread(target=worker) for _ in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert errors == []
    finally:
        sys.setswitchinterval(old_interval)
