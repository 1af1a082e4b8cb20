"""The tensor-parallel benchmark's dry run (tiny shape, zstd, 2 gloo ranks on the CPU) runs every row end to
end under torchrun, bit-identical to its references, and its report evaluates the gates."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent / "tp_offload.py"


def test_tp_offload_dry_run_matches_its_references(tmp_path):
    rows = "h2d,8b,70b-tp,70b-1gpu-40"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(SCRIPT)]
    proc = subprocess.run(
        [*command, str(tmp_path), "--dry-run", "--rows", rows], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--report"], capture_output=True, text=True, timeout=60
    )
    assert report.returncode == 0, report.stderr[-2000:]
    merged = json.loads((tmp_path / "tp_offload.json").read_text())
    gates = merged["gates"]
    assert gates["8b: bit-identical to the resident references"] is True
    assert gates["70b: TP at 40 GiB per GPU bit-identical to the unoffloaded TP reference"] is True
    tp = merged["rows"]["8b"]["tp_streamed"]
    assert len(tp) == 2 and all(r["within_budget"] and r["plan_split"]["host"]["groups"] for r in tp)
    assert merged["rows"]["8b"]["environment"]["NCCL_NVLS_ENABLE"] == "0"
