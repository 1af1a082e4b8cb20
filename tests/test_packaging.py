"""The package installs into a fresh venv (regular and editable) under the `offload_runtime` name only."""

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = [
    "offload_runtime",
    "offload_runtime.native",
    "offload_runtime.loaders",
    "offload_runtime.scheduler",
]


def _fresh_venv(tmp_path: Path) -> Path:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # The dependencies (torch, transformers, pip, setuptools) come from this environment through a .pth
    # line, so nothing is downloaded. Paths added by a .pth line do not have their own .pth files run,
    # so this environment's installation of offload_runtime (editable finder) is not visible there.
    outer = [p for p in {sysconfig.get_paths()["purelib"], *site.getsitepackages()} if os.path.isdir(p)]
    (Path(purelib) / "_outer_env.pth").write_text("\n".join(outer) + "\n")
    return python


@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_installs_into_fresh_venv(tmp_path, editable):
    python = _fresh_venv(tmp_path)
    target = ["-e", str(REPO)] if editable else [str(REPO)]
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            *target,
        ],
        check=True,
        cwd=tmp_path,
        env={**os.environ, "PIP_NO_CACHE_DIR": "1"},
    )
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    top_level = {p.name for p in purelib.iterdir()}
    assert not top_level & {"native", "loaders", "scheduler"}, top_level

    probe = (
        "import importlib, os\n"
        f"for name in {SUBPACKAGES!r}:\n"
        "    mod = importlib.import_module(name)\n"
        "    print(name, os.path.realpath(mod.__file__))\n"
        "for bare in ('native', 'loaders', 'scheduler'):\n"
        "    try:\n"
        "        importlib.import_module(bare)\n"
        "    except ModuleNotFoundError:\n"
        "        print('absent', bare)\n"
        "    else:\n"
        "        print('PRESENT', bare)\n"
    )
    out = subprocess.run(
        [str(python), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path
    ).stdout
    lines = out.splitlines()
    located = dict(line.split(" ", 1) for line in lines[: len(SUBPACKAGES)])
    expected_root = REPO if editable else purelib
    for name in SUBPACKAGES:
        assert Path(located[name]).is_relative_to(expected_root.resolve()), (name, located[name])
    # the repository's `native/` folder is what installs as offload_runtime.native
    if editable:
        assert Path(located["offload_runtime.native"]).parent == REPO / "native"
    assert lines[len(SUBPACKAGES) :] == ["absent native", "absent loaders", "absent scheduler"]

    cli = purelib.parent.parent.parent / "bin" / "offload-runtime"
    version = subprocess.run([str(cli), "--version"], check=True, capture_output=True, text=True).stdout
    assert version.startswith("offload-runtime ")
