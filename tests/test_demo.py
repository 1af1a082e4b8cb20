"""The demo's own logic, on the CPU (the README's first command runs it)."""

import io

import pytest
import torch

from offload_runtime.demo import choose_device_and_codec, run_demo
from offload_runtime.errors import BudgetError, UsageError


def test_device_choice_says_why():
    dev, codec, why = choose_device_and_codec("cpu")
    assert (dev.type, codec) == ("cpu", "zstd") and "device=cpu" in why
    if not torch.cuda.is_available():
        dev, codec, why = choose_device_and_codec(None)
        assert (dev.type, codec) == ("cpu", "zstd") and "CUDA is not available" in why


def test_demo_runs_on_cpu_and_answers_identically(tmp_path):
    out = io.StringIO()
    result = run_demo(device="cpu", max_new_tokens=12, workdir=tmp_path, stream=out)
    report = out.getvalue()
    assert result.identical, report
    assert result.reference_text and "Paris" in result.reference_text
    assert result.budget_gb < result.model_bytes / 2**30  # the streamed run had less than the model
    assert "Identical: yes" in report and "Plan:" in report and "tok/s" in report and "Peak RSS" in report
    assert "On the CPU streaming is slower than the unoffloaded run" in report
    assert "it includes the unoffloaded reference model" in report
    assert " MB" not in report and " GB" not in report  # MiB and GiB, like the plan and the progress bars
    assert list(tmp_path.iterdir()) == []  # the container lived in a temporary folder


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"budget_gb": 0}, "budget_gb must be a positive number"),
        ({"budget_gb": float("nan")}, "budget_gb must be a positive number"),
        ({"max_new_tokens": 0}, "max_new_tokens must be an integer of 1 or more"),
        ({"device": "gpu"}, "is not a device"),
    ],
)
def test_demo_refuses_bad_arguments_before_loading(kwargs, error, monkeypatch):
    monkeypatch.setattr("offload_runtime.packaged.load_smollm2", _must_not_run)
    with pytest.raises(UsageError, match=error):
        run_demo(**kwargs, stream=io.StringIO())


def test_demo_budget_below_the_minimum_is_refused_before_packing(monkeypatch, smollm2):
    monkeypatch.setattr("offload_runtime.packaged.load_smollm2", lambda dtype: smollm2)
    monkeypatch.setattr("offload_runtime.pack", _must_not_run)
    with pytest.raises(BudgetError, match="below the minimum working set"):
        run_demo(budget_gb=0.001, device="cpu", stream=io.StringIO())


def _must_not_run(*args, **kwargs):
    raise AssertionError("the demo started work before refusing its arguments")
