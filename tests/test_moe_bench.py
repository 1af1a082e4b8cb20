"""``bench/moe_bench.py`` runs end to end (``--dry-run``: tiny-qwen3-moe, zstd, on the CPU), so the H200 run
is not the first time its code paths execute: every row kind on the CPU, their tokens against the
layer-by-layer reference, the policy each row used, the gates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "moe_bench.py"


def test_dry_run_compares_every_row_with_the_reference(tmp_path):
    out = tmp_path / "moe.json"
    rows = "resident,block,expert,expert-lru,expert-decoded"
    proc = subprocess.run(
        [sys.executable, str(BENCH), str(out), "--dry-run", "--rows", rows],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    by_row = {r["row"]: r for r in result["rows"]}
    assert list(by_row) == rows.split(",")
    assert all("error" not in r and r["identical"] is True for r in by_row.values()), by_row
    assert by_row["expert"]["cache_policy"] == "layer-lru" and by_row["expert-lru"]["cache_policy"] == "lru"
    assert by_row["expert"]["warmed_at_dispatch"] == by_row["expert"]["cache_entries"] > 0
    assert "experts" not in by_row["block"]["plan"] and "experts:" in by_row["expert"]["plan"]
    assert result["gates"] == {"lossless_rows_identical": True, "peak_weight<=budget": True}
    assert result["expert_vs_resident"] == by_row["expert"]["tok_s"] / by_row["resident"]["tok_s"]
