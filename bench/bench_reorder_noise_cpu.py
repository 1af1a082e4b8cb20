"""bench/reorder_noise.py: its reordered linear sums in the order it states, every linear layer takes it,
and the script runs end to end on a small synthetic shape."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reorder_noise

SCRIPT = Path(__file__).resolve().parent / "reorder_noise.py"


def _cancelling():
    """One output whose fp32 sum depends on the order: 1e8 and -1e8 in columns 0 and 4 (one partial sum
    of the 4 interleaved ones), ones elsewhere: that order gives exactly 3, a serial sum 1e8 + 1 + ... not."""
    weight = torch.tensor([[1e8, 1.0, 1.0, 1.0, -1e8, 0.0, 0.0, 0.0]])
    return torch.ones(1, 8), weight


def test_reordered_linear_sums_interleaved_partials():
    x, weight = _cancelling()
    assert reorder_noise.SPLIT == 4
    assert reorder_noise.reordered_linear(x, weight, None).item() == 3.0
    assert reorder_noise.reordered_linear(x, weight, torch.tensor([0.5])).item() == 3.5
    serial = torch.zeros(())
    for i in range(8):  # the same products summed left to right: the 1 after 1e8 is lost in fp32
        serial = serial + x[0, i] * weight[0, i]
    assert serial.item() != 3.0


def test_reorder_reaches_every_linear_layer():
    x, weight = _cancelling()
    model = nn.Sequential(nn.Linear(8, 1, bias=False), nn.Sequential(nn.Linear(1, 1, bias=False)))
    with torch.no_grad():
        model[0].weight.copy_(weight)
        model[1][0].weight.fill_(2.0)
    reorder_noise.reorder(model)
    assert model(x).item() == 6.0


def test_script_runs_on_a_small_synthetic_shape(tmp_path):
    out = tmp_path / "noise.json"
    args = ["--skip-smollm2", "--layers", "2", "--hidden", "256", "--tokens", "8"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (model,) = json.loads(out.read_text())["models"].values()
    forward = model["forward"]
    assert forward["positions"] == 7 and 0.0 <= forward["top1_agreement"] <= 1.0
    assert forward["kl_mean"] >= 0.0 and forward["logits_max_abs_diff"] >= 0.0
