"""Every bad input to every subcommand: one ``error:`` line, exit status 2, before anything is loaded.

The CLI runs in-process (``cli.main``) so each case costs milliseconds; ``test_cli.py`` runs it as a user
does, in subprocesses. Loading functions are replaced by ones that fail the test, so a check that runs
after loading (or packing) starts is caught.
"""

import pytest
import torch
from safetensors.torch import save_file

import offload_runtime
from offload_runtime import cli
from offload_runtime.loaders import pack
from offload_runtime.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A chat container, an encoder container, one without tokenizer, one without config, an HF folder,
    an empty folder, a GGUF-looking file and a text file."""
    root = tmp_path_factory.mktemp("cli")
    files = {"root": root}
    files["llama"] = pack(tiny_model("llama"), root / "llama.safetensors", codec="zstd", progress=False)
    for key, arch in (("with_tok", "llama"), ("bert", "bert"), ("gpt2", "gpt2")):
        out = root / f"{key}.safetensors"
        files[key] = pack(tiny_model(arch), out, codec="zstd", progress=False, tokenizer=tiny_tokenizer())
    save_file({"a.0.w": torch.ones(4)}, root / "bare_src.safetensors")
    files["bare"] = pack(root / "bare_src.safetensors", root / "bare.safetensors", progress=False)
    files["hf"] = root / "hf"
    tiny_model("llama").save_pretrained(files["hf"])
    files["empty"] = root / "empty"
    files["empty"].mkdir()
    files["gguf"] = root / "m.gguf"
    files["gguf"].write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    files["text"] = root / "notes.txt"
    files["text"].write_text("not weights\n")
    return files


@pytest.fixture(autouse=True)
def nothing_loads(monkeypatch):
    """Loading or packing fails the test: every case here must be refused before."""

    def must_not_run(*args, **kwargs):
        raise AssertionError("the command started loading before refusing its input")

    monkeypatch.setattr(offload_runtime, "load_compressed", must_not_run)
    monkeypatch.setattr("offload_runtime.loaders.pack", must_not_run)
    monkeypatch.setattr("offload_runtime.packaged.load_smollm2", must_not_run)
    monkeypatch.setattr("offload_runtime.synthetic.synthetic_skeleton", must_not_run)


def run(capsys, *args) -> tuple[int, str, str]:
    try:
        status = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own errors
        status = exc.code
    out, err = capsys.readouterr()
    return status, out, err


def refused(capsys, *args) -> str:
    """Run and check the refusal: status 2, one `error:` line on stderr naming the subcommand."""
    status, _, err = run(capsys, *args)
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"offload-runtime {args[0]}: error: "), err
    return lines[0]


def test_generate_missing_container(capsys, files):
    line = refused(capsys, "generate", files["root"] / "nope.safetensors", "--prompt", "hi")
    assert "no such file or directory" in line and "nope.safetensors" in line


@pytest.mark.parametrize("command", ["generate", "bench", "inspect", "verify"])
@pytest.mark.parametrize(
    ("kind", "words"), [("empty", "is a folder, not a container file"), ("hf", "pack it first")]
)
def test_a_folder_where_a_container_is_expected(capsys, files, command, kind, words):
    extra = ["--prompt", "hi"] if command == "generate" else []
    assert words in refused(capsys, command, files[kind], *extra)


@pytest.mark.parametrize("command", ["generate", "inspect", "verify"])
def test_a_gguf_where_a_container_is_expected(capsys, files, command):
    extra = ["--prompt", "hi"] if command == "generate" else []
    line = refused(capsys, command, files["gguf"], *extra)
    assert "is a GGUF file" in line and "offload-runtime pack" in line


@pytest.mark.parametrize("command", ["generate", "bench"])
@pytest.mark.parametrize("budget", ["nan", "inf", "0", "-1", "0.0", "-0.5"])
def test_budget_must_be_a_positive_number(capsys, files, command, budget):
    extra = ["--prompt", "hi"] if command == "generate" else []
    line = refused(capsys, command, files["with_tok"], *extra, "--budget-gb", budget)
    assert "--budget-gb must be a positive number of GiB" in line and "--budget-gb 2" in line
    assert "minimum working set" not in line


def test_bench_checks_every_budget(capsys, files):
    line = refused(capsys, "bench", files["with_tok"], "--budget-gb", "1", "nan")
    assert "--budget-gb must be a positive number" in line


def test_demo_budget_is_checked_before_the_model_loads(capsys):
    for budget in ("0", "-1", "nan"):
        assert "--budget-gb must be a positive number" in refused(capsys, "demo", "--budget-gb", budget)


@pytest.mark.parametrize("command", ["generate", "bench", "demo"])
@pytest.mark.parametrize("tokens", ["0", "-5"])
def test_max_new_tokens_must_be_positive(capsys, files, command, tokens):
    extra = {"generate": [files["with_tok"], "--prompt", "hi"], "bench": [files["with_tok"]], "demo": []}[
        command
    ]
    line = refused(capsys, command, *extra, "--max-new-tokens", tokens)
    assert "--max-new-tokens must be an integer of 1 or more" in line


@pytest.mark.parametrize("value", ["1.5", "many", ""])
def test_a_value_that_is_not_a_number_is_one_line(capsys, files, value):
    line = refused(capsys, "generate", files["with_tok"], "--prompt", "hi", "--max-new-tokens", value)
    assert "invalid int value" in line and "offload-runtime generate --help" in line


@pytest.mark.parametrize(
    ("option", "value"), [("--prefetch", "0"), ("--host-budget-gb", "-1"), ("--host-budget-gb", "nan")]
)
def test_prefetch_and_host_budget(capsys, files, option, value):
    line = refused(capsys, "generate", files["with_tok"], "--prompt", "hi", option, value)
    assert f"{option} must be" in line


# ids spelled out: a bare "gpu" id would be taken for the gpu marker (conftest skips those without CUDA)
@pytest.mark.parametrize("command", ["generate", "bench", "demo", "pack"])
@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:x"], ids=lambda d: f"device={d}")
def test_unknown_device(capsys, files, command, device):
    extra = {
        "generate": [files["with_tok"], "--prompt", "hi"],
        "bench": [files["with_tok"]],
        "demo": [],
        "pack": [files["hf"], files["root"] / "new.safetensors"],
    }[command]
    line = refused(capsys, command, *extra, "--device", device)
    assert f"--device {device!r} is not a device" in line and "--device cpu" in line


@pytest.mark.parametrize("command", ["generate", "bench", "demo"])
def test_cuda_on_a_cpu_only_torch(capsys, files, command, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    extra = {"generate": [files["with_tok"], "--prompt", "hi"], "bench": [files["with_tok"]], "demo": []}[
        command
    ]
    line = refused(capsys, command, *extra, "--device", "cuda")
    assert "has no CUDA support" in line and "--device cpu" in line


def test_empty_prompt(capsys, files):
    assert "--prompt is empty" in refused(capsys, "generate", files["with_tok"], "--prompt", "  ")


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_a_model_that_cannot_generate(capsys, files, command):
    extra = ["--prompt", "hi"] if command == "generate" else []
    line = refused(capsys, command, files["bert"], *extra)
    assert "holds a BertModel, which cannot generate text" in line


def test_a_container_without_tokenizer_or_config(capsys, files):
    assert "holds no tokenizer" in refused(capsys, "generate", files["llama"], "--prompt", "hi")
    assert "holds no model config" in refused(capsys, "generate", files["bare"], "--prompt", "hi")


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_more_tokens_than_the_model_has_positions(capsys, files, command):
    """Tiny GPT-2 has 128 learned positions: generating past them would index beyond the table."""
    extra = ["--prompt", "w5 w6 w7"] if command == "generate" else []
    line = refused(capsys, command, files["gpt2"], *extra, "--max-new-tokens", "500")
    assert "exceeds the 128 positions the model handles" in line and "or less" in line
    if command == "generate":
        assert "give --max-new-tokens 125 or less" in line
        line = refused(capsys, command, files["gpt2"], "--prompt", " ".join(["w5"] * 200))
        assert "the prompt is 200 tokens; the model handles 128 positions" in line


def test_not_a_container(capsys, files):
    line = refused(capsys, "generate", files["hf"] / "model.safetensors", "--prompt", "hi")
    assert "not an offload_runtime container" in line
    refused(capsys, "inspect", files["text"])


def test_bench_needs_exactly_one_source(capsys, files):
    assert "give a CHECKPOINT or --synthetic SHAPE" in refused(capsys, "bench")
    assert "not both" in refused(capsys, "bench", files["with_tok"], "--synthetic", "tiny")
    assert "--synthetic only" in refused(capsys, "bench", files["with_tok"], "--codec", "zstd")
    assert "--synthetic only" in refused(capsys, "bench", files["with_tok"], "--seed", "3")


def test_bench_synthetic_arguments(capsys):
    line = refused(capsys, "bench", "--synthetic", "llama-99b")
    from offload_runtime.synthetic import SYNTHETIC_SHAPES

    assert f"--synthetic must be one of {', '.join(sorted(SYNTHETIC_SHAPES))}" in line
    assert "--seed must be" in refused(capsys, "bench", "--synthetic", "tiny", "--seed", "-1")
    assert "unknown codec 'lzma'" in refused(capsys, "bench", "--synthetic", "tiny", "--codec", "lzma")


def test_pack_refusals(capsys, files):
    root, hf = files["root"], files["hf"]
    assert "holds no model.safetensors and no model.safetensors.index.json" in refused(
        capsys, "pack", files["empty"], root / "o.safetensors"
    )
    line = refused(capsys, "pack", hf, hf / "model.safetensors", "--force")
    assert "writing it would destroy the source" in line
    line = refused(capsys, "pack", hf, files["llama"])
    assert "already exists" in line and "--force" in line and "overwrite=True" not in line
    assert f"OUT {hf} is a folder" in refused(capsys, "pack", hf, hf)
    assert f"does not exist: {root / 'nodir'}" in refused(
        capsys, "pack", hf, root / "nodir" / "o.safetensors"
    )
    assert "unknown codec 'lzma9'" in refused(capsys, "pack", hf, root / "o.safetensors", "--codec", "lzma9")
    assert "invalid choice: 'fp8'" in refused(capsys, "pack", hf, root / "o.safetensors", "--dtype", "fp8")
    assert "already an offload_runtime container" in refused(
        capsys, "pack", files["llama"], root / "o.safetensors"
    )
    assert "neither a safetensors nor a GGUF file" in refused(
        capsys, "pack", files["text"], root / "o.safetensors"
    )
    assert "no such file or directory" in refused(capsys, "pack", root / "nope", root / "o.safetensors")
    assert not (root / "o.safetensors").exists()


def test_missing_arguments_are_one_line(capsys):
    assert "required: --prompt" in refused(capsys, "generate", "x.safetensors")
    assert "required: CHECKPOINT" in refused(capsys, "inspect")
    assert "required: SRC, OUT" in refused(capsys, "pack")
    assert "unrecognized arguments: --nope" in refused(capsys, "inspect", "x", "--nope")


def test_budget_below_the_minimum_names_cli_options(capsys, files, monkeypatch, tmp_path):
    monkeypatch.undo()  # this one loads (the minimum comes from the container)
    args = ["--prompt", "w5", "--budget-gb", "1e-6", "--device", "cpu"]
    line = refused(capsys, "generate", files["with_tok"], *args)
    assert "below the minimum working set" in line and "raise --budget-gb to at least" in line
    assert "budget_gb" not in line and "prefetch" not in line.split("]. ")[1]  # the hint
    # six layers: at the minimum every layer streams, so fewer slots (a lower --prefetch) would help
    deep = pack(
        tiny_model("llama", num_layers=6),
        tmp_path / "d.safetensors",
        progress=False,
        tokenizer=tiny_tokenizer(),
    )
    line = refused(capsys, "generate", deep, *args, "--prefetch", "3")
    assert "4 slots x" in line and "or lower --prefetch (now 3)" in line


def test_an_unexpected_failure_is_one_line_with_status_1(capsys, files, monkeypatch):
    def broken(args):
        raise ZeroDivisionError("boom")

    # registered when main builds the parser, so patching the module's function is enough
    monkeypatch.setattr("offload_runtime.cli_pack.run_inspect", broken)
    status, _, err = run(capsys, "inspect", files["llama"])
    assert status == 1 and len(err.strip().splitlines()) == 1
    assert "unexpected ZeroDivisionError: boom" in err and cli.DEBUG_ENV in err
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ZeroDivisionError, match=r"^boom$"):  # the original exception, not a rewording
        cli.main(["inspect", str(files["llama"])])


def test_verify_names_group_and_chunk_of_damage(capsys, files, tmp_path):
    from offload_runtime.loaders import ContainerReader

    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(files["with_tok"].read_bytes())
    with ContainerReader(damaged) as reader:
        entry = reader.groups[2]
        offset = reader._offsets[entry.name] + entry.chunks[0].offset + 5
    data = bytearray(damaged.read_bytes())
    data[offset] ^= 0xFF
    damaged.write_bytes(bytes(data))
    status, out, err = run(capsys, "verify", damaged, "--no-progress")
    assert status == 1
    assert f"group={entry.name}" in out and "chunk=0" in out and "chunk CRC-32 mismatch" in out
    assert f"1 of 6 groups damaged (first: group '{entry.name}' chunk 0" in err.strip().splitlines()[-1]
    # inspect reads only the index: it says so, and does not call the container verified
    status, out, _ = run(capsys, "inspect", damaged)
    assert status == 0 and "payloads not read" in out and " yes" not in out
    status, out, err = run(capsys, "inspect", damaged, "--verify", "--no-progress")
    assert status == 1 and "DAMAGED" in out


def test_verify_of_a_sound_container(capsys, files):
    status, out, _ = run(capsys, "verify", files["with_tok"], "--no-progress")
    assert status == 0 and "no damage found" in out
    assert "decoded on the CPU and checked: 6 groups" in out
