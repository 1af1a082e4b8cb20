"""Slot/event protocol of the engine, on the CPU, with a fake source of groups whose bytes identify them.

Every test runs in both engine modes: loads on the prefetch thread, and inline on the compute thread (the
mode CUDA uses when no load blocks the host).

Every group ``i`` holds one int64 tensor filled with ``i + 1``; a fake "forward" acquires the group, checks
its view holds ``i + 1`` before *and* after yielding to the prefetch thread, then releases it. An
instrumented loader also checks, at each write into a slot, that no forward is using that slot.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import torch
from memory_source import MemorySource

from offload_runtime.errors import OffloadError
from offload_runtime.native import GroupLayout
from offload_runtime.scheduler.runtime import build_runtime

NUMEL = 64


def fake_source(ngroups: int, sizes: list[int] | None = None) -> MemorySource:
    entries = []
    for i in range(ngroups):
        numel = sizes[i] if sizes else NUMEL
        tensor = torch.full((numel,), i + 1, dtype=torch.int64)
        layout = GroupLayout.from_tensors([(f"g{i}.w", tensor)])
        entries.append(MemorySource.encode(f"g{i}", layout, layout.pack({f"g{i}.w": tensor})))
    return MemorySource(entries)


class Instrumented:
    """Wraps a runtime: fake forwards that verify slot contents, and a loader that checks slot writes."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.engine = runtime.engine
        self.violations: list[str] = []
        self.in_use: dict[int, int] = {}  # slot -> number of forwards using it
        self.lock = threading.Lock()
        loader = self.engine.loader
        original = loader.load

        def load(name, slot, wait_release):
            with self.lock:
                if self.in_use.get(slot.index):
                    self.violations.append(f"{name} written into slot {slot.index} while in use")
            original(name, slot, wait_release)

        loader.load = load

    def forward(self, group: str, spin: int = 0) -> None:
        expected = int(group[1:]) + 1
        self.engine.acquire(group)
        slot = self.runtime.plan.placement(group).slot
        with self.lock:
            self.in_use[slot] = self.in_use.get(slot, 0) + 1
        view = self.runtime.views[group][f"{group}.w"]
        try:
            if not bool((view == expected).all()):
                self.violations.append(f"{group} read {view[0].item()} before use, expected {expected}")
            for _ in range(spin):
                time.sleep(0)  # let the prefetch thread run while this group is in use
            if not bool((view == expected).all()):
                self.violations.append(f"{group} overwritten during use: {view[0].item()}")
        finally:
            with self.lock:
                self.in_use[slot] -= 1
            self.engine.release(group)

    def run_pass(self, order: list[str], spin: int = 0) -> None:
        self.engine.begin_pass()
        for group in order:
            self.forward(group, spin)
        self.engine.end_pass()


@pytest.fixture(params=[True, False], ids=["threaded", "inline"], autouse=True)
def threaded(request, monkeypatch):
    """Every runtime built in a test uses this engine mode."""
    original = build_runtime

    def build(*args, **kwargs):
        kwargs.setdefault("threaded", request.param)
        runtime = original(*args, **kwargs)
        assert runtime.engine.threaded is request.param
        return runtime

    monkeypatch.setitem(globals(), "build_runtime", build)
    return request.param


def runtime_for(ngroups: int, prefetch: int):
    source = fake_source(ngroups)
    decoded = source.groups[0].decoded_size
    nslots = min(prefetch + 1, ngroups)
    every = [g.name for g in source.groups]
    return build_runtime(
        source, nslots * decoded, device=torch.device("cpu"), prefetch=prefetch, force_streamed=every
    )


@pytest.mark.parametrize("prefetch", [1, 2, 3, 8])
@pytest.mark.parametrize("ngroups", [1, 2, 3, 5, 7])
def test_slots_never_overwritten_in_use(ngroups, prefetch):
    runtime = runtime_for(ngroups, prefetch)
    try:
        assert runtime.plan.nslots == min(prefetch + 1, ngroups)
        assert all(p.streamed for p in runtime.plan.groups)
        # static assignment, also when ngroups is not a multiple of the number of slots
        assert [p.slot for p in runtime.plan.groups] == [i % runtime.plan.nslots for i in range(ngroups)]
        harness = Instrumented(runtime)
        names = [f"g{i}" for i in range(ngroups)]
        for _ in range(4):
            harness.run_pass(names, spin=3)
        assert harness.violations == []
        # only the very first load is on demand: every later one is prefetched, including the wrap-around
        # from the last group of a pass to the first of the next when both share a slot (deferred prefetch)
        assert runtime.stats.demand_loads == 1
        if runtime.plan.nslots == ngroups:
            assert runtime.stats.loads == ngroups  # every group keeps its own slot: loaded once
    finally:
        runtime.close()


@pytest.mark.parametrize("prefetch", [1, 2])
def test_out_of_order_and_repeated_calls(prefetch):
    runtime = runtime_for(5, prefetch)
    try:
        harness = Instrumented(runtime)
        # a module called twice, a tied group reused at the end, a reversed pass, a random walk
        passes = [
            ["g0", "g1", "g1", "g2", "g3", "g4", "g0"],
            ["g4", "g3", "g2", "g1", "g0"],
            ["g0", "g2", "g4", "g1", "g3", "g0", "g0"],
        ]
        for order in passes * 2:
            harness.run_pass(order, spin=2)
        generator = torch.Generator().manual_seed(0)
        walk = [f"g{int(i)}" for i in torch.randint(0, 5, (60,), generator=generator)]
        harness.run_pass(walk, spin=1)
        assert harness.violations == []
        # the order is learned: after a pass, prefetching follows what the forward did
        harness.run_pass(passes[1])
        assert runtime.engine.order.sequence == passes[1]
    finally:
        runtime.close()


def test_order_change_is_followed_without_demand_loads():
    runtime = runtime_for(6, 1)
    try:
        harness = Instrumented(runtime)
        order = ["g0", "g3", "g1", "g4", "g2", "g5"]
        harness.run_pass(order)
        before = runtime.stats.demand_loads
        for _ in range(3):
            harness.run_pass(order)
        assert harness.violations == []
        # the first pass followed the guess and learned the order: later passes prefetch every group in time
        assert before > 0
        assert runtime.stats.demand_loads - before == 0
    finally:
        runtime.close()


def test_thread_stress():
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for ngroups, prefetch in [(3, 1), (5, 2), (7, 3), (4, 8)]:
            runtime = runtime_for(ngroups, prefetch)
            try:
                harness = Instrumented(runtime)
                names = [f"g{i}" for i in range(ngroups)]
                for k in range(15):
                    harness.run_pass(names if k % 3 else names[::-1] + names[:1], spin=1)
                assert harness.violations == []
            finally:
                runtime.close()
    finally:
        sys.setswitchinterval(previous)


def test_resident_small_groups_and_mixed_sizes():
    # one big group and tiny ones: the tiny ones (< 1%) stay resident and are never loaded by the engine
    source = fake_source(5, sizes=[16, 4096, 4096, 4096, 16])
    big = source.groups[1].decoded_size
    runtime = build_runtime(source, 2 * big + 4096, device=torch.device("cpu"), prefetch=1)
    try:
        tiers = {p.name: p.streamed for p in runtime.plan.groups}
        assert tiers == {"g0": False, "g1": True, "g2": True, "g3": True, "g4": False}
        assert torch.equal(runtime.views["g0"]["g0.w"], torch.full((16,), 1, dtype=torch.int64))
        harness = Instrumented(runtime)
        for _ in range(3):
            harness.engine.begin_pass()
            for g in ["g1", "g2", "g3"]:
                harness.forward(g)
            harness.engine.end_pass()
        assert harness.violations == []
    finally:
        runtime.close()


def test_load_error_reaches_the_forward_and_the_engine_recovers():
    source = fake_source(3)
    runtime = build_runtime(source, 2 * source.groups[0].decoded_size, device=torch.device("cpu"), prefetch=1)
    failures = {"g1": 2}  # the prefetch and the on-demand retry both fail
    original = runtime.engine.loader.load

    def flaky(name, slot, wait_release):
        if failures.get(name):
            failures[name] -= 1
            raise OffloadError("injected read failure", group=name)
        original(name, slot, wait_release)

    runtime.engine.loader.load = flaky
    try:
        harness = Instrumented(runtime)
        harness.forward("g0")
        with pytest.raises(OffloadError, match="injected read failure"):
            harness.forward("g1")
        failures.clear()
        harness.run_pass(["g0", "g1", "g2"])  # a new load is enqueued for the failed group
        assert harness.violations == []
        assert all(not t for t in runtime.engine._held.values())  # no pin leaked by the failure
    finally:
        runtime.close()


def test_close_fails_waiting_forwards_instead_of_hanging():
    runtime = runtime_for(3, 1)
    runtime.close()
    with pytest.raises(OffloadError, match="closed"):
        runtime.engine.acquire("g0")


@pytest.mark.parametrize("threaded", [False], ids=["inline"], indirect=True)
def test_a_group_nested_in_another_on_the_same_slot_is_an_error_not_a_hang(threaded):
    # (a prefetch thread would wait for the enclosing forward; callers keep such groups resident)
    runtime = runtime_for(3, 1)  # g0 and g2 share slot 0
    try:
        runtime.engine.acquire("g0")
        with pytest.raises(OffloadError, match="slot 0 is held by a forward still running") as info:
            runtime.engine.acquire("g2")
        assert info.value.group == "g2"
        runtime.engine.release("g0")
        harness = Instrumented(runtime)
        harness.run_pass(["g0", "g1", "g2"])  # the queued load ran once the slot was released
        assert harness.violations == []
        assert all(not t for t in runtime.engine._held.values())
    finally:
        runtime.close()


def test_failed_check_of_a_load_is_raised_in_its_forward_and_the_group_reloads():
    # the CUDA loader waits for a decode's GPU check in wait_ready (the acquiring forward) and raises there
    runtime = runtime_for(3, 1)
    loader = runtime.engine.loader
    original = loader.wait_ready
    bad = {"g1": 1}

    def wait_ready(slot):
        if bad.get(slot.loaded.group):
            bad[slot.loaded.group] -= 1
            raise OffloadError("injected decode check failure", group=slot.loaded.group, chunk=3)
        original(slot)

    loader.wait_ready = wait_ready
    try:
        harness = Instrumented(runtime)
        harness.forward("g0")
        with pytest.raises(OffloadError, match="injected decode check failure") as info:
            harness.forward("g1")
        assert (info.value.group, info.value.chunk) == ("g1", 3)
        assert all(not t for t in runtime.engine._held.values())  # the failed forward holds no pin
        loads = runtime.stats.loads
        harness.run_pass(["g0", "g1", "g2"])  # g1 is loaded again rather than used as it was
        assert runtime.stats.loads > loads
        assert harness.violations == []
    finally:
        runtime.close()
