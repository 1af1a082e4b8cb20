"""CI smoke test of the MoE benchmark: its dry run (tiny synthetic Qwen3-MoE on the CPU) runs every row, and
every row's tokens equal the layer-by-layer reference."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_moe_bench_dry_run(tmp_path):
    out = tmp_path / "moe.json"
    here = Path(__file__).parent
    subprocess.run([sys.executable, str(here / "moe_bench.py"), str(out), "--dry-run"], check=True, cwd=here)
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert set(rows) == {"block", "expert", "expert+speculate"}
    assert all(r["identical"] for r in rows.values()), rows
    assert rows["expert"]["experts"]["requested"] > 0 and "experts" in rows["expert"]["plan"]
    assert result["gates"]["lossless_rows_identical"] and result["gates"]["peak_weight<=budget"]
