"""What the planner knows about a group, measured from a source without allocating anything.

Sizes are as the runtime's arena will charge them (every piece rounded to :data:`ARENA_ALIGN`), so the plan's
device bytes are exactly what the arena holds. On CUDA a group also carries what its GPU decoder takes:
its own arrays (``scratch_bytes``, from the codec's size query) and the shared decode workspace per kind.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

import torch

from offload_runtime.loaders.format import GroupEntry
from offload_runtime.native import get_codec
from offload_runtime.native.base import DecoderSizes
from offload_runtime.scheduler.arena import arena_size


@dataclass(frozen=True)
class GroupSize:
    """What the planner needs to know about one group.

    Attributes:
        name: the group's name.
        decoded_bytes: size of the decoded group (its slot size).
        stored_bytes: size of its compressed payload.
        scratch_bytes: device memory its GPU decoder holds for this group alone (0 on the CPU); decoders
            of streamed groups live as long as the runtime, so each one's scratch counts.
        workspace: ``(kind, bytes)`` pairs of the shared decode workspace one decode of this group needs
            (nvCOMP temp space, int8 stored bytes). Decodes are serialised on one stream, so the runtime
            keeps one buffer per kind, as large as the largest need: charged once.
        decodes_on_cpu: its codec has a CPU decoder, so making it resident needs no device scratch.
        executable: its linear layers can compute from its payload (the ``executed_compressed`` tier).
        compute_scratch_bytes: device memory its layers' kernels may take when it is executed compressed
            (the codec's :meth:`~offload_runtime.native.base.GroupCodec.compute_scratch_bytes`; 0 unless
            ``executable``). Its layers run one after another on the compute stream, so the runtime's
            executed groups share one such buffer: the plan charges the largest once.
    """

    name: str
    decoded_bytes: int
    stored_bytes: int
    scratch_bytes: int = 0
    workspace: tuple[tuple[str, int], ...] = ()
    decodes_on_cpu: bool = True
    executable: bool = False
    compute_scratch_bytes: int = 0


def measure_group(entry: GroupEntry, device: torch.device, executable: bool = False) -> GroupSize:
    """The :class:`GroupSize` of ``entry`` as the runtime on ``device`` will allocate it (pure queries)."""
    codec = get_codec(entry.codec)
    decoded, stored = arena_size(entry.decoded_size), arena_size(entry.stored_size)
    on_cpu = codec.decodes_on_cpu(entry.params)
    compute = (
        arena_size(codec.compute_scratch_bytes(entry.params, entry.layout, entry.chunks)) if executable else 0
    )
    if device.type != "cuda":
        return GroupSize(
            entry.name,
            decoded,
            stored,
            decodes_on_cpu=on_cpu,
            executable=executable,
            compute_scratch_bytes=compute,
        )
    sizes = codec.gpu_decoder_sizes(entry.chunks, entry.params, entry.layout)
    scratch, workspace = arena_decoder_sizes(sizes)
    return GroupSize(entry.name, decoded, stored, scratch, workspace, on_cpu, executable, compute)


def arena_decoder_sizes(sizes: DecoderSizes) -> tuple[int, tuple[tuple[str, int], ...]]:
    """A decoder's own arrays (summed) and its ``(kind, bytes)`` workspace needs, as the arena charges
    them (kinds that need nothing are left out: they take no piece)."""
    pieces = sum(arena_size(piece) for piece in sizes.pieces)
    return pieces, tuple(sorted((kind, arena_size(n)) for kind, n in sizes.workspace if n > 0))


def measure_groups(
    entries: Iterable[GroupEntry], device: torch.device, executable: Collection[str] = ()
) -> list[GroupSize]:
    """:func:`measure_group` of every entry, in order; ``executable`` names the groups whose linear layers
    may compute from their payload."""
    return [measure_group(entry, device, entry.name in executable) for entry in entries]
