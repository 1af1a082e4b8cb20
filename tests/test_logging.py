"""The ``offload_runtime`` logger: one INFO line per dispatch (plan totals), one per removal (stats), nothing
at import."""

from __future__ import annotations

import logging
import subprocess
import sys

import torch

from offload_runtime import dispatch_compressed, remove_offload
from offload_runtime.tiny import tiny_model


def test_one_info_line_per_dispatch_and_per_removal(caplog):
    model = tiny_model("llama", num_layers=3)
    with caplog.at_level(logging.INFO, logger="offload_runtime"):
        dispatch_compressed(model, 0.0005, device="cpu", codec="zstd")
        dispatched = [r for r in caplog.records if r.name == "offload_runtime"]
        model(torch.tensor([[1, 2, 3]]))
        remove_offload(model)
    records = [r for r in caplog.records if r.name == "offload_runtime"]
    assert len(dispatched) == 1 and len(records) == 2
    assert all(r.levelno == logging.INFO and "\n" not in r.getMessage() for r in records)
    first, second = (r.getMessage() for r in records)
    assert "dispatched LlamaForCausalLM" in first and "budget" in first and "host" in first, first
    assert "removed from LlamaForCausalLM" in second and "loads" in second, second


def test_nothing_is_logged_at_import():
    code = (
        "import logging; logging.basicConfig(level=logging.DEBUG, format='LOG %(name)s %(message)s'); "
        "import offload_runtime, offload_runtime.scheduler, offload_runtime.loaders, offload_runtime.native"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "LOG offload_runtime" not in out.stderr + out.stdout
