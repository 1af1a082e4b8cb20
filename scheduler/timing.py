"""GPU timings of copies and decodes, read without synchronising.

Each timed operation is bracketed by two events from a pool; :meth:`GpuTimer.harvest` adds the durations of
the operations the GPU has finished (``event.query``) to the stats, so the hot path never waits for the GPU
to learn how long something took. :meth:`GpuTimer.harvest` with ``wait`` collects the rest (at close).
"""

from __future__ import annotations

import collections
import threading

import torch

from offload_runtime.scheduler.stats import OffloadStats

H2D = "h2d"
DECODE = "decode"


class GpuTimer:
    """Pooled timing events; durations land in ``stats`` (``h2d_*`` or ``decode_*``) once finished."""

    def __init__(self, stats: OffloadStats) -> None:
        self.stats = stats
        self._lock = threading.Lock()  # the prefetch worker records; the compute thread harvests at pass ends
        self._pending: collections.deque[tuple[str, torch.cuda.Event, torch.cuda.Event, int]] = (
            collections.deque()
        )
        self._spare: list[torch.cuda.Event] = []

    def _event(self) -> torch.cuda.Event:
        with self._lock:
            return self._spare.pop() if self._spare else torch.cuda.Event(enable_timing=True)

    def start(self, stream: torch.cuda.Stream) -> torch.cuda.Event:
        event = self._event()
        event.record(stream)
        return event

    def end(self, kind: str, start: torch.cuda.Event, stream: torch.cuda.Stream, nbytes: int) -> None:
        end = self._event()
        end.record(stream)
        with self._lock:
            self._pending.append((kind, start, end, nbytes))

    def harvest(self, wait: bool = False) -> None:
        """Add the timings of operations the GPU has finished (all of them with ``wait``)."""
        with self._lock:
            self._harvest(wait)

    def _harvest(self, wait: bool) -> None:
        while self._pending:
            kind, start, end, nbytes = self._pending[0]
            if wait:
                end.synchronize()
            elif not end.query():
                break
            self._pending.popleft()
            seconds = start.elapsed_time(end) / 1e3
            if kind == H2D:
                self.stats.h2d_seconds += seconds
                self.stats.h2d_bytes += nbytes
            else:
                self.stats.decode_seconds += seconds
                self.stats.decode_bytes += nbytes
            self._spare += (start, end)
