"""``bench/fused_kernels.py`` runs end to end (``--smoke``: a tiny shape on the CPU under Triton's
interpreter), so the H200 run is not the first time its code paths execute."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import triton_cpu  # selects the interpreter before the kernel modules are imported

from offload_runtime.native.fused12_linear import parse_table

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fused_kernels.py"


@pytest.mark.skipif(not triton_cpu.AVAILABLE or not triton_cpu.INTERPRETED, reason="needs triton, no CUDA")
def test_smoke_run_writes_checked_results_and_a_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("fused_kernels_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.main([str(tmp_path / "r.json"), "--smoke"]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert [row["m"] for row in result["rows"]] == list(bench.SMOKE_ROWS)
    variants = [v for row in result["rows"] for v in row["variants"]]
    assert {v["path"] for v in variants} == {"gemv", "wdot", "dot", "decode"}
    assert all(v["ok"] and v["us"] > 0 for v in variants), variants
    assert all(row["best"] and row["cublas_us"] > 0 for row in result["rows"])
    table = parse_table(json.loads((tmp_path / "fused12_table.json").read_text()))
    assert sorted(m for m, _ in table[(9, 38)]) == list(bench.SMOKE_ROWS)
    assert "cuBLAS us" in capsys.readouterr().out  # the table is printed last
