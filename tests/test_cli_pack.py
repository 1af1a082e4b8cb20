"""`offload-runtime pack` and `offload-runtime inspect` as a user runs them (subprocesses)."""

import subprocess
import sys

from offload_runtime.loaders import ContainerReader
from offload_runtime.tiny import tiny_model


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "offload_runtime", *args], capture_output=True, text=True, timeout=300
    )


def test_pack_then_inspect(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "hf")
    out = tmp_path / "m.ort"
    proc = _cli("pack", str(tmp_path / "hf"), str(out), "--codec", "zstd", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: 6 groups" in proc.stdout and "MiB stored for" in proc.stdout
    with ContainerReader(out) as reader:
        groups = reader.groups
    proc = _cli("inspect", str(out))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "format version 1" in lines[0] and "LlamaForCausalLM" in lines[1]
    for group in groups:
        row = next(line for line in lines if line.startswith(group.name + " "))
        cells = row.split()
        assert cells[2] == "zstd"
        assert cells[3:7] == [
            f"{group.decoded_size / 2**20:.2f}",
            "MiB",
            f"{group.stored_size / 2**20:.2f}",
            "MiB",
        ]
        assert cells[8] == str(len(group.chunks)) and cells[9] == "stored"  # stored, not "yes": not checked
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[1] == f"{sum(g.decoded_size for g in groups) / 2**20:.2f}"
    assert total[3] == f"{sum(g.stored_size for g in groups) / 2**20:.2f}"
    assert lines[-1].startswith("payloads not read") and f"offload-runtime verify {out}" in lines[-1]


def test_pack_missing_source_exits_2(tmp_path):
    proc = _cli("pack", str(tmp_path / "nope"), str(tmp_path / "m.ort"))
    assert proc.returncode == 2
    assert (
        proc.stderr.strip() == f"offload-runtime pack: error: no such file or directory: {tmp_path / 'nope'}"
    )
    assert not (tmp_path / "m.ort").exists()


def test_pack_unknown_codec_exits_2(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "hf")
    proc = _cli("pack", str(tmp_path / "hf"), str(tmp_path / "m.ort"), "--codec", "lzma9")
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "unknown codec 'lzma9'" in proc.stderr and "zstd" in proc.stderr


def test_inspect_corrupt_container_exits_2(tmp_path):
    bad = tmp_path / "bad.ort"
    bad.write_bytes(b"\x05\x00")
    proc = _cli("inspect", str(bad))
    assert proc.returncode == 2
    assert "offload-runtime inspect: error: file too short" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
