"""offload_runtime: run LLMs larger than GPU memory by streaming compressed layers.

The public API is imported lazily so that ``import offload_runtime.native`` (or ``.errors``) does not
pull in the scheduler, transformers and friends, and so the subpackages can import ``offload_runtime``
without import cycles.
"""

from __future__ import annotations

import importlib
from typing import Any

from offload_runtime._version import __version__

# public name -> module that defines it
_LAZY = {
    "pack": "offload_runtime.loaders.pack",
    "dispatch_compressed": "offload_runtime.api",
    "load_compressed": "offload_runtime.api",
    "remove_offload": "offload_runtime.api",
    "load_tokenizer": "offload_runtime.api",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'offload_runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
