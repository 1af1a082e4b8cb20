"""The pinned host ring's protocol (``scheduler/host_ring.py``) on the CPU, with recording fake events: a read
into a buffer waits for the last copy out of it, buffers are taken in turn, nothing waits before a copy."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from offload_runtime.errors import PlanError
from offload_runtime.scheduler.host_ring import HostReadRing


class FakeEvent:
    log: ClassVar[list[tuple[str, int, object]]] = []

    def __init__(self) -> None:
        self.id = len([e for e in self.log if e[0] == "new"])
        self.log.append(("new", self.id, None))

    def record(self, stream: object) -> None:
        self.log.append(("record", self.id, stream))

    def synchronize(self) -> None:
        self.log.append(("synchronize", self.id, None))


def _read(name: str, out: torch.Tensor) -> torch.Tensor:
    out[0] = int(name)
    return out[:1]


@pytest.fixture
def ring() -> HostReadRing:
    FakeEvent.log = []
    return HostReadRing(2, 8, pinned=False, event=FakeEvent)


def test_buffers_are_taken_in_turn_and_a_read_waits_only_for_the_last_copy_out_of_its_buffer(ring):
    got = [ring.read(str(n), _read) for n in range(5)]
    assert [k for _, k in got] == [0, 1, 0, 1, 0]
    assert FakeEvent.log == []  # nothing copied yet, nothing to wait for
    payload, k = ring.read("7", _read)
    assert payload.data_ptr() == ring.buffers[k].data_ptr() and int(payload[0]) == 7
    ring.copied(k, "copy stream")  # k == 1
    assert FakeEvent.log == [("new", 0, None), ("record", 0, "copy stream")]
    ring.read("8", _read)  # buffer 0: no copy out of it yet
    assert FakeEvent.log[-1] == ("record", 0, "copy stream")
    _, k = ring.read("9", _read)  # buffer 1 again: waits for its copy first
    assert k == 1 and FakeEvent.log[-1] == ("synchronize", 0, None)


def test_a_buffer_keeps_one_event_recorded_again_at_each_copy(ring):
    for n in range(4):
        _, k = ring.read(str(n), _read)
        ring.copied(k, n)
    assert [e for e in FakeEvent.log if e[0] == "new"] == [("new", 0, None), ("new", 1, None)]
    assert [e[2] for e in FakeEvent.log if e[0] == "record"] == [0, 1, 2, 3]


def test_a_ring_without_buffers_refuses_to_read():
    ring = HostReadRing(0, 8, pinned=False, event=FakeEvent)
    assert not ring
    with pytest.raises(PlanError, match="no host ring buffer") as info:
        ring.read("layer.0", _read)
    assert info.value.group == "layer.0"
