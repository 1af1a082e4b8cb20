"""What the runtime reads groups from: the :class:`GroupSource` protocol.

A group source serves the groups of one model as a container does: their index entries (layout, codec,
chunk table), their stored payloads copied into a caller's buffer, and a CPU decode. Two implement it:
:class:`~offload_runtime.loaders.reader.ContainerReader` (a file) and
:class:`~offload_runtime.loaders.synthetic_source.SyntheticSource` (groups regenerated on demand, for models
larger than any disk). Both share their :class:`~offload_runtime.loaders.verify.VerifyPolicy` with the
loaders that decode from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from offload_runtime.loaders.format import GroupEntry
from offload_runtime.loaders.verify import VerifyPolicy


@runtime_checkable
class GroupSource(Protocol):
    """The groups of one model, in execution order.

    Attributes:
        path: the file the groups come from (named in errors), or ``None``.
        policy: when CRC-32s are checked (shared with the loaders).
    """

    path: Path | None
    policy: VerifyPolicy

    @property
    def groups(self) -> Sequence[GroupEntry]:
        """Every group's index entry, in execution order."""
        ...

    def group(self, name: str) -> GroupEntry:
        """The entry of group ``name`` (``KeyError`` for an unknown one)."""
        ...

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Copy ``name``'s payload into ``out`` (contiguous 1-D uint8 CPU tensor of >= ``stored_size``
        bytes), checking its chunk CRC-32s per the policy; returns ``out[:stored_size]``."""
        ...

    def decode_cpu(self, name: str, out: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``name`` on the CPU into ``out`` (uint8, >= ``layout.size`` bytes), reading the payload
        into ``staging`` when given (no allocation); returns ``out[:layout.size]``."""
        ...

    def close(self) -> None:
        """Release what the source holds (files, buffers)."""
        ...
