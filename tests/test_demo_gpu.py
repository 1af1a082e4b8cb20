"""The demo's path on CUDA with nvCOMP's ans codec (the README's first command on a GPU machine)."""

import io

import pytest

from offload_runtime.demo import choose_device_and_codec, run_demo

pytestmark = pytest.mark.gpu


def test_demo_runs_on_cuda_with_ans(tmp_path):
    dev, codec, why = choose_device_and_codec(None)
    assert (dev.type, codec) == ("cuda", "ans") and "nvCOMP" in why
    try:
        from offload_runtime.packaged import smollm2_dir

        smollm2_dir()
    except ModuleNotFoundError as exc:
        pytest.skip(f"SmolLM2 is not installed here: {exc}")
    out = io.StringIO()
    result = run_demo(max_new_tokens=16, workdir=tmp_path, stream=out)
    report = out.getvalue()
    assert result.device.startswith("cuda") and result.codec == "ans"
    assert result.identical, report
    assert "Paris" in result.reference_text
    assert result.peak_weight_bytes is not None and result.peak_weight_bytes <= result.budget_gb * 2**30
