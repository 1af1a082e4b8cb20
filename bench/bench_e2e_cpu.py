"""The end-to-end benchmark script runs on the CPU (dry run, tiny model): rows complete, tokens identical."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent / "gpu_e2e.py"


def test_e2e_dry_run(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), str(out), "--dry-run", "--layers", "3", "--tokens", "4"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())
    rows = [r for r in results["rows"] if r["method"].startswith("offload_runtime")]
    assert len(rows) == 6 and not [r for r in rows if "error" in r]
    assert all(r["identical"] and r["tok_s"] > 0 for r in rows)
    assert {r["scenario"] for r in rows} == {
        "streamed from pinned RAM",
        "streamed from disk",
        "half resident",
    }
    disk = [r for r in rows if r["scenario"] == "streamed from disk"]
    assert all(r["tiers"]["DISK"] > 0 and r["tiers"]["HOST"] == 0 for r in disk)
    assert all(results["gates"].values()), results["gates"]
