"""GGUF in: ``pack x.gguf out`` de-quantises through transformers and keeps the tokenizer."""

import subprocess
import sys

import pytest
import torch

import offload_runtime
from offload_runtime.errors import CheckpointError
from offload_runtime.loaders import ContainerReader, pack
from offload_runtime.packaged import smollm2_gguf


def test_pack_a_gguf_file_from_the_cli(smollm2, tmp_path):
    """The packaged SmolLM2 Q4_1 file: weights de-quantised to --dtype, tokenizer kept."""
    model, tokenizer = smollm2  # loaded by transformers from the same file, de-quantised to float32
    out = tmp_path / "smollm2.safetensors"
    options = ["--codec", "raw", "--dtype", "bfloat16", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "offload_runtime", "pack", str(smollm2_gguf()), str(out), *options],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Converting" not in proc.stderr  # --no-progress hides transformers' de-quantisation bar too
    assert f"wrote {out}: 32 groups" in proc.stdout
    state = model.state_dict()
    with ContainerReader(out) as reader:
        assert reader.index.dtype == "bfloat16" and reader.index.model_class == "LlamaForCausalLM"
        for group in ("model.layers.0", "model.layers.29"):
            entry = reader.group(group)
            buffer = reader.decode_cpu(group, torch.empty(entry.decoded_size, dtype=torch.uint8))
            for name, tensor in entry.layout.views(buffer).items():
                assert torch.equal(tensor, state[name].to(torch.bfloat16)), name
        assert "quantization_config" not in reader.index.config  # plain dense weights, nothing to re-quantise
    rebuilt = offload_runtime.load_tokenizer(out)
    text = "What is the capital of France?"
    assert rebuilt(text).input_ids == tokenizer(text).input_ids
    assert rebuilt.chat_template == tokenizer.chat_template


def test_gguf_default_dtype_is_float32(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offload_runtime.loaders.gguf import load_gguf

    seen = {}

    def fake_from_pretrained(folder, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake_from_pretrained)
    with pytest.raises(CheckpointError, match="transformers cannot load this GGUF file"):
        load_gguf(tmp_path / "x.gguf", None, progress=False)
    assert seen["dtype"] == torch.float32 and seen["gguf_file"] == "x.gguf"


@pytest.mark.parametrize("size", [5000, 64])
def test_a_truncated_gguf_is_a_checkpoint_error(tmp_path, size):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(smollm2_gguf().read_bytes()[:size])
    with pytest.raises(CheckpointError, match="transformers cannot load this GGUF file") as info:
        pack(broken, tmp_path / "out.safetensors", progress=False)
    assert info.value.file == str(broken)
    assert not (tmp_path / "out.safetensors").exists()


def test_weights_left_packed_by_transformers_are_refused(monkeypatch, tmp_path):
    """A transformers that keeps GGUF blocks quantised (uint8 storage) would give pack the wrong tensors."""
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offload_runtime.loaders.gguf import load_gguf

    packed = nn.Module()
    packed.blocks = nn.Parameter(torch.zeros(8, dtype=torch.uint8), requires_grad=False)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: packed)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    with pytest.raises(CheckpointError, match="kept this GGUF file's quantised blocks packed") as info:
        load_gguf(tmp_path / "x.gguf", progress=False)
    assert info.value.actual == "torch.uint8"
