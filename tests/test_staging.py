"""Copy-ahead bookkeeping (scheduler.staging), replayed on the CPU as the CUDA loader drives it.

The loader, at each load of a group in execution order: takes the buffer ``for_load`` gives (enqueueing
the copy if it was not copied ahead), enqueues the decode, ``consume``s the buffer, then enqueues the
``copies_ahead``. The replay records those operations as a timeline and checks what the events guarantee
on the GPU only if the host assigns buffers correctly: every decode reads the payload last copied into its
buffer, which is its own group's.
"""

from __future__ import annotations

import random

import pytest

from offload_runtime.scheduler.order import ExecutionOrder
from offload_runtime.scheduler.staging import StagingRing


def replay(passes: list[list[str]], host: set[str], nbuffers: int) -> list[tuple[str, str, int, bool]]:
    """Timeline of (op, group, buffer, copied_ahead) for loads following ``passes``."""
    in_order = sorted(host, key=lambda g: int(g[1:]))
    ring = StagingRing({g: j % nbuffers for j, g in enumerate(in_order)}, nbuffers)
    order = ExecutionOrder(list(passes[0]))
    timeline = []
    for sequence in passes:
        order.begin_pass()
        for group in sequence:
            order.visit(group, 1)
            if group in host:
                k, copy_now = ring.for_load(group)
                if copy_now:
                    timeline.append(("copy", group, k, False))
                timeline.append(("decode", group, k, False))
                ring.consume(k)
            for ahead, k in ring.copies_ahead(order.following(group, nbuffers, host.__contains__)):
                timeline.append(("copy", ahead, k, True))
        order.end_pass()
    return timeline


def assert_every_decode_reads_its_own_copy(timeline) -> None:
    last_copy: dict[int, str] = {}
    for op, group, k, _ in timeline:
        if op == "copy":
            last_copy[k] = group
        else:
            assert last_copy.get(k) == group, f"{group} decoded from buffer {k} holding {last_copy.get(k)}"


@pytest.mark.parametrize("nbuffers", [1, 2, 3])
@pytest.mark.parametrize("host_every", [1, 2, 4, 7])
def test_steady_state_copies_every_host_payload_ahead(nbuffers, host_every):
    groups = [f"g{i}" for i in range(20)]
    host = {g for i, g in enumerate(groups) if i % host_every == 0}
    timeline = replay([groups] * 4, host, nbuffers)
    assert_every_decode_reads_its_own_copy(timeline)
    decodes = [t for t in timeline if t[0] == "decode"]
    assert len(decodes) == 4 * len(host)
    copies_now = [t for t in timeline if t[0] == "copy" and not t[3]]
    assert len(copies_now) == 1  # only the very first load waits for its copy; the rest were copied ahead
    # one copy per decode: nothing copied ahead in vain while the order holds
    assert sum(t[0] == "copy" for t in timeline) <= len(decodes) + nbuffers


@pytest.mark.parametrize("seed", range(20))
def test_changing_orders_never_decode_a_stale_buffer(seed):
    rng = random.Random(seed)
    groups = [f"g{i}" for i in range(rng.randint(2, 12))]
    host = {g for g in groups if rng.random() < 0.6}
    passes = []
    for _ in range(8):
        sequence = groups[:] if rng.random() < 0.5 else rng.sample(groups, len(groups))
        sequence += rng.choices(groups, k=rng.randint(0, 3))  # repeats, e.g. a tied embedding
        passes.append(sequence)
    timeline = replay(passes, host, rng.randint(1, 3))
    assert_every_decode_reads_its_own_copy(timeline)


def test_each_group_uses_its_home_buffer_and_copies_stay_in_order():
    ring = StagingRing({"a": 0, "b": 1, "c": 0}, 2)
    assert ring.copies_ahead(["a", "b", "c"]) == [("a", 0), ("b", 1)]  # "c" waits for "a" to be consumed
    assert ring.for_load("a") == (0, False)
    ring.consume(0)
    assert ring.copies_ahead(["b", "c", "a"]) == [("c", 0)]
    # an order change: "a" is needed now while its buffer holds "c" -> "c" is abandoned, "a" copied now
    assert ring.for_load("a") == (0, True)
    assert ring.holder == ["a", "b"]
