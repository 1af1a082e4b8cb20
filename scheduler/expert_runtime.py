"""The expert runtime: each step's routed experts made ready in the expert slot, from a cache in the budget.

It is the provider of :mod:`offload_runtime.experts` (whose hook reads the routing, one host sync per MoE
layer per step, and runs the model's own experts forward on the slot). Its memory is an arena of exactly
the :class:`~offload_runtime.scheduler.experts_plan.ExpertPlan`'s device bytes: the slot (every experts
module's stacked parameters are views into it; modules run one after another), the cache entries, staging,
the batched decoder's arrays and workspace, and a scratch buffer.

Protocol of ``make_ready(module, ids)`` (CUDA, compressed entries), all enqueued, no host wait:

1. ``cache.lookup`` of the step's keys ``(module, e)``: hits, misses with the entry each gets (a victim's),
   and uncached misses (more experts than free entries); the step's keys are pinned until ``release``;
2. each cached miss is copied on the copy stream from its home (pinned host copy, or a disk read into the
   pinned ring) straight into its entry, after the last decode that read that entry (``entry_read`` event);
   ``entry_ready`` is recorded after the copy;
3. the decode stream waits for the slot's release by the previous module's forward and for the entries'
   copies, then one batched decode (:mod:`offload_runtime.native.batch_decode`) writes every expert's chunks
   straight into its slices of the slot. An expert whose chunks straddle tensors decodes into the scratch
   buffer and is copied; uncached misses go through the staging buffers in rounds;
4. the compute stream waits for the decode; ``release`` records the slot's release event and unpins.

At dispatch (``warm_cache``) every entry gets an expert, in the order a forward runs them (the first MoE
layers' experts first: the first forward uses them first, and ``"layer-lru"`` keeps the earliest layers'
longest), so the first prompt does not pay for a cache that is empty but already in the budget. The
bytes it moves are not counted as a step's (``offload_stats.experts.warmed`` says how many experts).

``"decoded"`` entries (CUDA option, and the CPU's way): a miss is decoded into its entry (on CUDA via a
staging buffer), and every use copies the entry's tensors into the slot. With ``speculate=True`` (CUDA),
after enqueueing a step the runtime applies the next MoE layer's router to this step's hidden states and
copies the experts it picks into cache entries ahead (wrong guesses cost bandwidth, never correctness);
``offload_stats.experts`` reports how many of them the next layer used.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from offload_runtime.errors import CorruptCheckpointError, OffloadError
from offload_runtime.experts import ExpertHook, ExpertSlot, unique_experts
from offload_runtime.loaders.format import GroupEntry
from offload_runtime.loaders.moe import ExpertsModule
from offload_runtime.loaders.reader import decode_held_payload
from offload_runtime.loaders.source import GroupSource
from offload_runtime.loaders.verify import DECODED
from offload_runtime.native import get_codec
from offload_runtime.native.base import HostBuffer
from offload_runtime.native.batch_decode import BatchItem
from offload_runtime.native.layout import GroupLayout
from offload_runtime.native.workspace import DecodeWorkspace
from offload_runtime.scheduler.arena import DeviceArena
from offload_runtime.scheduler.expert_cache import ExpertCache
from offload_runtime.scheduler.experts_plan import ExpertPlan
from offload_runtime.scheduler.host_ring import HostReadRing
from offload_runtime.scheduler.pinning import pin_by_registering
from offload_runtime.scheduler.stats import ExpertStats, OffloadStats

Key = tuple[str, int]


def slot_layout(model: nn.Module, module: ExpertsModule) -> GroupLayout:
    """The layout of one experts module's stacked parameters (the expert slot's)."""
    owner = model.get_submodule(module.path)
    return GroupLayout.from_tensors((a, owner._parameters[a]) for a in module.params)


def find_router(model: nn.Module, module: ExpertsModule) -> nn.Module | None:
    """The router of an experts module: a sibling module with a 2-D ``[num_experts, hidden]`` weight."""
    parent_path, _, name = module.path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    for child_name, child in parent.named_children():
        if child_name == name:
            continue
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == module.num_experts:
            return child
    return None


class _Expert:
    """One expert group and how its decoded bytes reach the slot."""

    def __init__(self, entry: GroupEntry, slot: ExpertSlot) -> None:
        self.entry = entry
        self.name = entry.name
        module = entry.expert.module
        # each tensor of the group -> (offset in the group's layout, bytes, offset in the slot buffer)
        base = slot.buffer.data_ptr()
        self.places: list[tuple[int, int, int]] = []
        for spec, piece in zip(entry.layout.tensors, entry.expert.slices, strict=True):
            dest = slot.params[piece.param[len(module) + 1 :]][piece.index]
            self.places.append((spec.offset, spec.nbytes, dest.data_ptr() - base))
        self.direct = _direct_item(entry, self.places)  # chunks straight into the slot, or None
        self.contiguous = BatchItem.contiguous(entry.chunks)


def _direct_item(entry: GroupEntry, places: Sequence[tuple[int, int, int]]) -> BatchItem | None:
    """Chunks mapped to slot offsets when each chunk's decoded bytes lie inside one tensor, else None."""
    out, start = [], 0
    for chunk in entry.chunks:
        end = start + chunk.decoded_size
        place = next((p for p in places if p[0] <= start and end <= p[0] + p[1]), None)
        if place is None:
            return None
        out.append(place[2] + start - place[0])
        start = end
    return BatchItem.mapped(entry.chunks, out)


class ExpertRuntime:
    """Binds every experts module to the slot and serves their steps (see the module docstring).

    Args:
        source (`GroupSource`): a source of expert groups (a reader with ``granularity="expert"``).
        plan (`ExpertPlan`): sizes and homes.
        model (`nn.Module`): the model (its stacked parameters may be on ``meta``).
        modules (`Sequence[ExpertsModule]`): its experts modules, in execution order.
        device (`torch.device`): where the slot and cache live.
        stats (`OffloadStats`): gets an ``experts`` entry.
        speculate (`bool`, defaults to `False`): prefetch the next layer's likely experts (CUDA).
    """

    def __init__(
        self,
        source: GroupSource,
        plan: ExpertPlan,
        model: nn.Module,
        modules: Sequence[ExpertsModule],
        device: torch.device,
        stats: OffloadStats,
        speculate: bool = False,
    ) -> None:
        self.source, self.plan, self.device = source, plan, device
        self.stats = stats.experts = ExpertStats()
        self.arena = DeviceArena(plan.device_bytes - plan.overhead_bytes, device)
        self.slot_buffer = self.arena.take(plan.slot_bytes)
        self.modules = list(modules)
        self.slots = {m.path: self._slot(model, m) for m in self.modules}
        entries = [g for g in source.groups if g.expert is not None]
        self.experts: dict[Key, _Expert] = {
            (g.expert.module, g.expert.index): _Expert(g, self.slots[g.expert.module]) for g in entries
        }
        self.cache = ExpertCache(plan.capacity, plan.policy, layer_order=[m.path for m in self.modules])
        self.entries = [self.arena.take(plan.entry_bytes) for _ in range(plan.capacity)]
        self._steps: dict[str, int] = {}
        self.speculate = speculate and device.type == "cuda"
        self.next_module = {a.path: b.path for a, b in zip(self.modules, self.modules[1:], strict=False)}
        self.routers = {m.path: find_router(model, m) for m in self.modules} if self.speculate else {}
        self._speculated: dict[str, set[int]] = {}
        self.loads = (CudaExpertLoads if device.type == "cuda" else CpuExpertLoads)(self)
        self.hooks: dict[str, ExpertHook] = {}
        hook_class = _SpeculatingHook if self.speculate else ExpertHook
        for m in self.modules:
            self.hooks[m.path] = hook_class(m.path, self.slots[m.path], self)
            self.hooks[m.path].attach(model.get_submodule(m.path))
        self.warm_cache()

    def _slot(self, model: nn.Module, module: ExpertsModule) -> ExpertSlot:
        layout = slot_layout(model, module)
        params = layout.views(self.slot_buffer[: layout.size])
        return ExpertSlot(module.path, module.num_experts, self.slot_buffer, layout, params)

    # -- the provider ------------------------------------------------------------------------------------
    def make_ready(self, module: str, expert_ids: Sequence[int]) -> None:
        start = time.perf_counter()
        keys = [(module, e) for e in expert_ids]
        look = self.cache.lookup(keys)
        self._steps[module] = look.step
        s = self.stats
        s.steps += 1
        s.requested += len(keys)
        s.hits += len(look.hits)
        s.misses += len(look.misses)
        s.uncached += len(look.overflow)
        speculated = self._speculated.pop(module, None)
        if speculated:
            s.speculated_used += len(speculated & set(expert_ids))
        self.loads.make_ready(keys, look)
        s.wait_seconds += time.perf_counter() - start

    def release(self, module: str, expert_ids: Sequence[int]) -> None:
        step = self._steps.pop(module, None)
        if step is not None:
            self.cache.release(step)
        self.loads.release()  # last: it raises if the step's checked decode was wrong

    def warm_cache(self) -> None:
        """Fill every entry at dispatch, experts in the order a forward runs them (module docstring)."""
        order = [(m.path, e) for m in self.modules for e in range(m.num_experts)]
        keys = [k for k in order if k in self.experts][: self.plan.capacity]
        if not keys:
            return
        s = self.stats
        moved = s.h2d_bytes, s.disk_bytes
        look = self.cache.lookup(keys, visit=False)  # not a step: no layer's visit
        self.loads.warm(keys, look)
        self.cache.release(look.step)
        s.h2d_bytes, s.disk_bytes = moved  # dispatch's bytes, not a step's
        s.warmed = len(keys)

    def speculate_next(self, module: str, hidden: torch.Tensor) -> None:
        """Copy ahead the experts the next MoE layer's router picks for ``hidden`` (a guess)."""
        following = self.next_module.get(module)
        router = self.routers.get(following) if following else None
        if router is None:
            return
        with torch.no_grad():
            out = router(hidden)
        picks = [t for t in (out if isinstance(out, tuple) else (out,)) if not t.is_floating_point()]
        if not picks:
            return
        ids = unique_experts(picks[0], self.slots[following].num_experts)
        look = self.cache.lookup([(following, e) for e in ids], visit=False)
        cached = [k for k in look.misses if k in look.entries]
        self.loads.fill(cached, look)
        self.cache.release(look.step)
        self._speculated[following] = {e for _, e in cached}
        self.stats.speculated += len(cached)

    def close(self) -> None:
        self.loads.close()


def _read_homes(rt: ExpertRuntime, pinned: bool) -> dict[str, torch.Tensor]:
    """The payloads of the experts whose plan home is host RAM, read in once (pinned on CUDA)."""
    homes = {}
    for expert in rt.experts.values():
        if rt.plan.homes.get(expert.name) == "host":
            buf = torch.empty(expert.entry.stored_size, dtype=torch.uint8, pin_memory=pinned)
            homes[expert.name] = rt.source.read_into(expert.name, buf)
    return homes


class _SpeculatingHook(ExpertHook):
    """An expert hook that, once its step is enqueued, guesses the next layer's experts (CUDA)."""

    def pre_forward(self, args: tuple, kwargs: dict) -> list[int]:
        ids = super().pre_forward(args, kwargs)
        hidden = next((t for t in args if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
        if hidden is not None:
            self.provider.speculate_next(self.path, hidden)
        return ids


class CpuExpertLoads:
    """CPU: decoded entries; a miss decodes its expert (from its RAM copy or the container) into its entry,
    every use copies the entry's tensors into the slot."""

    def __init__(self, rt: ExpertRuntime) -> None:
        self.rt = rt
        self.scratch = torch.empty(max(e.entry.decoded_size for e in rt.experts.values()), dtype=torch.uint8)
        self.staging = torch.empty(rt.plan.host_ring_each, dtype=torch.uint8)
        self.homes = _read_homes(rt, pinned=False)

    def warm(self, keys: list[Key], look: Any) -> None:
        self.fill(keys, look)

    def make_ready(self, keys: list[Key], look: Any) -> None:
        rt = self.rt
        missing = set(look.misses)
        for key in keys:
            expert = rt.experts[key]
            index = look.entries.get(key)
            decoded = rt.entries[index] if index is not None else self.scratch
            decoded = decoded[: expert.entry.decoded_size]
            if key in missing:
                self._decode(expert, decoded)
            slot = rt.slot_buffer
            for src, n, dst in expert.places:
                slot[dst : dst + n].copy_(decoded[src : src + n])

    def _decode(self, expert: _Expert, out: torch.Tensor) -> None:
        rt, entry = self.rt, expert.entry
        home = self.homes.get(expert.name)
        if home is None:
            rt.source.decode_cpu(expert.name, out, staging=self.staging)
            rt.stats.disk_bytes += entry.stored_size
            return
        decode_held_payload(rt.source, entry, home, out)

    def fill(self, keys: list[Key], look: Any) -> None:
        """Decode ``keys`` (cached misses) into their entries (the CPU does not speculate: this warms)."""
        for key in keys:
            expert = self.rt.experts[key]
            self._decode(expert, self.rt.entries[look.entries[key]][: expert.entry.decoded_size])

    def release(self) -> None:
        """CPU copies are done when make_ready returns."""

    def close(self) -> None:
        self.homes.clear()


class CudaExpertLoads:
    """CUDA: the copy stream fills entries, the decode stream writes the slot (protocol in the module
    docstring)."""

    def __init__(self, rt: ExpertRuntime) -> None:
        pin_by_registering()  # before the homes and the ring are pinned (pinning.py says why)
        self.rt = rt
        plan, device, arena = rt.plan, rt.device, rt.arena
        self.compressed = plan.mode == "compressed"
        codecs = {e.entry.codec for e in rt.experts.values()}
        if len(codecs) != 1:
            raise OffloadError(f"experts stored with several codecs ({sorted(codecs)}): not supported")
        codec = get_codec(codecs.pop())
        max_chunk = max(int(e.contiguous.decoded.max()) for e in rt.experts.values())
        self.batch = codec.batch_decoder(plan.batch_chunks, max_chunk, device, arena.take)
        if self.batch is None:
            raise OffloadError(f"codec {codec.name!r} has no batched GPU decoder: experts cannot stream")
        self.copy_stream = torch.cuda.Stream(device)
        self.decode_stream = torch.cuda.Stream(device)
        workspace = DecodeWorkspace(device, allocate=arena.take)
        workspace.reserve(dict(plan.workspace))
        workspace.allocate(self.decode_stream)
        if hasattr(self.batch, "use_workspace"):
            self.batch.use_workspace(workspace)
        self.staging = [arena.take(plan.staging_each) for _ in range(plan.staging_count)]
        self.staging_free: list[torch.cuda.Event | None] = [None] * plan.staging_count
        self.scratch = arena.take(plan.scratch_bytes)
        self.entry_ready = [torch.cuda.Event() for _ in rt.entries]
        self.entry_read: list[torch.cuda.Event | None] = [None] * len(rt.entries)
        self.homes = _read_homes(rt, pinned=True)
        self.ring = HostReadRing(plan.host_ring_count, plan.host_ring_each)
        self.slot_free: torch.cuda.Event | None = None
        self._pending: list = []  # checked decodes of the current step, resolved in release()

    def warm(self, keys: list[Key], look: Any) -> None:
        """Fill ``keys``' entries at dispatch: like a step's misses (``fill``), except experts whose home is
        the cache itself (no host copy, and no ring when none is on disk), read through one bounce buffer;
        a checked decode (decoded entries) is resolved here, so damage is found at dispatch."""
        rt = self.rt
        homeless = {k for k in keys if rt.plan.homes.get(rt.experts[k].name) == "cache"}
        bounce = HostBuffer(pinned=True)
        for key in (k for k in keys if k in homeless):  # in execution order
            expert = rt.experts[key]
            size = expert.entry.stored_size
            payload = rt.source.read_into(expert.name, bounce(size))
            rt.entries[look.entries[key]][:size].copy_(payload)  # synchronous: the bounce is reused
        self.fill([k for k in keys if k not in homeless], look)
        self._resolve_checks()

    # -- entries -------------------------------------------------------------------------------------------
    def _home_bytes(self, expert: _Expert) -> tuple[torch.Tensor, int | None]:
        """The expert's payload in pinned host memory: its home copy, or read into the ring now (with the
        ring buffer's index)."""
        home = self.homes.get(expert.name)
        if home is not None:
            return home, None
        self.rt.stats.disk_bytes += expert.entry.stored_size
        return self.ring.read(expert.name, self.rt.source.read_into)

    def _copy(self, expert: _Expert, dest: torch.Tensor, after: torch.cuda.Event | None) -> None:
        """Copy ``expert``'s payload into ``dest`` on the copy stream, after ``after``."""
        src, ring = self._home_bytes(expert)
        size = expert.entry.stored_size
        stream = self.copy_stream
        if after is not None:
            stream.wait_event(after)
        with torch.cuda.stream(stream):
            dest[:size].copy_(src[:size], non_blocking=True)
        if ring is not None:
            self.ring.copied(ring, stream)
        self.rt.stats.h2d_bytes += size

    def fill(self, keys: list[Key], look: Any) -> None:
        """Copy the payloads of ``keys`` (cached misses) into their entries (compressed entries), or decode
        them into their entries through staging (decoded entries)."""
        rt = self.rt
        for key in keys:
            index = look.entries[key]
            expert = rt.experts[key]
            if self.compressed:
                self._copy(expert, rt.entries[index], self.entry_read[index])
                self.entry_ready[index].record(self.copy_stream)
            else:
                self._decode_through_staging([(expert, rt.entries[index], expert.contiguous, index)])

    def _decode_through_staging(
        self, jobs: list[tuple[_Expert, torch.Tensor, BatchItem, int | None]]
    ) -> None:
        """Each job's payload copied into a staging buffer and decoded from there, in rounds of the
        staging buffers (a buffer is reused after the decode that read it)."""
        n = len(self.staging)
        for start in range(0, len(jobs), n):
            batch = []
            for k, (expert, out, item, index) in enumerate(jobs[start : start + n]):
                self._copy(expert, self.staging[k], self.staging_free[k])
                ready = torch.cuda.Event()
                ready.record(self.copy_stream)
                self.decode_stream.wait_event(ready)
                if index is not None and self.entry_read[index] is not None:
                    self.decode_stream.wait_event(self.entry_read[index])
                batch.append((item, self.staging[k], out))
            self._decode(batch, [j[0] for j in jobs[start : start + n]])
            done = torch.cuda.Event()
            done.record(self.decode_stream)
            for k in range(len(batch)):
                self.staging_free[k] = done
            for _, _, _, index in jobs[start : start + n]:
                if index is not None:
                    self.entry_ready[index].record(self.decode_stream)

    def _decode(self, jobs: list, experts: list[_Expert]) -> None:
        """One batched decode on the decode stream; checked when the policy asks (the check is resolved
        in :meth:`release`, still inside the forward that reads the experts, so a wrong decode fails that
        forward without making the host wait for the decode here)."""
        policy = self.rt.source.policy
        due = [e for e in experts if policy.due(DECODED, e.name)]
        report = self.batch.decode(jobs, self.decode_stream, check=bool(due))
        if report is None:
            for e in due:
                policy.passed(DECODED, e.name)
            return
        self._pending.append((report, experts, [item for item, _, _ in jobs], due))

    def _resolve_checks(self) -> None:
        """Wait for the step's checked decodes; raise naming the first wrong chunk's group and chunk."""
        pending, self._pending = self._pending, []
        policy = self.rt.source.policy
        for report, experts, items, due in pending:
            faults = report.faulty_chunks()
            offset = 0
            for expert, item in zip(experts, items, strict=True):
                mine = [(i - offset, what) for i, what in faults if offset <= i < offset + item.num_chunks]
                if mine:
                    chunk, what = mine[0]
                    raise CorruptCheckpointError(
                        f"GPU decode of chunk {chunk} is wrong: {what}",
                        file=self.rt.source.path,
                        group=expert.name,
                        chunk=chunk,
                        hint="the payload in memory or on disk is damaged; re-open or re-pack the container",
                    )
                offset += item.num_chunks
            for e in due:
                policy.passed(DECODED, e.name)

    # -- a step --------------------------------------------------------------------------------------------
    def make_ready(self, keys: list[Key], look: Any) -> None:
        rt = self.rt
        self.fill([k for k in look.misses if k in look.entries], look)
        stream = self.decode_stream
        if self.slot_free is not None:
            stream.wait_event(self.slot_free)  # the previous module's forward is done with the slot
        slot = rt.slot_buffer
        direct, fallback, used = [], [], []
        for key in keys:
            index = look.entries.get(key)
            if index is None:
                continue
            used.append(index)
            stream.wait_event(self.entry_ready[index])
            expert = rt.experts[key]
            entry = rt.entries[index]
            if not self.compressed:
                fallback.append((expert, entry, True))
            elif expert.direct is not None:
                direct.append((expert, (expert.direct, entry, slot)))
            else:
                fallback.append((expert, entry, False))
        if direct:
            self._decode([job for _, job in direct], [e for e, _ in direct])
        for expert, src, decoded in fallback:
            if not decoded:  # compressed entry whose chunks straddle tensors: decode to scratch first
                self._decode([(expert.contiguous, src, self.scratch)], [expert])
                src = self.scratch
            self._place(expert, src)
        for expert in (rt.experts[k] for k in look.overflow):
            # one at a time through the scratch buffer: each is placed before the next overwrites it
            self._decode_through_staging([(expert, self.scratch, expert.contiguous, None)])
            self._place(expert, self.scratch)
        done = torch.cuda.Event()
        done.record(stream)
        for index in used:
            self.entry_read[index] = done
        torch.cuda.current_stream(rt.device).wait_event(done)

    def _place(self, expert: _Expert, decoded: torch.Tensor) -> None:
        """Copy a decoded expert's tensors into its slices of the slot, on the decode stream."""
        slot = self.rt.slot_buffer
        with torch.cuda.stream(self.decode_stream):
            for src, n, dst in expert.places:
                slot[dst : dst + n].copy_(decoded[src : src + n], non_blocking=True)

    def release(self) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.rt.device))
        self.slot_free = event
        self._resolve_checks()

    def close(self) -> None:
        self.copy_stream.synchronize()
        self.decode_stream.synchronize()
        self.homes.clear()
        self.ring.clear()
