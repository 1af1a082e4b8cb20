"""``pack`` loses nothing: it never writes over a file it reads, nor over any file unless asked, and a
source or output it cannot use is refused before anything is read, naming the path and what is missing."""

import importlib
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from offload_runtime.errors import CheckpointError, MissingFileError, UsageError
from offload_runtime.loaders import ContainerReader, pack
from offload_runtime.tiny import tiny_model

pack_module = importlib.import_module("offload_runtime.loaders.pack")  # the package exports the function


@pytest.fixture
def hf_dir(tmp_path):
    folder = tmp_path / "m"
    tiny_model("llama").save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def sharded_dir(tmp_path):
    folder = tmp_path / "sharded"
    tiny_model("llama").save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if pack starts reading tensors."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("pack started work before refusing")

    monkeypatch.setattr(pack_module, "_plan", must_not_run)


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("overwrite", [False, True])
def test_pack_refuses_to_write_over_the_weights_it_reads(hf_dir, overwrite, no_work):
    before = _snapshot(hf_dir)
    with pytest.raises(UsageError, match="a file this reads: writing it would destroy the source"):
        pack(hf_dir, hf_dir / "model.safetensors", overwrite=overwrite)
    assert _snapshot(hf_dir) == before


@pytest.mark.parametrize("target", ["config.json", "generation_config.json", "tokenizer.json"])
def test_pack_refuses_to_write_over_config_and_tokenizer_files(hf_dir, target, no_work):
    before = _snapshot(hf_dir)
    with pytest.raises(UsageError, match="would destroy the source"):
        pack(hf_dir, hf_dir / target, overwrite=True)
    assert _snapshot(hf_dir) == before


def test_pack_refuses_every_shard_and_the_index(sharded_dir, no_work):
    before = _snapshot(sharded_dir)
    shards = json.loads((sharded_dir / "model.safetensors.index.json").read_text())["weight_map"].values()
    for name in [*set(shards), "model.safetensors.index.json"]:
        with pytest.raises(UsageError, match="would destroy the source"):
            pack(sharded_dir, sharded_dir / name, overwrite=True)
    assert _snapshot(sharded_dir) == before


def test_pack_refuses_a_link_to_an_input(hf_dir, tmp_path, no_work):
    hard = tmp_path / "hard.safetensors"
    os.link(hf_dir / "model.safetensors", hard)
    soft = tmp_path / "soft.safetensors"
    soft.symlink_to(hf_dir / "model.safetensors")
    dotted = hf_dir / ".." / "m" / "model.safetensors"
    for out in (hard, soft, dotted):
        with pytest.raises(UsageError, match="would destroy the source"):
            pack(hf_dir, out, overwrite=True)


def test_pack_of_a_file_refuses_itself_and_the_config_beside_it(hf_dir, no_work):
    weights = hf_dir / "model.safetensors"
    for out in (weights, hf_dir / "config.json"):
        with pytest.raises(UsageError, match="would destroy the source"):
            pack(weights, out, overwrite=True)


def test_pack_of_a_gguf_refuses_the_gguf(tmp_path, no_work):
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    with pytest.raises(UsageError, match="would destroy the source"):
        pack(gguf, gguf, overwrite=True)
    assert gguf.read_bytes().startswith(b"GGUF")


def test_existing_output_needs_overwrite(hf_dir, tmp_path):
    out = tmp_path / "c.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists") as info:
        pack(hf_dir, out, codec="raw", progress=False)
    assert "overwrite=True" in str(info.value)
    assert out.read_bytes() == b"keep me"
    pack(hf_dir, out, codec="raw", progress=False, overwrite=True)
    with ContainerReader(out) as reader:
        assert reader.index.model_class == "LlamaForCausalLM"


def test_module_pack_refuses_an_existing_output(tmp_path):
    out = tmp_path / "c.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists"):
        pack(tiny_model("llama"), out, progress=False)
    assert out.read_bytes() == b"keep me"


def test_output_that_is_a_folder_is_refused_naming_it(hf_dir, tmp_path, no_work):
    with pytest.raises(UsageError, match=f"out {hf_dir} is a folder, not a file"):
        pack(hf_dir, hf_dir, overwrite=True)
    with pytest.raises(UsageError, match="is a folder, not a file"):
        pack(hf_dir, str(tmp_path / "new") + "/")
    assert not (tmp_path / "new").exists()


def test_output_in_a_missing_folder_is_refused_naming_the_folder(hf_dir, tmp_path, no_work):
    with pytest.raises(UsageError, match=f"the folder of out does not exist: {tmp_path / 'nope'}") as info:
        pack(hf_dir, tmp_path / "nope" / "c.safetensors")
    assert ".tmp" not in str(info.value)  # not the writer's temporary file


def test_output_in_an_unwritable_folder_is_refused(hf_dir, tmp_path, monkeypatch, no_work):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # root may write anywhere: simulate it
    with pytest.raises(UsageError, match=f"cannot write into {tmp_path}"):
        pack(hf_dir, tmp_path / "c.safetensors")


def test_output_whose_folder_is_a_file_is_refused(hf_dir, no_work):
    with pytest.raises(UsageError, match="is not a folder"):
        pack(hf_dir, hf_dir / "config.json" / "c.safetensors")


def test_empty_folder_says_what_is_missing(tmp_path, no_work):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError) as info:
        pack(tmp_path / "empty", tmp_path / "c.safetensors")
    message = str(info.value)
    assert "no model.safetensors and no model.safetensors.index.json (nor config.json)" in message
    assert "is empty" in message


def test_folder_with_a_gguf_points_at_it(tmp_path, no_work):
    folder = tmp_path / "g"
    folder.mkdir()
    (folder / "m.Q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(MissingFileError, match=r"it holds m.Q4.gguf: pack that file"):
        pack(folder, tmp_path / "c.safetensors")


def test_folder_without_config_says_so(hf_dir, tmp_path, no_work):
    (hf_dir / "config.json").unlink()
    with pytest.raises(MissingFileError, match=r"holds model.safetensors but no config.json"):
        pack(hf_dir, tmp_path / "c.safetensors")


def test_folder_with_config_only_says_weights_are_missing(hf_dir, tmp_path, no_work):
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(
        MissingFileError, match=r"holds no model.safetensors and no model.safetensors.index"
    ) as info:
        pack(hf_dir, tmp_path / "c.safetensors")
    assert "nor config.json" not in str(info.value)


def test_index_naming_missing_shards_lists_them(sharded_dir, tmp_path, no_work):
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(MissingFileError, match=f"shard.s. missing from .*{shard.name}"):
        pack(sharded_dir, tmp_path / "c.safetensors")


@pytest.mark.parametrize("text", ["{not json", "[]", '{"weight_map": 3}'])
def test_malformed_index_is_a_checkpoint_error(sharded_dir, tmp_path, text, no_work):
    (sharded_dir / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json"):
        pack(sharded_dir, tmp_path / "c.safetensors")


def test_malformed_config_is_a_checkpoint_error(hf_dir, tmp_path, no_work):
    (hf_dir / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        pack(hf_dir, tmp_path / "c.safetensors")


def test_unknown_model_type_is_a_checkpoint_error(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    with pytest.raises(CheckpointError, match="cannot build the stored config"):
        pack(hf_dir, tmp_path / "c.safetensors")


@pytest.mark.parametrize("content", [b"", b"hello world, not weights", b"\xff" * 64])
def test_a_file_that_is_neither_safetensors_nor_gguf(tmp_path, content, no_work):
    src = tmp_path / "weights.bin"
    src.write_bytes(content)
    with pytest.raises(CheckpointError, match="is neither a safetensors nor a GGUF file"):
        pack(src, tmp_path / "c.safetensors")


def test_a_container_is_not_packed_again(tmp_path):
    first = pack(tiny_model("llama"), tmp_path / "c.safetensors", codec="raw", progress=False)
    with pytest.raises(UsageError, match="is already an offload_runtime container"):
        pack(first, tmp_path / "again.safetensors")


def test_bare_safetensors_file_still_packs(tmp_path):
    save_file({"a.0.w": torch.ones(4), "a.1.w": torch.zeros(4)}, tmp_path / "w.safetensors")
    out = pack(tmp_path / "w.safetensors", tmp_path / "c.safetensors", codec="raw", progress=False)
    with ContainerReader(out) as reader:
        assert [g.name for g in reader.groups] == ["a.0", "a.1"]


def test_wrong_types_are_type_errors(hf_dir, tmp_path):
    with pytest.raises(TypeError, match="src must be a path"):
        pack(3, tmp_path / "c.safetensors")
    with pytest.raises(TypeError, match="out must be a path"):
        pack(hf_dir, None)
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype"):
        pack(hf_dir, tmp_path / "c.safetensors", dtype="bfloat16")
    with pytest.raises(UsageError, match="dtype must be a floating dtype"):
        pack(hf_dir, tmp_path / "c.safetensors", dtype=torch.int8)
    with pytest.raises(TypeError, match="tokenizer must be a transformers tokenizer"):
        pack(hf_dir, tmp_path / "c.safetensors", tokenizer="gpt2")
    assert not (tmp_path / "c.safetensors").exists()


def test_an_output_folder_where_files_cannot_be_created_names_the_output(hf_dir, tmp_path, monkeypatch):
    from offload_runtime.loaders import writer

    def refuse(path, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(writer, "open", refuse, raising=False)  # as in /proc: listed writable, yet not
    out = tmp_path / "c.safetensors"
    with pytest.raises(UsageError, match=f"cannot write {out}: No such file or directory") as info:
        pack(hf_dir, out, codec="raw", progress=False)
    assert ".tmp" not in str(info.value)
