"""`offload-runtime generate`, `bench` and the CLI's error messages, each in a subprocess."""

import subprocess
import sys

import pytest
import torch

import offload_runtime
from offload_runtime.tiny import tiny_model


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "offload_runtime", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def chat_container(tmp_path_factory, smollm2):
    """A tiny Llama with SmolLM2's vocabulary, packed with SmolLM2's tokenizer and chat template."""
    _, tokenizer = smollm2
    model = tiny_model("llama", vocab_size=len(tokenizer), num_layers=3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    offload_runtime.pack(model, path, codec="zstd", progress=False, tokenizer=tokenizer)
    return path, model, tokenizer


def test_generate_streams_the_same_tokens_as_the_unoffloaded_model(chat_container):
    path, model, tokenizer = chat_container
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, return_tensors="pt"
    )
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False)
    expected_text = tokenizer.decode(expected[0, ids.shape[1] :], skip_special_tokens=True)

    proc = _cli(
        "generate",
        str(path),
        "--prompt",
        "Hello there",
        "--budget-gb",
        "0.03",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == expected_text.strip()
    # what a person reads, on stderr: progress while loading, the plan, load time and speed
    assert "load tiny.safetensors:" in proc.stderr and " MiB" in proc.stderr
    assert "loaded tiny.safetensors in " in proc.stderr and "plan: 6 groups (" in proc.stderr
    assert "12 tokens in " in proc.stderr and "tok/s" in proc.stderr

    quiet = _cli(
        "generate", str(path), "--prompt", "Hello there", "--budget-gb", "0.03", "--max-new-tokens", "12"
    )
    assert quiet.returncode == 0 and quiet.stdout == proc.stdout
    quiet = _cli(
        "generate",
        str(path),
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "12",
        "--device",
        "cpu",
        "--quiet",
    )
    assert quiet.returncode == 0 and quiet.stdout == proc.stdout and quiet.stderr == ""


def test_bench_prints_a_row_per_budget(chat_container):
    path, _, _ = chat_container
    proc = _cli("bench", str(path), "--budget-gb", "0.03", "1", "--max-new-tokens", "4", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and "tok/s" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["0.03", "1"]
    assert all(float(row.split("|")[2]) > 0 for row in rows)


def test_missing_file_is_a_clear_error(tmp_path):
    proc = _cli("generate", str(tmp_path / "nope.safetensors"), "--prompt", "hi")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == f"offload-runtime generate: error: no such file or directory: {tmp_path / 'nope.safetensors'}"
    )


def test_budget_below_minimum_names_the_minimum(chat_container):
    path, _, _ = chat_container
    proc = _cli("generate", str(path), "--prompt", "hi", "--budget-gb", "0.000001", "--device", "cpu")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "below the minimum working set" in proc.stderr
    assert "expected=" in proc.stderr and "raise --budget-gb to at least" in proc.stderr


def test_ans_without_nvcomp_says_which_extra_to_install(tmp_path):
    from offload_runtime.native.availability import gpu_codecs_unavailable_reason

    if gpu_codecs_unavailable_reason() is None:
        pytest.skip("CUDA and nvCOMP are present: ans is available here")
    model_dir = tmp_path / "m"
    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(model_dir)
    proc = _cli("pack", str(model_dir), str(tmp_path / "out.safetensors"), "--codec", "ans")
    assert proc.returncode == 2
    assert "offload-runtime[cu12]" in proc.stderr and "offload-runtime[cu13]" in proc.stderr


@pytest.mark.parametrize(("experts", "expert_plan"), [("auto", True), ("block", False)])
def test_bench_streams_experts_on_their_own_unless_asked_for_blocks(experts, expert_plan):
    args = ["--synthetic", "tiny-qwen3-moe", "--budget-gb", "0.001", "--device", "cpu", "--codec", "zstd"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "offload_runtime",
            "bench",
            *args,
            "--max-new-tokens",
            "2",
            "--experts",
            experts,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert ("expert plan on cpu" in result.stdout) is expert_plan, result.stdout


def test_bench_takes_the_expert_cache_options():
    args = ["--synthetic", "tiny-qwen3-moe", "--budget-gb", "0.001", "--device", "cpu", "--codec", "zstd"]
    options = ["--expert-cache", "decoded", "--expert-policy", "lfu", "--max-new-tokens", "2"]
    command = [sys.executable, "-m", "offload_runtime", "bench", *args, *options]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "decoded entries" in result.stdout and "(lfu)" in result.stdout, result.stdout  # (the CPU's)
    bad = subprocess.run([*command, "--expert-policy", "fifo"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "invalid choice: 'fifo'" in bad.stderr
    # compressed entries need CUDA: one error line, in the command's words
    cpu = subprocess.run(
        [*command, "--expert-cache", "compressed"], capture_output=True, text=True, timeout=300
    )
    assert cpu.returncode == 2 and len(cpu.stderr.strip().splitlines()) == 1, cpu.stderr
    assert (
        "--expert-cache compressed needs a CUDA device" in cpu.stderr
        and "--expert-cache decoded" in cpu.stderr
    )
