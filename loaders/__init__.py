"""Checkpoints in, compressed container out and back (installed as ``offload_runtime.loaders``).

The container format is described in ``FORMAT.md``; ``pack`` writes one, ``ContainerReader`` reads it.
"""

from __future__ import annotations

from offload_runtime.loaders.format import ContainerIndex, GroupEntry
from offload_runtime.loaders.load import (
    build_empty_model,
    check_compatible,
    load_model,
    load_state_dict,
    load_tokenizer,
)
from offload_runtime.loaders.pack import pack
from offload_runtime.loaders.reader import ContainerReader
from offload_runtime.loaders.writer import ContainerWriter

__all__ = [
    "ContainerIndex",
    "ContainerReader",
    "ContainerWriter",
    "GroupEntry",
    "build_empty_model",
    "check_compatible",
    "load_model",
    "load_state_dict",
    "load_tokenizer",
    "pack",
]
