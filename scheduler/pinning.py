"""How the runtime's pinned host memory is obtained: by registering ordinary memory with CUDA.

A CUDA runtime pins host memory for the payloads it keeps in RAM (tens of GB for a large model) and for
its rings and bounce buffers. torch's pinned allocator calls ``cudaHostAlloc`` by default, which took
0.46 s/GB on an H200 host; configured with ``pinned_use_cuda_host_register`` it allocates ordinary memory
and registers it (``cudaHostRegister``, its pages touched by several threads) at 0.13-0.16 s/GB, with the
same H2D rate (``bench/results/2026-11-30-h200-pinned-alloc.json``; applied at run time, by a dispatch:
``2026-12-01-h200-pinned-register-by-dispatch.txt``). For a 70 B model's 90 GB in RAM that is
about half a minute of dispatch.

So before a CUDA runtime pins anything, :func:`pin_by_registering` applies that setting to torch's
allocator, unless ``PYTORCH_CUDA_ALLOC_CONF`` already says how to pin (any ``pinned_`` option: the user's
choice wins). It is a process-wide setting of torch's and it changes only how pinned memory is obtained,
not what it is; allocations made before keep their memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch

ALLOC_CONF_ENV = "PYTORCH_CUDA_ALLOC_CONF"
PINNED_BY_REGISTERING = "pinned_use_cuda_host_register:True,pinned_num_register_threads:8"


def _allocator_setter() -> Callable[[str], None] | None:
    """torch's run-time allocator settings call (renamed in torch 2.10; None in a torch without it)."""
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:
        setter = getattr(getattr(torch.cuda, "memory", None), "_set_allocator_settings", None)
    return setter


def pin_by_registering(
    environ: Mapping[str, str] = os.environ, setter: Callable[[str], None] | None = None
) -> bool:
    """Make torch pin host memory by registering it, unless the user's settings say how to pin.

    Args:
        environ (`Mapping`, defaults to `os.environ`): where ``PYTORCH_CUDA_ALLOC_CONF`` is read.
        setter (*optional*): the call that applies allocator settings (torch's by default).

    Returns:
        `bool`: whether the setting was applied.
    """
    if "pinned_" in environ.get(ALLOC_CONF_ENV, ""):
        return False
    setter = setter or _allocator_setter()
    if setter is None:
        return False
    setter(PINNED_BY_REGISTERING)
    return True
