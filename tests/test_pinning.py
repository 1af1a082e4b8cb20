"""``scheduler/pinning.py``: a CUDA runtime asks torch to pin host memory by registering it, unless the user's
``PYTORCH_CUDA_ALLOC_CONF`` says how to pin; a CPU runtime never touches torch's allocator settings."""

from __future__ import annotations

import pytest
import torch

from offload_runtime.scheduler import pinning
from offload_runtime.scheduler.pinning import ALLOC_CONF_ENV, PINNED_BY_REGISTERING, pin_by_registering


@pytest.mark.parametrize(
    ("conf", "applied"),
    [
        (None, True),
        ("expandable_segments:True", True),  # other options: the user said nothing about pinning
        ("pinned_use_background_threads:True", False),  # the user's pinning wins
    ],
)
def test_pinning_by_registering_unless_told_how_to_pin(conf, applied):
    calls = []
    environ = {} if conf is None else {ALLOC_CONF_ENV: conf}
    assert pin_by_registering(environ, setter=calls.append) is applied
    assert calls == ([PINNED_BY_REGISTERING] if applied else [])


def test_torch_has_the_run_time_setter():
    assert pinning._allocator_setter() is not None  # else the setting would silently never apply


def test_a_cpu_dispatch_leaves_the_allocator_settings_alone(monkeypatch):
    from offload_runtime import dispatch_compressed, remove_offload
    from offload_runtime.tiny import tiny_model

    calls = []
    monkeypatch.setattr(pinning, "_allocator_setter", lambda: calls.append)
    model = tiny_model("llama")
    dispatch_compressed(model, budget_gb=0.001, device="cpu")
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
    remove_offload(model)
    assert calls == []
