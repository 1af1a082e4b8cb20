import subprocess
import sys

from offload_runtime import __version__


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
