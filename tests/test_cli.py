import argparse
import subprocess
import sys

import pytest

from offload_runtime import __version__
from offload_runtime.cli import SUBCOMMANDS, build_parser


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offload_runtime", *args], capture_output=True, text=True)


def test_version():
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"offload-runtime {__version__}"


def test_help():
    proc = _cli("--help")
    assert proc.returncode == 0 and "usage: offload-runtime" in proc.stdout


def test_unknown_subcommand_fails():
    proc = _cli("no-such-command")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "see `offload-runtime --help`" in proc.stderr


def _imports_after(argv: list[str]) -> set[str]:
    """Top-level modules imported by ``offload-runtime ARGV`` (run in a fresh interpreter)."""
    code = (
        "import sys\n"
        "from offload_runtime.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})), file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stderr.strip().splitlines()[-1].split())


@pytest.mark.parametrize("sub", [None, *SUBCOMMANDS])
def test_help_answers_without_importing_torch(sub):
    argv = ["--help"] if sub is None else [sub, "--help"]
    modules = _imports_after(argv)
    assert "offload_runtime" in modules and "argparse" in modules  # the probe sees what the CLI imported
    assert not modules & {"torch", "transformers", "numpy", "safetensors", "tqdm"}, sorted(modules)


def test_every_option_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) == set(SUBCOMMANDS)
    for name, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 10, (name, action.dest)


def test_subcommand_help_mentions_gguf_dequantisation():
    proc = _cli("pack", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert "de-quantised to --dtype" in text and "lossless relative to those de-quantised weights" in text
    assert "--force" in text
