"""The end-to-end benchmark script runs on the CPU (dry run, tiny model): rows complete, lossless tokens
identical, the lossy int8 row scored by top-1 agreement, memory recorded per row; --codecs/--scenarios
select rows."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "gpu_e2e.py"


def run_dry(tmp_path, *args: str) -> dict:
    out = tmp_path / "e2e.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), str(out), "--dry-run", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


def test_e2e_dry_run(tmp_path):
    results = run_dry(tmp_path, "--layers", "3", "--tokens", "4")
    rows = [r for r in results["rows"] if r["method"].startswith("offload_runtime")]
    assert not [r for r in rows if "error" in r], rows
    lossless = [r for r in rows if r["lossless"]]
    assert len(lossless) == 6
    assert all(r["identical"] and r["tok_s"] > 0 for r in lossless)
    assert {r["scenario"] for r in lossless} == {
        "streamed from pinned RAM",
        "streamed from disk",
        "half resident",
    }
    disk = [r for r in rows if r["scenario"] == "streamed from disk"]
    assert all(r["tiers"]["DISK"] > 0 and r["tiers"]["HOST"] == 0 for r in disk)
    # int8 decodes on the CPU through its inner zstd: only its pinned-RAM row runs there
    (int8,) = [r for r in rows if not r["lossless"]]
    assert int8["method"] == "offload_runtime int8" and int8["scenario"] == "streamed from pinned RAM"
    assert 0.5 <= int8["top1_agreement"] <= 1.0 and int8["tok_s"] > 0
    assert results["stored_bytes_int8"] < results["stored_bytes_raw"]
    assert all(r["rss_after_bytes"] > 0 for r in results["rows"])
    assert all(r["peak_rss_bytes"] >= r["rss_after_bytes"] for r in results["rows"] if "peak_rss_bytes" in r)
    assert not [r for r in results["rows"] if r["method"].startswith("accelerate")]  # CUDA only
    assert all(results["gates"].values()), results["gates"]


def test_e2e_dry_run_selects_rows(tmp_path):
    results = run_dry(
        tmp_path, "--layers", "2", "--tokens", "2", "--codecs", "raw", "--scenarios", "streamed from disk"
    )
    assert [(r["method"], r.get("scenario")) for r in results["rows"]] == [
        ("resident", None),
        ("offload_runtime raw", "streamed from disk"),
        ("resident", "again, last"),  # measured again at the end: the gates take the faster one
    ]
    assert results["rows"][-1]["identical"]
