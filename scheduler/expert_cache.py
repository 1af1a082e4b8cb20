"""Replacement policy of an expert cache: which experts keep an entry, step by step. Pure Python.

The cache has a fixed number of *entries* (the runtime's buffers, each holding one expert, decoded or
compressed; the planner sizes the count from bytes). It knows keys (e.g. ``(module, expert)``) and entry
indices, never bytes, so it is the same for every runtime and testable on its own.

Protocol, per step (one experts module's forward):

1. ``lookup(keys)`` with every key the step needs (unique). Each is a **hit** (it has an entry), or a
   **miss**: a miss takes a free entry, else the entry of a **victim** chosen by the policy among cached
   keys that no unreleased step holds. The step's keys are **pinned** (held) until ``release(step)``: a
   key a step holds is never evicted, so a runtime may still be reading its entry. A miss that finds
   neither a free entry nor an evictable key is an **overflow**: the step needs more entries than the
   cache can give now, and says so; the caller decodes it straight into its slot, uncached.
2. The caller loads each miss into its entry (``Lookup.entries``), computes, then ``release(step)``.

Policies (by name):

- ``"layer-lru"`` (the default) is LRU with age counted in *visits of the key's own layer* (a key is
  ``(layer, expert)``; a lookup visits the layer of its keys): it evicts the key whose layer has run most
  often since the key was last used; among equally old keys, the one whose layer runs furthest in the future
  (the MoE layers run in a fixed cycle, ``layer_order``, else the order lookups first show them); then the
  least recently used. Why: every forward visits the layers in turn, so plain LRU measures age across the
  cycle and, when a forward touches more experts than the cache holds (a prefill routes nearly every
  expert), it evicts each expert just before its layer comes round again and hits nothing (the classic
  LRU loop). Counted per layer, the experts a forward used are all equally young, and the tie goes to the
  layer that will be needed last: Belady's choice for a cycle, so a full scan keeps at least ``capacity``
  minus one layer's experts for the next one. An expert its layer did not route the last time is older
  than one it did, which keeps what LRU gets right when consecutive tokens reuse experts. A lookup with
  ``visit=False`` (a prefetch ahead of the layer's step) refreshes its keys without counting a visit.
  Keys that are not tuples all belong to one layer, where this is plain LRU.
- ``"lru"`` evicts the least recently used key.
- ``"lfu"`` evicts the least frequently used, with aging (every ``aging_interval`` lookups all counts
  halve, so yesterday's favourites fade) and least recent first among equal counts.

Counters: requests, hits, misses (overflows included), evictions, overflows; ``requests == hits + misses``
always.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Container, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

Key = Hashable


@dataclass
class Lookup:
    """The answer to one step's :meth:`ExpertCache.lookup`.

    Attributes:
        step: the step's id (pass it to :meth:`ExpertCache.release`).
        hits: keys that already had an entry.
        misses: keys that had none (to load), overflows included, in request order.
        victims: keys evicted to make room, in eviction order (their entries now belong to misses).
        overflow: misses that got no entry (decode them uncached).
        entries: entry index of every hit and every cached miss.
    """

    step: int
    hits: list[Key] = field(default_factory=list)
    misses: list[Key] = field(default_factory=list)
    victims: list[Key] = field(default_factory=list)
    overflow: list[Key] = field(default_factory=list)
    entries: dict[Key, int] = field(default_factory=dict)


@dataclass
class CacheStats:
    """Counters since construction."""

    requests: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    overflows: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


class _LRU:
    """Recency of the cached keys, oldest first."""

    def __init__(self) -> None:
        self.order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        """A use of cached ``key``."""
        self.order[key] = None
        self.order.move_to_end(key)

    def seen(self, key: Key) -> None:
        """A use of ``key`` that got no entry (an overflow)."""

    def evict(self, key: Key) -> None:
        self.order.pop(key, None)

    def victims(self, pinned: Container[Key]) -> Iterator[Key]:
        """Victims in eviction order, for one lookup: between two of them the caller evicts the one it got
        and touches only keys in ``pinned``, which changes no other candidate's rank."""
        while (key := next((k for k in self.order if k not in pinned), None)) is not None:
            yield key

    def tick(self, layer: Hashable, visit: bool) -> None:
        """A lookup of ``layer``'s keys begins (LRU keeps no counts)."""


class _LFU(_LRU):
    """Frequency with aging; recency breaks ties (and counts survive eviction, so a returning expert
    keeps its history)."""

    def __init__(self, aging_interval: int) -> None:
        super().__init__()
        self.counts: dict[Key, float] = {}
        self.aging_interval = aging_interval
        self.lookups = 0

    def touch(self, key: Key) -> None:
        super().touch(key)
        self.seen(key)

    def seen(self, key: Key) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + 1.0

    def victims(self, pinned: Container[Key]) -> Iterator[Key]:
        # count, then rank in recency (lower is older); ranked once: evicting one key or touching a pinned
        # one leaves the others' order as it was
        candidates = [(self.counts.get(k, 0.0), r, k) for r, k in enumerate(self.order) if k not in pinned]
        candidates.sort(key=lambda c: c[:2])
        for _, _, key in candidates:
            yield key

    def tick(self, layer: Hashable, visit: bool) -> None:
        self.lookups += 1
        if self.lookups % self.aging_interval == 0:
            self.counts = {k: c / 2 for k, c in self.counts.items() if c >= 1 / 64}


def layer_of(key: Key) -> Hashable:
    """The layer of a ``(layer, expert)`` key; every other key belongs to one layer, ``None``."""
    return key[0] if isinstance(key, tuple) and key else None


class _LayerLRU:
    """Age in visits of the key's own layer, then distance to the layer's next visit, then recency
    (the module docstring says why). Each layer keeps its cached keys in recency order, oldest first, so
    the candidates are each layer's oldest unpinned key: a lookup ranks them once (O(layers)), then each
    victim costs O(log layers), not O(entries)."""

    def __init__(self, layer_order: Sequence[Hashable]) -> None:
        self.position: dict[Hashable, int] = {layer: i for i, layer in enumerate(dict.fromkeys(layer_order))}
        self.visits: dict[Hashable, int] = {}
        self.layers: dict[Hashable, OrderedDict[Key, int]] = {}  # layer -> key -> visit of its last use
        self.current: Hashable = None

    def _place(self, layer: Hashable) -> int:
        if layer not in self.position:
            self.position[layer] = len(self.position)
        return self.position[layer]

    def touch(self, key: Key) -> None:
        layer = layer_of(key)
        self._place(layer)  # a lookup may mix layers: each key's layer has a place in the cycle
        keys = self.layers.setdefault(layer, OrderedDict())
        keys[key] = self.visits.get(layer, 0)
        keys.move_to_end(key)

    def seen(self, key: Key) -> None:
        """An overflow keeps no entry, so no age."""

    def evict(self, key: Key) -> None:
        self.layers.get(layer_of(key), {}).pop(key, None)

    def victims(self, pinned: Container[Key]) -> Iterator[Key]:
        """Each layer's oldest unpinned key ranked once per lookup in a heap; after a layer's candidate is
        evicted only that layer's next one is ranked (nothing else changes during a lookup: its own keys
        are pinned). Ranks never tie: each layer has its own distance."""
        cycle = len(self.position)
        here = self.position.get(self.current, 0)

        def ranked(layer: Hashable, keys: OrderedDict[Key, int]) -> tuple | None:
            for key in keys:  # the oldest unpinned one (pinned keys are the young ones)
                if key not in pinned:
                    break
            else:
                return None
            distance = (self.position[layer] - here) % cycle or cycle  # its layer's next visit, in layers
            return (keys[key] - self.visits.get(layer, 0), -distance, key, layer)  # oldest, furthest first

        heap = [r for layer, keys in self.layers.items() if (r := ranked(layer, keys)) is not None]
        heapq.heapify(heap)
        while heap:
            _, _, key, layer = heapq.heappop(heap)
            yield key
            following = ranked(layer, self.layers[layer])
            if following is not None:
                heapq.heappush(heap, following)

    def tick(self, layer: Hashable, visit: bool) -> None:
        self._place(layer)
        if visit:  # a prefetch runs during another layer's step: distances stay measured from that one
            self.current = layer
            self.visits[layer] = self.visits.get(layer, 0) + 1


POLICIES = ("layer-lru", "lru", "lfu")
DEFAULT_POLICY = "layer-lru"


class ExpertCache:
    """Which keys hold which of ``capacity`` entries (see the module docstring).

    Args:
        capacity (`int`): number of entries (>= 0).
        policy (`str`, defaults to `"layer-lru"`): one of :data:`POLICIES`.
        aging_interval (`int`, *optional*): LFU halves every count every this many lookups; defaults to
            ``max(capacity, 1)``.
        layer_order (`Sequence`, *optional*): ``"layer-lru"``'s layers in the order a forward runs them;
            layers it does not name are placed in the order lookups first show them.

    Attributes:
        stats: :class:`CacheStats`.
    """

    def __init__(
        self,
        capacity: int,
        policy: str = DEFAULT_POLICY,
        *,
        aging_interval: int | None = None,
        layer_order: Sequence[Hashable] = (),
    ) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}; choose one of {POLICIES}")
        self.capacity = capacity
        self.policy_name = policy
        interval = aging_interval if aging_interval is not None else max(capacity, 1)
        self._policy = (
            _LayerLRU(layer_order)
            if policy == "layer-lru"
            else _LRU()
            if policy == "lru"
            else _LFU(max(1, interval))
        )
        self._entry: dict[Key, int] = {}
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._held: dict[int, set[Key]] = {}  # unreleased step -> its keys
        self._pins: dict[Key, int] = {}  # key -> number of unreleased steps holding it
        self._next_step = 0
        self.stats = CacheStats()

    def __repr__(self) -> str:
        return (
            f"ExpertCache(capacity={self.capacity}, policy={self.policy_name!r}, cached={len(self)}, "
            f"held_steps={len(self._held)}, {self.stats})"
        )

    def __len__(self) -> int:
        return len(self._entry)

    def __contains__(self, key: Key) -> bool:
        return key in self._entry

    def entry(self, key: Key) -> int | None:
        """The entry index of ``key``, or None when it is not cached."""
        return self._entry.get(key)

    def pinned(self, key: Key) -> bool:
        """Whether an unreleased step holds ``key``."""
        return key in self._pins

    def lookup(self, keys: Iterable[Key], *, visit: bool = True) -> Lookup:
        """Hits, misses (with their entries), victims and overflow for one step's ``keys``; pins them.

        ``visit=False`` marks a lookup ahead of its layer's step (a prefetch): it does not count as a visit
        of the layer (``"layer-lru"``'s age)."""
        wanted = list(dict.fromkeys(keys))
        result = Lookup(self._next_step)
        self._next_step += 1
        self._held[result.step] = set(wanted)
        for key in wanted:
            self._pins[key] = self._pins.get(key, 0) + 1
        if wanted:
            self._policy.tick(layer_of(wanted[0]), visit)
        for key in wanted:
            if key in self._entry:
                result.hits.append(key)
                result.entries[key] = self._entry[key]
                self._policy.touch(key)
        victims: Iterator[Key] | None = None  # ranked once per lookup, on its first miss without a free entry
        for key in wanted:
            if key in self._entry:
                continue
            result.misses.append(key)
            if not self._free and victims is None:
                victims = self._policy.victims(self._pins)
            index = self._take_entry(result, victims)
            if index is None:
                result.overflow.append(key)
                self._policy.seen(key)  # its use still counts in a frequency history
                continue
            self._entry[key] = index
            result.entries[key] = index
            self._policy.touch(key)
        s = self.stats
        s.requests += len(wanted)
        s.hits += len(result.hits)
        s.misses += len(result.misses)
        s.evictions += len(result.victims)
        s.overflows += len(result.overflow)
        return result

    def release(self, step: int) -> None:
        """The step's forward is issued: its keys may be evicted from now on.

        Raises:
            KeyError: ``step`` is unknown or already released.
        """
        for key in self._held.pop(step):
            left = self._pins[key] - 1
            if left:
                self._pins[key] = left
            else:
                del self._pins[key]

    def _take_entry(self, result: Lookup, victims: Iterator[Key] | None) -> int | None:
        if self._free:
            return self._free.pop()
        victim = next(victims, None) if victims is not None else None
        if victim is None:
            return None
        result.victims.append(victim)
        self._policy.evict(victim)  # LFU keeps its count: history survives eviction
        return self._entry.pop(victim)
