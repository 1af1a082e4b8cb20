"""The demo's own logic, on the CPU (the README's first command runs it)."""

import io

import torch

from offload_runtime.demo import choose_device_and_codec, run_demo


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
    assert list(tmp_path.iterdir()) == []  # the container lived in a temporary folder
