"""What this machine can decode on: CUDA and nvCOMP detection, done once and cached."""

from __future__ import annotations

import functools
from types import ModuleType

import torch

NVCOMP_EXTRA_HINT = (
    "install the GPU codecs with `pip install 'offload-runtime[cu12]'` (CUDA 12) or "
    "`pip install 'offload-runtime[cu13]'` (CUDA 13)"
)


def cuda_available() -> bool:
    """True when torch sees a CUDA device."""
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=1)
def nvcomp_module() -> ModuleType | None:
    """The ``nvidia.nvcomp`` module, or ``None`` when it is not installed or fails to load."""
    try:
        from nvidia import nvcomp
    except (ImportError, OSError):
        return None
    return nvcomp


def gpu_codecs_unavailable_reason() -> str | None:
    """Why GPU codecs cannot run here, or ``None`` when CUDA and nvCOMP are both present."""
    if not cuda_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if nvcomp_module() is None:
        return f"nvCOMP is not installed: {NVCOMP_EXTRA_HINT}"
    return None
