"""Expert cache policy: invariants on random traces (hypothesis), LRU against a reference model, LFU aging."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_runtime.scheduler.expert_cache import POLICIES, ExpertCache

# a trace: steps of (keys of the step, how many of the oldest unreleased steps to release after it)
STEPS = st.lists(
    st.tuples(st.lists(st.integers(0, 11), max_size=6, unique=True), st.integers(0, 2)), max_size=40
)


def _run(cache: ExpertCache, trace, check) -> None:
    held: list = []
    for keys, releases in trace:
        before = {k: cache.entry(k) for k in range(12) if k in cache}
        pinned_before = {k for k in range(12) if cache.pinned(k)}
        result = cache.lookup(keys)
        check(cache, keys, result, before, pinned_before)
        held.append(result.step)
        for _ in range(min(releases, len(held))):
            cache.release(held.pop(0))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(capacity=st.integers(0, 8), policy=st.sampled_from(POLICIES), trace=STEPS)
def test_invariants_on_random_traces(capacity, policy, trace):
    cache = ExpertCache(capacity, policy, aging_interval=3)
    victims, overflow = [], []  # every step's, tallied here independently of the cache's counters

    def check(cache, keys, r, before, pinned_before):
        victims.extend(r.victims)
        overflow.extend(r.overflow)
        assert len(cache) <= capacity
        assert r.hits == [k for k in keys if k in before]
        assert r.misses == [k for k in keys if k not in before]
        assert set(r.overflow) <= set(r.misses)
        assert not set(r.victims) & set(keys)  # never a key of the current step
        assert not set(r.victims) & pinned_before  # never a key an unreleased step holds
        assert set(r.victims) <= set(before) and len(set(r.victims)) == len(r.victims)
        assert len(r.victims) <= len(r.misses) - len(r.overflow)
        cached_misses = [k for k in r.misses if k not in r.overflow]
        assert all(k in cache for k in [*r.hits, *cached_misses])
        assert not any(k in cache for k in r.victims + r.overflow)
        entries = [cache.entry(k) for k in range(12) if k in cache]
        assert len(set(entries)) == len(entries) and all(0 <= e < capacity for e in entries)
        assert all(r.entries[k] == cache.entry(k) for k in [*r.hits, *cached_misses])
        assert all(r.entries[k] == before[k] for k in r.hits)  # a hit keeps its entry
        if r.overflow:  # only when nothing was free or evictable
            evictable = set(before) - pinned_before - set(keys) - set(r.victims)
            assert not evictable and len(cache) == capacity
        s = cache.stats
        assert s.requests == s.hits + s.misses

    _run(cache, trace, check)
    assert cache.stats.evictions == len(victims) and cache.stats.overflows == len(overflow)


class ReferenceLRU:
    """The textbook LRU with pinned keys: a list, oldest first."""

    def __init__(self, capacity):
        self.capacity, self.order, self.pins = capacity, [], {}

    def lookup(self, keys):
        for k in keys:
            self.pins[k] = self.pins.get(k, 0) + 1
        hits = [k for k in keys if k in self.order]
        for k in hits:
            self.order.remove(k)
            self.order.append(k)
        misses, victims, overflow = [k for k in keys if k not in self.order], [], []
        for k in misses:
            if len(self.order) < self.capacity:
                self.order.append(k)
                continue
            old = next((o for o in self.order if not self.pins.get(o)), None)
            if old is None:
                overflow.append(k)
                continue
            self.order.remove(old)
            victims.append(old)
            self.order.append(k)
        return hits, misses, victims, overflow, list(keys)

    def release(self, keys):
        for k in keys:
            self.pins[k] -= 1


@settings(max_examples=300, deadline=None, derandomize=True)
@given(capacity=st.integers(0, 6), trace=STEPS)
def test_lru_matches_the_reference_model(capacity, trace):
    cache, reference = ExpertCache(capacity, "lru"), ReferenceLRU(capacity)
    held, held_ref = [], []
    for keys, releases in trace:
        got = cache.lookup(keys)
        hits, misses, victims, overflow, pinned = reference.lookup(keys)
        assert (got.hits, got.misses, got.victims, got.overflow) == (hits, misses, victims, overflow)
        held.append(got.step)
        held_ref.append(pinned)
        for _ in range(min(releases, len(held))):
            cache.release(held.pop(0))
            reference.release(held_ref.pop(0))


def test_lfu_keeps_the_frequent_expert_lru_does_not():
    trace = [[0], [1], [0], [0], [2], [3], [4]]  # expert 0 is hot, then three one-offs
    outcomes, victims = {}, {}
    for policy in POLICIES:
        cache = ExpertCache(2, policy, aging_interval=100)
        victims[policy] = []
        for keys in trace:
            result = cache.lookup(keys)
            victims[policy] += result.victims
            cache.release(result.step)
        outcomes[policy] = 0 in cache
        assert cache.stats.evictions == 3  # 2, 3 and 4 each evict one of two full entries
    assert outcomes == {"lfu": True, "lru": False}
    # LFU evicts the one-offs (1, then 2, then 3); LRU the least recent: 1, then 0, then 2
    assert victims == {"lfu": [1, 2, 3], "lru": [1, 0, 2]}


def test_lfu_aging_lets_a_formerly_hot_expert_go():
    cache = ExpertCache(1, "lfu", aging_interval=2)
    for _ in range(4):
        cache.release(cache.lookup([0]).step)
    for _ in range(12):  # expert 1 now used every step; 0's count halves every 2 lookups
        cache.release(cache.lookup([1]).step)
    assert 1 in cache and 0 not in cache


def test_a_step_larger_than_the_cache_says_so_and_pins_what_it_holds():
    cache = ExpertCache(2)
    first = cache.lookup(["a", "b", "c"])
    assert first.misses == ["a", "b", "c"] and first.overflow == ["c"] and first.victims == []
    second = cache.lookup(["d"])  # a and b are held by the unreleased first step
    assert second.overflow == ["d"]
    cache.release(first.step)
    third = cache.lookup(["d"])
    assert third.victims == ["a"] and third.entries["d"] == first.entries["a"]
    assert cache.stats.requests == 5 and cache.stats.overflows == 2 and cache.stats.evictions == 1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown cache policy 'fifo'"):
        ExpertCache(2, "fifo")
    with pytest.raises(ValueError, match="capacity"):
        ExpertCache(-1)
    cache = ExpertCache(1)
    step = cache.lookup([1]).step
    cache.release(step)
    with pytest.raises(KeyError, match=rf"^{step}$"):  # the step itself is unknown now
        cache.release(step)
