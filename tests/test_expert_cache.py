"""Expert cache policy: invariants on random traces (hypothesis), LRU and layer-LRU against reference
models, layer-LRU on the traces it is for (a scan, reused experts, prefetches), LFU aging."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_runtime.scheduler.expert_cache import DEFAULT_POLICY, POLICIES, ExpertCache

# a trace: steps of (keys of the step, how many of the oldest unreleased steps to release after it)
STEPS = st.lists(
    st.tuples(st.lists(st.integers(0, 11), max_size=6, unique=True), st.integers(0, 2)), max_size=40
)


def _as_layered(key: int) -> tuple[int, int]:
    """Key 0..11 as ``(layer, expert)``: 3 layers of 4 experts."""
    return key // 4, key % 4


def _run(cache: ExpertCache, trace, check, layered: bool = False) -> None:
    held: list = []
    universe = [_as_layered(k) for k in range(12)] if layered else list(range(12))
    for keys, releases in trace:
        keys = [_as_layered(k) for k in keys] if layered else keys
        before = {k: cache.entry(k) for k in universe if k in cache}
        pinned_before = {k for k in universe if cache.pinned(k)}
        result = cache.lookup(keys)
        check(cache, keys, result, before, pinned_before)
        held.append(result.step)
        for _ in range(min(releases, len(held))):
            cache.release(held.pop(0))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(capacity=st.integers(0, 8), policy=st.sampled_from(POLICIES), trace=STEPS, layered=st.booleans())
def test_invariants_on_random_traces(capacity, policy, trace, layered):
    cache = ExpertCache(capacity, policy, aging_interval=3)
    universe = [_as_layered(k) for k in range(12)] if layered else list(range(12))
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
        entries = [cache.entry(k) for k in universe if k in cache]
        assert len(set(entries)) == len(entries) and all(0 <= e < capacity for e in entries)
        assert all(r.entries[k] == cache.entry(k) for k in [*r.hits, *cached_misses])
        assert all(r.entries[k] == before[k] for k in r.hits)  # a hit keeps its entry
        if r.overflow:  # only when nothing was free or evictable
            evictable = set(before) - pinned_before - set(keys) - set(r.victims)
            assert not evictable and len(cache) == capacity
        s = cache.stats
        assert s.requests == s.hits + s.misses

    _run(cache, trace, check, layered)
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
@given(capacity=st.integers(0, 6), trace=STEPS, policy=st.sampled_from(["lru", "layer-lru"]))
def test_lru_matches_the_reference_model(capacity, trace, policy):
    """Layer-LRU with keys of one layer (not tuples) is plain LRU."""
    cache, reference = ExpertCache(capacity, policy), ReferenceLRU(capacity)
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


class ReferenceLayerLRU:
    """Layer-LRU by brute force: every cached, unpinned key scored (age in its layer's visits, distance to
    its layer's next visit, then oldest use), the highest evicted."""

    def __init__(self, capacity, layer_order):
        self.capacity, self.pins, self.clock = capacity, {}, 0
        self.order = list(layer_order)
        self.visits, self.last, self.used = {}, {}, {}  # layer -> visits; key -> visit of last use, clock
        self.cached, self.current = set(), None

    def lookup(self, keys, visit=True):
        if not keys:
            return [], [], [], []
        layer = keys[0][0]
        if layer not in self.order:
            self.order.append(layer)
        if visit:
            self.visits[layer] = self.visits.get(layer, 0) + 1
            self.current = layer
        for k in keys:
            self.pins[k] = self.pins.get(k, 0) + 1
        hits = [k for k in keys if k in self.cached]
        misses = [k for k in keys if k not in self.cached]
        for k in hits:
            self._use(k)
        victims, overflow = [], []
        for k in misses:
            if len(self.cached) >= self.capacity:
                candidates = [c for c in self.cached if not self.pins.get(c)]
                if not candidates:
                    overflow.append(k)
                    continue
                old = max(candidates, key=self._score)
                self.cached.remove(old)
                victims.append(old)
            self.cached.add(k)
            self._use(k)
        return hits, misses, victims, overflow

    def _score(self, key):
        here = self.order.index(self.current) if self.current in self.order else 0
        n = len(self.order)
        age = self.visits.get(key[0], 0) - self.last[key]
        return (age, (self.order.index(key[0]) - here) % n or n, -self.used[key])

    def _use(self, key):
        self.clock += 1
        self.last[key], self.used[key] = self.visits.get(key[0], 0), self.clock

    def release(self, keys):
        for k in keys:
            self.pins[k] -= 1


# a layered trace: steps of (layer, experts of the step, a visit or a prefetch, releases after it)
LAYERED_STEPS = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.lists(st.integers(0, 3), max_size=4, unique=True),
        st.booleans(),
        st.integers(0, 2),
    ),
    max_size=50,
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    capacity=st.integers(0, 9),
    trace=LAYERED_STEPS,
    order=st.permutations([0, 1, 2, 3]),
    known=st.integers(0, 4),
)
def test_layer_lru_matches_the_reference_model(capacity, trace, order, known):
    """``known`` of the layers are given in ``layer_order``; the others are learnt from the lookups."""
    cache = ExpertCache(capacity, "layer-lru", layer_order=order[:known])
    reference = ReferenceLayerLRU(capacity, order[:known])
    held, held_ref = [], []
    for layer, experts, visit, releases in trace:
        keys = [(layer, e) for e in experts]
        got = cache.lookup(keys, visit=visit)
        assert (got.hits, got.misses, got.victims, got.overflow) == reference.lookup(keys, visit)
        held.append(got.step)
        held_ref.append(keys)
        for _ in range(min(releases, len(held))):
            cache.release(held.pop(0))
            reference.release(held_ref.pop(0))


def _forward(cache: ExpertCache, layers: int, routed) -> int:
    """One forward: each layer's step in turn, ``routed(layer)`` its experts; returns the hits."""
    hits = 0
    for layer in range(layers):
        result = cache.lookup([(layer, e) for e in routed(layer)])
        hits += len(result.hits)
        cache.release(result.step)
    return hits


@pytest.mark.parametrize("capacity", [6, 8, 12])
def test_a_scan_larger_than_the_cache_keeps_hits_for_the_next_one(capacity):
    """A prefill routes every expert of every layer (4 x 4 here). Plain LRU then evicts each expert just
    before its layer comes round again and hits nothing; layer-LRU evicts from the layer that runs last
    and keeps at least ``capacity`` minus one layer's experts for the next forward."""
    every = lambda layer: range(4)  # noqa: E731
    hits = {}
    for policy in ("lru", "layer-lru"):
        cache = ExpertCache(capacity, policy, layer_order=range(4))
        _forward(cache, 4, every)
        hits[policy] = [_forward(cache, 4, every) for _ in range(4)]
    assert hits["lru"] == [0, 0, 0, 0]
    assert min(hits["layer-lru"]) >= capacity - 4


def test_experts_a_layer_routed_last_time_outlive_those_it_did_not():
    """After a scan, each layer routes two of its four experts per forward, the same two every time: they
    become younger in their layer's visits than the two it dropped, so the dropped ones go first and the
    routed ones stay and hit."""
    cache = ExpertCache(8, layer_order=range(4))
    assert cache.policy_name == DEFAULT_POLICY == "layer-lru"
    _forward(cache, 4, lambda layer: range(4))
    _forward(cache, 4, lambda layer: (0, 1))
    _forward(cache, 4, lambda layer: (0, 1))
    assert [_forward(cache, 4, lambda layer: (0, 1)) for _ in range(3)] == [8, 8, 8]
    assert all((layer, e) in cache for layer in range(4) for e in (0, 1))


def test_a_prefetch_is_not_a_visit_and_protects_what_it_fetched():
    cache = ExpertCache(2, "layer-lru", layer_order=[0, 1])
    cache.release(cache.lookup([(1, 0)]).step)
    cache.release(cache.lookup([(0, 0)]).step)
    ahead = cache.lookup([(1, 1)], visit=False)  # layer 1's guess, made during layer 0's step
    # both cached keys are as young as can be (age 0); (1, 0)'s layer runs next, (0, 0)'s a cycle later
    assert ahead.victims == [(0, 0)]
    cache.release(ahead.step)
    step = cache.lookup([(1, 1)])  # the real visit: (1, 0) was not routed this time, so it ages
    assert step.hits == [(1, 1)]
    cache.release(step.step)
    assert cache.lookup([(0, 1)]).victims == [(1, 0)]


def test_lfu_keeps_the_frequent_expert_lru_does_not():
    trace = [[0], [1], [0], [0], [2], [3], [4]]  # expert 0 is hot, then three one-offs
    outcomes, victims = {}, {}
    for policy in ("lfu", "lru"):
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
