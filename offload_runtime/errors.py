"""Typed errors raised by offload_runtime.

Every error carries structured fields (``file``, ``group``, ``chunk``, ``expected``, ``actual``, ``hint``)
so callers can react programmatically, and renders a message that names each field that is set, so a
log line alone says where the problem is and how to fix it.

Hierarchy::

    OffloadError
    ├── CheckpointError
    │   ├── CorruptCheckpointError     bytes on disk are not what the index promises
    │   └── CheckpointMismatchError    a valid container that does not fit the model it is attached to
    ├── BudgetError                    the memory budget cannot hold the minimum working set
    ├── DeviceMemoryError              the device ran out of memory in a forward (also torch.OutOfMemoryError)
    ├── ExpertRoutingError             an experts module's call does not say which experts it routes to
    ├── CodecUnavailableError          a codec cannot run here (no CUDA, no nvCOMP, ...)
    ├── CodecCallError                 a codec library call failed (nvCOMP status; also a RuntimeError)
    ├── PlanError                      the runtime's allocations exceed its plan (a bug; also a RuntimeError)
    └── UsageError                     a bad argument, refused before any work (also ValueError)
        └── MissingFileError           an input path that does not exist (also FileNotFoundError)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "BudgetError",
    "CheckpointError",
    "CheckpointMismatchError",
    "CodecCallError",
    "CodecUnavailableError",
    "CorruptCheckpointError",
    "DeviceMemoryError",
    "ExpertRoutingError",
    "MissingFileError",
    "OffloadError",
    "PlanError",
    "UsageError",
]


class OffloadError(Exception):
    """Base class of every error offload_runtime raises on purpose.

    Args:
        summary (`str`): one sentence saying what went wrong.
        file (`str` or `os.PathLike`, *optional*): the container or checkpoint involved.
        group (`str`, *optional*): the group (transformer block, embeddings, ...) or tensor involved.
        chunk (`int`, *optional*): the index of the chunk inside the group.
        expected (*optional*): what the index, model or budget required.
        actual (*optional*): what was found instead.
        hint (`str`, *optional*): how to fix it.
    """

    def __init__(
        self,
        summary: str,
        *,
        file: str | os.PathLike | None = None,
        group: str | None = None,
        chunk: int | None = None,
        expected: Any = None,
        actual: Any = None,
        hint: str | None = None,
    ) -> None:
        self.summary = summary
        self.file = os.fspath(file) if file is not None else None
        self.group = group
        self.chunk = chunk
        self.expected = expected
        self.actual = actual
        self.hint = hint
        super().__init__(self._render())

    def _fields(self) -> list[tuple[str, Any]]:
        return [
            ("file", self.file),
            ("group", self.group),
            ("chunk", self.chunk),
            ("expected", self.expected),
            ("actual", self.actual),
        ]

    def _render(self) -> str:
        parts = [
            f"{name}={value!r}" if name == "file" else f"{name}={value}"
            for name, value in self._fields()
            if value is not None
        ]
        message = self.summary
        if parts:
            message += " [" + ", ".join(parts) + "]"
        if self.hint:
            message += f". {self.hint}"
        return message

    def __reduce__(self):  # keep the fields when an error crosses a process boundary
        state = {k: getattr(self, k) for k in ("file", "group", "chunk", "expected", "actual", "hint")}
        return (_rebuild, (type(self), self.summary, state, self._extra_state()))

    def _extra_state(self) -> dict[str, Any]:
        return {}


def _rebuild(cls: type[OffloadError], summary: str, state: dict[str, Any], extra: dict[str, Any]):
    return cls(summary, **state, **extra)


class CheckpointError(OffloadError):
    """A checkpoint or container cannot be used."""


class CorruptCheckpointError(CheckpointError):
    """The bytes of a container disagree with its own index (truncated, overlapping, bad checksum, ...)."""


class CheckpointMismatchError(CheckpointError):
    """A valid container does not fit the model: every differing tensor is listed in ``mismatches``.

    Args:
        mismatches (`Sequence[str]`): one line per tensor that is missing, unexpected or of another
            shape or dtype. All are collected before raising, so one error tells the whole story.
    """

    def __init__(self, summary: str, *, mismatches: Sequence[str] = (), **fields: Any) -> None:
        self.mismatches = list(mismatches)
        super().__init__(summary, **fields)

    def _render(self) -> str:
        message = super()._render()
        if self.mismatches:
            message += "\n" + "\n".join(f"  - {line}" for line in self.mismatches)
        return message

    def _extra_state(self) -> dict[str, Any]:
        return {"mismatches": self.mismatches}


class BudgetError(OffloadError):
    """The memory budget is below the minimum working set.

    ``expected`` holds the minimum, ``actual`` the budget given.
    """


class DeviceMemoryError(OffloadError, torch.OutOfMemoryError):
    """The device ran out of memory during the forward of an offloaded model.

    Raised in place of ``torch.OutOfMemoryError`` (and still one, so existing handlers catch it) once the
    runtime has released the group's slot: the model stays usable, e.g. with a shorter input or more free
    memory. ``group`` is the group whose forward (or load) failed, ``expected`` the bytes the runtime holds
    for weights.
    """


class ExpertRoutingError(OffloadError):
    """An experts module was called without exactly one integer tensor of expert indices among its
    arguments, so the runtime cannot tell which experts to make ready (``group`` names the module)."""


class CodecUnavailableError(OffloadError):
    """A codec cannot run on this machine.

    Args:
        codec (`str`): the codec asked for.
        missing (`str`): what is missing (``"CUDA"``, ``"nvidia-nvcomp-cu12 or -cu13"``, ...).
        alternative (`str`, *optional*): a codec that would work here.
    """

    def __init__(
        self,
        summary: str,
        *,
        codec: str,
        missing: str,
        alternative: str | None = None,
        **fields: Any,
    ) -> None:
        self.codec = codec
        self.missing = missing
        self.alternative = alternative
        super().__init__(summary, **fields)

    def _fields(self) -> list[tuple[str, Any]]:
        return [
            ("codec", self.codec),
            ("missing", self.missing),
            *super()._fields(),
            ("use instead", self.alternative),
        ]

    def _extra_state(self) -> dict[str, Any]:
        return {"codec": self.codec, "missing": self.missing, "alternative": self.alternative}


class UsageError(OffloadError, ValueError):
    """An argument of the right type with a value that cannot work: a budget that is not a positive number,
    a device this machine does not have, an output path that would overwrite an input, ...

    Raised before any work, with the fix in ``hint``. Also a ``ValueError``, so callers that catch that
    keep working (an argument of the wrong *type* raises ``TypeError``).
    """

    def _fields(self) -> list[tuple[str, Any]]:  # a path the summary already names is not repeated
        return [(k, v) for k, v in super()._fields() if not (k == "file" and v and v in self.summary)]


class MissingFileError(UsageError, FileNotFoundError):
    """An input file or folder does not exist, or lacks what it must hold (also a ``FileNotFoundError``).

    ``file`` (and ``filename``, as for any ``FileNotFoundError``) is the path.
    """

    def __init__(self, summary: str, **fields: Any) -> None:
        super().__init__(summary, **fields)
        self.filename = self.file

    def __str__(self) -> str:  # not OSError's "[Errno None] ..." form
        return self._render()


class CodecCallError(OffloadError, RuntimeError):
    """A codec library call failed (an nvCOMP function returned an error status)."""


class PlanError(OffloadError, RuntimeError):
    """The runtime's allocations disagree with its plan: an arena or workspace asked for more than the plan
    sized. Never caused by input; report it as a bug."""
