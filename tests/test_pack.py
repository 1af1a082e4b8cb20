"""pack from every kind of source, atomically, in bounded memory."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from offload_runtime.errors import CheckpointMismatchError, CodecUnavailableError
from offload_runtime.loaders import ContainerReader, load_state_dict, load_tokenizer, pack
from offload_runtime.loaders.load import load_model
from offload_runtime.tiny import tiny_model


def _equal_states(a, b):
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("arch", ["llama", "qwen2", "bert"])
def test_pack_directory_matches_module(arch, tmp_path):
    model = tiny_model(arch)
    model.save_pretrained(tmp_path / "hf")
    from_dir = pack(tmp_path / "hf", tmp_path / "dir.ort", codec="zstd", progress=False)
    from_module = pack(model, tmp_path / "mod.ort", codec="zstd", progress=False)
    with ContainerReader(from_dir) as a, ContainerReader(from_module) as b:
        assert [(g.name, g.aliases, g.layout) for g in a.groups] == [
            (g.name, g.aliases, g.layout) for g in b.groups
        ]
        assert a.index.model_class == type(model).__name__
        _equal_states(load_state_dict(a), model.state_dict())
        rebuilt = load_model(a)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        key = "last_hidden_state" if arch == "bert" else "logits"
        assert torch.equal(model(ids)[key], rebuilt(ids)[key])


def test_pack_sharded_directory_and_dtype(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    out = pack(tmp_path / "hf", tmp_path / "m.ort", codec="raw", progress=False, dtype=torch.bfloat16)
    with ContainerReader(out) as reader:
        assert reader.index.dtype == "bfloat16" and reader.index.config["dtype"] == "bfloat16"
        state = load_state_dict(reader)
    _equal_states(state, {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})


def test_pack_file_with_config_beside_it(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "hf")
    out = pack(tmp_path / "hf" / "model.safetensors", tmp_path / "m.ort", codec="raw", progress=False)
    with ContainerReader(out) as reader:
        assert reader.index.model_class == "GPT2LMHeadModel"
        _equal_states(load_state_dict(reader), model.state_dict())


def test_pack_bare_file_groups_by_prefix(tmp_path):
    tensors = {f"blocks.{i}.w": torch.full((4, 4), float(i)) for i in (0, 1, 10, 2)}
    tensors |= {"embed.weight": torch.ones(8, 4), "head.bias": torch.zeros(3, dtype=torch.float16)}
    save_file(tensors, tmp_path / "bare.safetensors")
    out = pack(tmp_path / "bare.safetensors", tmp_path / "bare.ort", codec="zstd", progress=False)
    with ContainerReader(out) as reader:
        kinds = {g.name: g.kind for g in reader.groups}
        assert kinds == {
            "blocks.0": "block",
            "blocks.1": "block",
            "blocks.2": "block",
            "blocks.10": "block",
            "embed": "module",
            "head": "module",
        }
        assert [g.name for g in reader.groups if g.kind == "block"] == [
            "blocks.0",
            "blocks.1",
            "blocks.2",
            "blocks.10",
        ]
        assert reader.index.config is None
        _equal_states(load_state_dict(reader), tensors)


def test_pack_directory_missing_weights_lists_them_all(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "hf")
    state = {k: v for k, v in model.state_dict().items() if "layers.1." not in k and k != "lm_head.weight"}
    save_file(state, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointMismatchError) as info:
        pack(tmp_path / "hf", tmp_path / "m.ort", codec="raw", progress=False)
    assert len(info.value.mismatches) == 10  # 9 tensors of layer 1 + lm_head
    assert "lm_head.weight: missing from the checkpoint" in str(info.value)
    assert not (tmp_path / "m.ort").exists()


def test_pack_is_atomic_on_failure(tmp_path, monkeypatch):
    from offload_runtime.loaders import sources

    model = tiny_model("llama")
    out = tmp_path / "m.ort"
    out.write_bytes(b"previous container")
    calls = {"n": 0}
    original = sources.ModuleSource.fill

    def failing_fill(self, name, dest):
        calls["n"] += 1
        if calls["n"] == 12:  # inside the second block
            raise RuntimeError("disk on fire")
        original(self, name, dest)

    monkeypatch.setattr(sources.ModuleSource, "fill", failing_fill)
    with pytest.raises(RuntimeError, match="disk on fire"):
        pack(model, out, codec="raw", progress=False, overwrite=True)
    assert out.read_bytes() == b"previous container"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ort"]  # no temp files


def test_pack_unknown_codec_and_missing_source(tmp_path):
    with pytest.raises(CodecUnavailableError, match="no-such-codec"):
        pack(tiny_model("llama"), tmp_path / "m.ort", codec="no-such-codec", progress=False)
    with pytest.raises(FileNotFoundError):
        pack(tmp_path / "missing", tmp_path / "m.ort", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_round_trip(minilm, tmp_path):
    model, tokenizer = minilm
    out = pack(model, tmp_path / "m.ort", codec="raw", progress=False, tokenizer=tokenizer)
    rebuilt = load_tokenizer(out)
    text = "Offloading compressed layers, one block at a time."
    assert rebuilt(text).input_ids == tokenizer(text).input_ids


def test_pack_progress_bar(tiny_llama, tmp_path, capsys):
    pack(tiny_llama, tmp_path / "m.ort", codec="zstd", progress=True)
    err = capsys.readouterr().err
    assert "pack m.ort" in err and "ratio=" in err and "groups=6/6" in err
    total = sum(p.numel() * p.element_size() for p in tiny_llama.parameters()) / 2**20
    assert " MiB" in err and " MB" not in err and f"/{total:.1f} MiB" in err  # one unit family


def test_pack_directory_peak_rss_is_about_two_groups(tmp_path):
    """24 wide layers (~180 MB bf16) packed from disk: the peak RSS rise stays near 2x one block (~7.6 MB)."""
    model = tiny_model("llama", num_layers=24, hidden_size=512, intermediate_size=2048, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "big")
    small = tiny_model("llama", num_layers=1)
    small.save_pretrained(tmp_path / "small")
    total = sum(t.nbytes for t in model.state_dict().values())
    del model
    script = textwrap.dedent(
        f"""
        import json, threading, time, psutil
        from offload_runtime.loaders import pack, ContainerReader
        pack({str(tmp_path / "small")!r}, {str(tmp_path / "warm.ort")!r}, codec="raw", progress=False)
        process, peak, stop = psutil.Process(), [0], threading.Event()
        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                time.sleep(0.002)
        baseline = process.memory_info().rss
        thread = threading.Thread(target=sample); thread.start()
        pack({str(tmp_path / "big")!r}, {str(tmp_path / "big.ort")!r}, codec="raw", progress=False)
        stop.set(); thread.join()
        with ContainerReader({str(tmp_path / "big.ort")!r}) as reader:
            largest = max(g.layout.size for g in reader.groups)
        print(json.dumps({{"rise": max(peak[0], process.memory_info().rss) - baseline, "largest": largest}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert total > 20 * result["largest"]  # the test means something only if the model dwarfs one group
    assert result["rise"] < 2 * result["largest"] + 16 * 2**20, result


@pytest.mark.parametrize("codec, inner", [("auto", None), ("int8", "zstd")])
def test_pack_for_the_cpu_never_picks_the_gpu_only_codec(tmp_path, monkeypatch, codec, inner):
    """On a machine with a GPU, ``device="cpu"`` steers ``auto`` (and int8's inner codec) away from ans."""
    import offload_runtime.native as native

    monkeypatch.setattr(native, "gpu_codecs_unavailable_reason", lambda: None)  # pretend nvCOMP is here
    model = tiny_model("llama", dtype=torch.bfloat16)
    assert native.resolve_codec(codec, None).name == ("ans" if codec == "auto" else "int8")
    path = pack(model, tmp_path / "cpu.ort", codec=codec, progress=False, device="cpu")
    with ContainerReader(path) as reader:
        assert {g.codec for g in reader.groups} == {"zstd" if codec == "auto" else "int8"}
        if inner is not None:
            assert {g.params["inner"] for g in reader.groups} == {inner}


def test_dispatch_on_the_cpu_packs_for_the_cpu(monkeypatch):
    """dispatch_compressed(device="cpu") passes the device to pack: int8 gets a CPU-decodable inner codec."""
    import offload_runtime.native as native
    from offload_runtime import dispatch_compressed

    monkeypatch.setattr(native, "gpu_codecs_unavailable_reason", lambda: None)
    model = tiny_model("llama")
    dispatch_compressed(model, 1.0, device="cpu", codec="int8")
    reader = model._offload_runtime.reader
    assert {g.params["inner"] for g in reader.groups} == {"zstd"}
    with torch.no_grad():
        model(torch.randint(3, 256, (1, 4)))


SENTENCEPIECE_LIKE = bytes(range(256)) * 3  # not UTF-8, like a sentencepiece model


class _SentencepieceTokenizer:
    """Writes what a slow Llama tokenizer saves: a config (text) and ``tokenizer.model`` (binary)."""

    def save_pretrained(self, directory):
        (Path(directory) / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
        (Path(directory) / "tokenizer.model").write_bytes(SENTENCEPIECE_LIKE)


def _files_given_to_auto_tokenizer(path, monkeypatch) -> dict[str, bytes]:
    import transformers

    seen = {}

    def from_pretrained(directory, *args, **kwargs):
        seen.update({f.name: f.read_bytes() for f in Path(directory).iterdir()})
        return "tokenizer"

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    assert load_tokenizer(path) == "tokenizer"
    return seen


def test_binary_tokenizer_files_are_kept(tmp_path, monkeypatch):
    # a tokenizer object: its sentencepiece model used to be dropped, leaving a tokenizer that cannot load
    model = tiny_model("llama")
    out = pack(model, tmp_path / "m.ort", codec="raw", progress=False, tokenizer=_SentencepieceTokenizer())
    with ContainerReader(out) as reader:
        assert set(reader.index.tokenizer) == {"tokenizer_config.json", "tokenizer.model.base64"}
    files = _files_given_to_auto_tokenizer(out, monkeypatch)
    assert files["tokenizer.model"] == SENTENCEPIECE_LIKE
    # a Hugging Face directory with a tokenizer.model beside the weights
    model.save_pretrained(tmp_path / "hf")
    _SentencepieceTokenizer().save_pretrained(tmp_path / "hf")
    out = pack(tmp_path / "hf", tmp_path / "d.ort", codec="raw", progress=False)
    assert _files_given_to_auto_tokenizer(out, monkeypatch)["tokenizer.model"] == SENTENCEPIECE_LIKE


def test_tokenizer_file_that_is_not_base64_is_a_typed_error(tmp_path):
    from container_surgery import rewrite_header

    from offload_runtime.errors import CheckpointError

    out = pack(
        tiny_model("llama"),
        tmp_path / "m.ort",
        codec="raw",
        progress=False,
        tokenizer=_SentencepieceTokenizer(),
    )
    rewrite_header(
        out, edit_index=lambda ix: ix["model"]["tokenizer"].update({"tokenizer.model.base64": "@@"})
    )
    with pytest.raises(CheckpointError, match="tokenizer file is not base64") as info:
        load_tokenizer(out)
    assert info.value.file == str(out)
