"""An in-memory group source (tests only): the :class:`~offload_runtime.loaders.source.GroupSource` protocol
served from RAM.

:class:`MemorySource` encodes a model's groups with a codec and serves them like a
:class:`~offload_runtime.loaders.ContainerReader` does from a file. It lets the scheduler run, and be
tested, without a container on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from offload_runtime.loaders.verify import VerifyPolicy
from offload_runtime.native import Chunk, GroupLayout, get_codec


@dataclass
class MemoryEntry:
    """The fields of a container's group entry that the scheduler reads."""

    name: str
    kind: str
    users: list[str]
    aliases: dict[str, str]
    codec: str
    params: dict
    layout: GroupLayout
    stored_size: int
    chunks: list[Chunk]
    payload: np.ndarray = field(repr=False)
    stored_layout: GroupLayout | None = None

    @property
    def decoded_size(self) -> int:
        return self.layout.size


class MemorySource:
    """Groups encoded in RAM.

    Args:
        entries (`list[MemoryEntry]`): the groups, in execution order.
    """

    path = None

    def __init__(self, entries: list[MemoryEntry], verify: str = "once") -> None:
        self.policy = VerifyPolicy(verify)
        self.groups = entries
        self._by_name = {e.name: e for e in entries}
        self.reads: list[str] = []  # every payload access, in order (tests inspect it)

    @classmethod
    def from_model(cls, model: nn.Module, codec: str = "raw") -> MemorySource:
        """Encode every group of ``model`` (found by ``find_groups``) with ``codec``."""
        from offload_runtime.loaders.groups import find_groups

        state = model.state_dict(keep_vars=True)
        entries = []
        for spec in find_groups(model):
            layout = GroupLayout.from_tensors((name, state[name]) for name in spec.tensors)
            entries.append(
                cls.encode(spec.name, layout, layout.pack(state), codec, spec.kind, spec.users, spec.aliases)
            )
        return cls(entries)

    @staticmethod
    def encode(
        name: str,
        layout: GroupLayout,
        data: np.ndarray,
        codec: str = "raw",
        kind: str = "block",
        users: list[str] | None = None,
        aliases: dict[str, str] | None = None,
    ) -> MemoryEntry:
        encoded = get_codec(codec).encode(layout, data)
        payload = np.ascontiguousarray(encoded.payload).copy()
        return MemoryEntry(
            name,
            kind,
            list(users or [name]),
            dict(aliases or {}),
            codec,
            dict(encoded.params),
            layout,
            int(payload.size),
            list(encoded.chunks),
            payload,
            encoded.stored_layout,
        )

    def group(self, name: str) -> MemoryEntry:
        return self._by_name[name]

    def payload(self, name: str) -> memoryview:
        self.reads.append(name)
        return memoryview(self._by_name[name].payload)

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        entry = self._by_name[name]
        out[: entry.stored_size].copy_(torch.from_numpy(entry.payload))
        self.reads.append(name)
        return out[: entry.stored_size]

    def decode_cpu(self, name: str, out: torch.Tensor, staging: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``name`` into ``out``; ``staging`` (reused payload buffer) is accepted and unneeded here.

        Payloads live in RAM (no file that could be truncated), so decoding from them directly is safe.
        """
        entry = self._by_name[name]
        get_codec(entry.codec).decode_cpu(self.payload(name), entry.chunks, entry.params, entry.layout, out)
        return out[: entry.layout.size]

    def close(self) -> None:
        """Nothing to release; present for the reader interface."""
