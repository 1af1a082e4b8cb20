"""The 70B script's dry run (tiny synthetic shape, zstd, CPU) runs end to end and matches its reference."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "synthetic_70b.py"


def test_synthetic_dry_run_matches_the_layer_by_layer_reference(tmp_path):
    out = tmp_path / "synthetic.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--dry-run"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["identical"] is True
    assert result["logits_vs_reference"]["bit_identical"] is True
    assert result["plan_split"]["host"]["groups"] > 0  # the dry run really streams
    assert result["tok_s"] > 0
