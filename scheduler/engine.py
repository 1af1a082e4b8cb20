"""The engine: a prefetch thread that loads streamed groups into a static pool of slots.

Slot/event protocol
-------------------
Streamed groups (those not resident) are numbered in group order; group ``j`` always decodes into slot
``j % nslots`` (``nslots = prefetch + 1``, fewer when there are fewer streamed groups). Because the
assignment is static, each group's parameters are *permanent* views into its slot, built once at dispatch:
nothing is swapped or allocated per forward. What a slot holds at a given moment is tracked by tickets:

* ``slot.current`` is the latest load assigned to the slot (queued, loading or loaded). A forward whose
  group is ``slot.current.group`` uses that load; otherwise it enqueues a new one (*on demand*).
* ``slot.loaded`` is the load whose bytes are (being) written into the buffer.

Compute thread, pre-forward of a group ``g`` (``Engine.acquire``):
  1. under the lock, take ``slot.current`` if it is ``g`` else enqueue a demand load; pin it
     (``ticket.pins += 1``); enqueue prefetch loads for the next ``prefetch`` groups of the execution
     order whose slot is free to take (its current load is neither pinned nor waiting for its first use,
     nor needed sooner than them); a prefetch blocked only by a pinned slot is *deferred*: the
     post-forward that unpins the slot enqueues it (the wrap-around from the last group of a pass to the
     first of the next often lands on the slot in use);
  2. wait for the ticket's host handshake ``ticket.done`` ("decode enqueued and ready event recorded" on
     CUDA, "decoded" on the CPU) - never wait on a device event before it is known to be recorded, a
     wait on an unrecorded CUDA event is a no-op;
  3. CUDA: ``compute_stream.wait_event(slot.ready_event)``; no host synchronisation, except for a load
     whose decoded bytes are checked (the verify policy): the check is waited for first, and if it fails
     the ticket takes the error, is unpinned without a release event (nothing read the slot) and the
     error is raised in this forward.

Compute thread, post-forward (``Engine.release``): ``ticket.pins -= 1``; at zero, record
``slot.release_event`` on the compute stream, then (host handshake) mark the ticket released and notify.

Worker thread, per queued ticket ``t`` (FIFO):
  1. skip ``t`` if it was superseded (``slot.current is not t``) and nobody took it;
  2. wait (host) until the previous occupant ``slot.loaded`` has no pins: its last post-forward has
     recorded the release event. The previous occupant can gain no new pins, since it is no longer
     ``slot.current``;
  3. ``slot.loaded = t``; CUDA: the decode stream waits on ``slot.release_event`` (if the previous
     occupant was used), the copy/decode are enqueued and ``slot.ready_event`` recorded; CPU: decode;
  4. set ``t.done``.

Inline mode (``threaded=False``): when the loader never blocks the host (CUDA, every payload already in
VRAM or pinned host RAM: a load only *enqueues* copies and a decode), the compute thread runs the worker's
steps itself, in the same FIFO order, right after step 1 of the pre-forward and after each post-forward
unpins a slot; a ticket whose slot is still pinned stays queued until that unpin. No thread means no GIL
hand-offs: a waiting worker gets the GIL only after CPython's switch interval (5 ms) or when the compute
thread blocks, which delayed every decode until the forward waited for it. A ticket that is still not
done when its forward needs it could only be waiting on a slot pinned by an enclosing forward (streamed
groups nested in each other, which the caller keeps resident): that is an ``OffloadError``, not a hang.

Invariants (tested in ``tests/test_engine.py``, in both modes): a slot's bytes are never overwritten while a
forward that uses them has not released them; a forward never runs before its group's decode finished; each
slot's ready event is re-recorded only after the previous load of the slot is fully released, so one ready and
one release event per slot suffice. Deadlock freedom: the worker only ever waits for pins held by forwards
that already passed their pre-forward, and those never wait for the worker again (nested modules from two
streamed groups are kept resident by the planner's caller).
"""

from __future__ import annotations

import atexit
import collections
import threading
import time
import weakref
from collections.abc import Sequence

from offload_runtime.errors import OffloadError
from offload_runtime.scheduler.loader import Loader
from offload_runtime.scheduler.order import ExecutionOrder
from offload_runtime.scheduler.slots import Slot, Ticket
from offload_runtime.scheduler.stats import OffloadStats

_LIVE_ENGINES: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    """Stop prefetch threads before interpreter teardown (a worker inside a torch op at exit aborts)."""
    for engine in list(_LIVE_ENGINES):
        engine.close()


class Engine:
    """Loads streamed groups into slots on a background thread; forwards acquire and release them.

    Args:
        slots (`Sequence[Slot]`): the slot pool (buffers preallocated, events from the loader).
        slot_of (`dict[str, int]`): streamed group -> its slot.
        loader (`Loader`): a :class:`~offload_runtime.scheduler.loader.CpuLoader` or ``CudaLoader``.
        order (`ExecutionOrder`): the execution order prefetching follows.
        prefetch (`int`): how many groups ahead to load.
        stats (`OffloadStats`): counters.
        threaded (`bool`, defaults to `True`): loads run on a prefetch thread; `False` runs them inline on
            the compute thread (for loaders whose ``load`` only enqueues device work).
    """

    def __init__(
        self,
        slots: Sequence[Slot],
        slot_of: dict[str, int],
        loader: Loader,
        order: ExecutionOrder,
        prefetch: int,
        stats: OffloadStats,
        threaded: bool = True,
    ) -> None:
        self.slots = list(slots)
        self.slot_of = dict(slot_of)
        self.loader = loader
        self.order = order
        self.prefetch = prefetch
        self.stats = stats
        self._cond = threading.Condition()
        self._queue: collections.deque[Ticket] = collections.deque()
        self._held: dict[str, list[Ticket]] = collections.defaultdict(list)
        self._deferred: dict[int, str] = {}  # slot -> group to prefetch once the slot's current use ends
        self._closed = False
        self.threaded = threaded
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="offload-prefetch", daemon=True)
            self._thread.start()
        _LIVE_ENGINES.add(self)

    def __repr__(self) -> str:
        mode = "threaded" if self.threaded else "inline"
        return f"Engine({mode}, prefetch={self.prefetch}, slots={self.slots}, order={self.order.sequence})"

    # ---- compute thread -------------------------------------------------------------------------------
    def begin_pass(self) -> None:
        with self._cond:
            self.order.begin_pass()

    def end_pass(self) -> None:
        with self._cond:
            self.order.end_pass()
        self.loader.refresh_stats()

    def acquire(self, group: str) -> None:
        """Make ``group``'s slot hold its weights for the forward about to run (see the protocol)."""
        slot = self.slots[self.slot_of[group]]
        with self._cond:
            if self._closed:
                raise OffloadError("the offload runtime was removed or closed", group=group)
            ticket = slot.current
            if ticket is None or ticket.group != group or ticket.error is not None:
                ticket = self._enqueue(group, demand=True)
            ticket.pins += 1
            ticket.acquired = True
            self._held[group].append(ticket)
            self._kick(self.order.visit(group, self.prefetch))
            if not self.threaded:
                self._drain()
                if not ticket.done.is_set():
                    self._unpin(group, record=False)
                    raise OffloadError(
                        f"slot {ticket.slot} is held by a forward still running "
                        f"({self.slots[ticket.slot].loaded.group!r}): streamed groups nested in each other "
                        "must be kept resident",
                        group=group,
                    )
        if not ticket.done.is_set():
            start = time.perf_counter()
            ticket.done.wait()
            self.stats.wait_seconds += time.perf_counter() - start
        if ticket.error is not None:
            self._unpin(group, record=False)
            raise ticket.error
        try:
            self.loader.wait_ready(slot)
        except BaseException as exc:  # the load's check failed: the slot's bytes must not be used
            with self._cond:
                ticket.error = exc  # the next forward of this group enqueues a new load
            self._unpin(group, record=False)
            raise

    def release(self, group: str) -> None:
        """The forward that acquired ``group`` is done with it (all its reads are enqueued)."""
        self._unpin(group, record=True)

    def _unpin(self, group: str, record: bool) -> None:
        with self._cond:
            ticket = self._held[group].pop()
            ticket.pins -= 1
            if ticket.pins == 0:
                if record:
                    self.loader.record_release(self.slots[ticket.slot])
                    ticket.released = True
                deferred = self._deferred.pop(ticket.slot, None)
                if deferred is not None and self.slots[ticket.slot].current is ticket:
                    self._enqueue(deferred, demand=False)  # its decode waits for the release just recorded
                if not self.threaded:
                    self._drain()
                self._cond.notify_all()

    def _enqueue(self, group: str, demand: bool) -> Ticket:
        """Assign a new load of ``group`` to its slot (caller holds the lock)."""
        ticket = Ticket(group, self.slot_of[group], demand)
        self.slots[ticket.slot].current = ticket
        self._queue.append(ticket)
        self.stats.loads += 1
        self.stats.demand_loads += int(demand)
        self._cond.notify_all()
        return ticket

    def _kick(self, upcoming: list[str]) -> None:
        """Enqueue prefetches of ``upcoming`` (nearest first) that do not evict anything still needed."""
        for distance, group in enumerate(upcoming):
            slot_index = self.slot_of.get(group)
            if slot_index is None:
                continue
            current = self.slots[slot_index].current
            if current is not None:
                if current.group == group and current.error is None:
                    continue  # already there or on its way
                if current.pins:
                    self._deferred.setdefault(slot_index, group)  # prefetch it when this use ends
                    continue
                if not current.acquired:
                    continue  # loaded for a forward that has not run yet
                if current.group in upcoming[:distance]:
                    continue  # needed sooner than this one
            self._enqueue(group, demand=False)

    # ---- worker thread (or the compute thread, inline) ----------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                ticket = self._queue.popleft()
                slot = self.slots[ticket.slot]
                if self._superseded(ticket):
                    continue
                previous = slot.loaded
                while previous is not None and previous.pins and not self._closed:
                    self._cond.wait()
                if self._closed:
                    ticket.error = OffloadError("the offload runtime was closed", group=ticket.group)
                    ticket.done.set()
                    return
                wait_release = self._claim(ticket)
            self._perform(ticket, wait_release)

    def _drain(self) -> None:
        """Inline mode (lock held): run queued loads in FIFO order until one waits for a pinned slot."""
        while self._queue:
            ticket = self._queue[0]
            if self._superseded(ticket):
                self._queue.popleft()
                continue
            previous = self.slots[ticket.slot].loaded
            if previous is not None and previous.pins:
                return  # the post-forward that unpins it drains again
            self._queue.popleft()
            self._perform(ticket, self._claim(ticket))

    def _superseded(self, ticket: Ticket) -> bool:
        """A load nobody took whose slot was since assigned another load: skip it (step 1)."""
        return self.slots[ticket.slot].current is not ticket and not ticket.acquired

    def _claim(self, ticket: Ticket) -> bool:
        """Make ``ticket`` the slot's loaded one (lock held); whether its decode must wait for the release
        event of the previous occupant (only if one was used: a wait on an unrecorded event is a no-op)."""
        slot = self.slots[ticket.slot]
        previous = slot.loaded
        slot.loaded = ticket
        return previous is not None and previous.released

    def _perform(self, ticket: Ticket, wait_release: bool) -> None:
        try:
            self.loader.load(ticket.group, self.slots[ticket.slot], wait_release)
        except BaseException as exc:  # re-raised in the forward that needs this group
            ticket.error = exc
        ticket.done.set()

    def close(self) -> None:
        """Stop the worker; fail every queued load so no forward waits forever. Idempotent."""
        with self._cond:
            if self._closed and (self._thread is None or not self._thread.is_alive()):
                return
            self._closed = True
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        for ticket in pending:
            if not ticket.done.is_set():
                ticket.error = OffloadError("the offload runtime was closed", group=ticket.group)
                ticket.done.set()
        self.loader.close()
