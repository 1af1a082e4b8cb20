"""When checksums are checked: one policy object shared by a group source and the loaders that decode from it.

A container's chunks carry two CRC-32s: of the stored (compressed) bytes, checked before a decoder sees
them, and of the decoded bytes, checked after (on the CPU, or on the GPU by nvCOMP). Each is a *kind* of
check, and the policy decides per (kind, group) whether this read must check:

* ``"once"`` (default): the first read of each group checks; once it passed, the group is trusted;
* ``"always"``: every read checks;
* ``"never"``: nothing is checked (trusted local files).

The reader, the CPU loader and the CUDA loader ask the same object, so a group whose decoded bytes were
verified on one path is not verified again on another. Thread-safe: loads run on a prefetch thread.
"""

from __future__ import annotations

import threading

VERIFY_POLICIES = ("once", "always", "never")

PAYLOAD = "payload"  # CRC-32 of the stored (compressed) bytes
DECODED = "decoded"  # CRC-32 of the decoded bytes


class VerifyPolicy:
    """Which reads check their CRC-32s (see the module docstring).

    Args:
        mode (`str`, defaults to `"once"`): ``"once"``, ``"always"`` or ``"never"``.

    Raises:
        ValueError: an unknown mode, listing the known ones.
    """

    def __init__(self, mode: str = "once") -> None:
        if mode not in VERIFY_POLICIES:
            raise ValueError(f"verify must be one of {VERIFY_POLICIES}, got {mode!r}")
        self.mode = mode
        self._verified: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"VerifyPolicy({self.mode!r}, {len(self._verified)} checks passed)"

    def due(self, kind: str, group: str) -> bool:
        """Whether this read of ``group`` must check its ``kind`` CRC-32s."""
        if self.mode == "never":
            return False
        if self.mode == "always":
            return True
        with self._lock:
            return (kind, group) not in self._verified

    def passed(self, kind: str, group: str) -> None:
        """A check of ``kind`` on ``group`` passed: under ``"once"`` the group is trusted from now on."""
        if self.mode == "once":
            with self._lock:
                self._verified.add((kind, group))
