"""Execution order of the streamed groups, learned from the forward passes themselves.

The first guess is group order (module registration order, which is execution order for HF models). Every
pass (root module forward) records the groups in the order their pre-hooks fire, repeats included (a tied
embedding is used again by the LM head at the end); at the end of a pass the recording becomes the order
used for prefetching, so a model whose order changes is followed after one pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class ExecutionOrder:
    """Where the forward is in the execution order, and which groups come next.

    Attributes:
        sequence: the order prefetching follows (group names, repeats allowed).
        cursor: index in ``sequence`` of the next expected group.
        recording: the groups seen in the current pass, in order.
    """

    sequence: list[str]
    cursor: int = 0
    recording: list[str] = field(default_factory=list)
    passes: int = 0

    def begin_pass(self) -> None:
        self.cursor = 0
        self.recording = []

    def end_pass(self) -> None:
        if self.recording and self.recording != self.sequence:
            self.sequence = list(self.recording)
        self.passes += 1
        self.recording = []
        self.cursor = 0

    def visit(self, group: str, lookahead: int) -> list[str]:
        """Record that ``group`` runs now; return up to ``lookahead`` distinct groups expected next.

        The position of ``group`` is found from the cursor onwards, else from the start (a new pass that
        was not announced, e.g. a submodule called directly). The upcoming groups wrap around into the next
        pass, so the start of the next forward (next token) is prefetched during the end of this one.
        """
        self.recording.append(group)
        position = self._position(group)
        if position is None:
            return []
        self.cursor = position + 1
        return self._after(position, lookahead)

    def following(self, group: str, count: int, accept: Callable[[str], bool]) -> list[str]:
        """Up to ``count`` distinct groups for which ``accept`` holds, expected after ``group`` (wrapping
        into the next pass); read-only, for loaders that work further ahead than the slots (copy-ahead)."""
        position = self._position(group)
        return [] if position is None else self._after(position, count, accept)

    def _position(self, group: str) -> int | None:
        position = _find(self.sequence, group, self.cursor)
        return _find(self.sequence, group, 0) if position is None else position

    def _after(self, position: int, count: int, accept: Callable[[str], bool] | None = None) -> list[str]:
        seq = self.sequence
        group = seq[position]
        upcoming: list[str] = []
        if count <= 0:
            return upcoming
        for step in range(1, len(seq) + 1):
            name = seq[(position + step) % len(seq)]
            if name != group and name not in upcoming and (accept is None or accept(name)):
                upcoming.append(name)
                if len(upcoming) == count:
                    break
        return upcoming


def _find(seq: Sequence[str], item: str, start: int) -> int | None:
    for i in range(start, len(seq)):
        if seq[i] == item:
            return i
    return None
