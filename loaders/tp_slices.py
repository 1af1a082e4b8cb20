"""Tensor-parallel slices in a container (format version 3): each rank of a TP run reads only its part.

``pack(model, out, tp_slices=S)`` stores each tensor that the model's tensor-parallel plan shards
(``loaders/tp.py``: :func:`~offload_runtime.loaders.tp.planned_shard_dims`), along a dimension ``dim``
whose size ``split * S`` divides, in ``S`` *slice groups* ``<group>#tp0`` ... ``<group>#tp<S-1>`` stored
right after the group. The group keeps its other tensors (possibly none) and a ``tp`` record: its logical
layout (every tensor whole) and which tensors are sliced, along which ``dim``, with which ``split``. Slice
``s`` holds, of every sliced tensor, exactly the shard rank ``s`` of ``S`` ranks holds: the ``s``-th of ``S``
pieces along ``dim`` of each of its ``split`` packed parts (``Shard(dim)`` for ``split == 1``,
``_StridedShard(dim, split)`` for a fused gate/up projection). Every slice being a group of its own,
chunk boundaries fall on slice boundaries with any codec, and its CRCs, tiers and decoders are a group's.

Reading (:func:`logical_groups`): without tensor parallelism every slice is read and every tensor
assembled whole, so the model sees what an unsliced container would give. Rank ``r`` of ``N`` ranks, ``N``
dividing ``S``, reads its group's unsliced tensors and slices ``[r*S/N, (r+1)*S/N)`` only, and sees its
*local* tensors. With ``S == N`` a rank's slice is its shard byte for byte: the slice group decodes
straight into place (a direct part, ``reassemble.py``); otherwise its pieces are copied into place. A
tensor the model shards but the container stores whole (an older container, an indivisible size) is read
whole and this rank's part copied out; one the model keeps whole but the container sliced is read from
every slice. A container sliced along another dimension than the model shards is refused
(:class:`CheckpointMismatchError`), never silently re-cut.

All byte movement is :func:`shard_places`: the rows of one shard of a tensor that fall in another shard.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from offload_runtime.errors import CheckpointMismatchError
from offload_runtime.loaders.format import GroupEntry, TpInfo, TpTensor, tp_slice_name
from offload_runtime.loaders.moe import parse_slice_name
from offload_runtime.loaders.reassemble import Fill, LogicalGroup, Place
from offload_runtime.native.layout import GroupLayout

MAX_TP_SLICES = 1024
Shard = tuple[int, int]  # (index, count): the index-th of count equal pieces (of every packed part)


def shard_places(
    shape: Sequence[int], itemsize: int, dim: int, split: int, src: Shard, dst: Shard
) -> list[Place]:
    """The byte copies moving what shard ``src`` of a tensor holds of shard ``dst`` into ``dst``'s buffer.

    A tensor of ``shape`` cut along ``dim``: that dimension holds ``split`` packed parts of equal size, and
    shard ``(i, n)`` is the ``i``-th of ``n`` equal pieces of *every* part, the parts' pieces one after
    another (``(0, 1)``: the whole tensor). Both buffers are the shards laid out row-major. One strided copy
    per part: ``prod(shape[:dim])`` rows of the overlap.

    Args:
        shape: the whole tensor's shape; ``itemsize``: its element size in bytes.
        dim, split: the dimension cut and its number of packed parts (``shape[dim]`` divisible by
            ``split * n`` for both shards).
        src, dst: the shards, as ``(index, count)``.

    Returns:
        `list[Place]`: offsets relative to each shard's first byte; empty when they do not overlap.
    """
    outer = math.prod(shape[:dim])
    inner = math.prod(shape[dim + 1 :]) * itemsize
    part = shape[dim] // split
    (si, sn), (di, dn) = src, dst
    if shape[dim] % split or part % sn or part % dn:
        raise ValueError(f"dimension {dim} of {tuple(shape)} does not divide into {split} x {sn} or {dn}")
    sw, dw = part // sn, part // dn  # piece widths, in elements of ``dim``
    lo, hi = max(si * sw, di * dw), min((si + 1) * sw, (di + 1) * dw)
    if hi <= lo or outer == 0 or inner == 0:
        return []
    return [
        Place(
            src=(q * sw + lo - si * sw) * inner,
            dst=(q * dw + lo - di * dw) * inner,
            rows=outer,
            row_bytes=(hi - lo) * inner,
            src_stride=split * sw * inner,
            dst_stride=split * dw * inner,
        ).compact()
        for q in range(split)
    ]


def sliced_shape(shape: Sequence[int], dim: int, count: int) -> tuple[int, ...]:
    """The shape of one of ``count`` shards of ``shape`` cut along ``dim``."""
    return (*shape[:dim], shape[dim] // count, *shape[dim + 1 :])


# -- packing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlicedGroup:
    """How ``pack`` stores one group with tensor-parallel slices.

    Attributes:
        tp: the group's ``tp`` record.
        base: the layout of the group's own (unsliced) tensors.
        slices: the layout of each slice group, ``slices[s]`` of ``<group>#tp<s>``.
    """

    tp: TpInfo
    base: GroupLayout
    slices: tuple[GroupLayout, ...]

    def fill_base(self, logical: torch.Tensor, out: torch.Tensor) -> None:
        """Copy the unsliced tensors from the group's logical bytes into the base layout's buffer."""
        _copy_tensors(self.tp.layout, logical, self.base, out)

    def fill_slice(self, index: int, logical: torch.Tensor, out: torch.Tensor) -> None:
        """Copy slice ``index`` of every sliced tensor from the logical bytes into that slice's buffer."""
        for t in self.tp.sliced:
            spec = self.tp.layout.spec(t.name)
            into = self.slices[index].spec(tp_slice_name(t.name, index))
            for p in shard_places(
                spec.shape, spec.torch_dtype.itemsize, t.dim, t.split, (0, 1), (index, self.tp.slices)
            ):
                p.moved(spec.offset, into.offset).copy(logical, out)


def slice_group(layout: GroupLayout, dims: Mapping[str, tuple[int, int]], slices: int) -> SlicedGroup | None:
    """How a group of logical ``layout`` is stored with ``slices`` slices, or None when nothing in it is
    sliced (the group is stored as without tensor parallelism).

    Args:
        layout: the group's logical layout.
        dims: tensor name -> ``(dim, split)`` the model's TP plan shards it along (others stay whole).
        slices: ``S``.
    """
    sliced = []
    for spec in layout.tensors:
        dim_split = dims.get(spec.name)
        if dim_split is None:
            continue
        dim, split = dim_split
        if dim < len(spec.shape) and spec.shape[dim] % (split * slices) == 0 and spec.nbytes:
            sliced.append(TpTensor(spec.name, dim, split))
    if not sliced:
        return None
    return expected_layouts(TpInfo(slices, layout, tuple(sliced)))


def expected_layouts(tp: TpInfo) -> SlicedGroup:
    """The base and slice layouts a ``tp`` record implies (what ``pack`` writes, the validator checks)."""
    cut = {t.name: t for t in tp.sliced}
    base = GroupLayout.from_shapes(
        (t.name, t.torch_dtype, t.shape) for t in tp.layout.tensors if t.name not in cut
    )
    slices = []
    for s in range(tp.slices):
        rows = []
        for t in tp.sliced:
            spec = tp.layout.spec(t.name)
            rows.append(
                (tp_slice_name(t.name, s), spec.torch_dtype, sliced_shape(spec.shape, t.dim, tp.slices))
            )
        slices.append(GroupLayout.from_shapes(rows))
    return SlicedGroup(tp, base, tuple(slices))


def _copy_tensors(
    src_layout: GroupLayout, src: torch.Tensor, dst_layout: GroupLayout, dst: torch.Tensor
) -> None:
    for spec in dst_layout.tensors:
        origin = src_layout.spec(spec.name)
        dst[spec.offset : spec.offset + spec.nbytes].copy_(src[origin.offset : origin.offset + origin.nbytes])


# -- reading --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankShards:
    """One rank's view of a tensor-parallel model: what each sharded tensor of it holds locally.

    Attributes:
        rank, world: this rank and the number of ranks.
        dims: model tensor name -> ``(dim, split)`` of its sharding; tensors not listed are whole.
    """

    rank: int
    world: int
    dims: Mapping[str, tuple[int, int]]

    @classmethod
    def from_specs(cls, rank: int, world: int, specs: Mapping) -> RankShards:
        """From ``loaders.tp.shard_specs(model)`` of the model built and sharded on ``meta``."""
        dims = {}
        for name, spec in specs.items():
            dim_split = spec.dim_split()
            if dim_split is not None:
                dims[name] = dim_split
        return cls(rank, world, dims)

    def of(self, tensor: str, group: str) -> tuple[int, int] | None:
        """``(dim, split)`` of a stored tensor; an expert's slice ``param[e]`` is cut like ``param``, one
        dimension lower."""
        sliced = parse_slice_name(tensor)
        if sliced is None:
            return self.dims.get(tensor)
        dim_split = self.dims.get(sliced[0])
        if dim_split is None:
            return None
        if dim_split[0] == 0:
            raise CheckpointMismatchError(
                "the model shards its experts across ranks (expert parallelism), which is not supported",
                group=group,
                actual=f"{sliced[0]} sharded along dimension 0",
                hint="use a tensor parallel plan that shards each expert's weights",
            )
        return dim_split[0] - 1, dim_split[1]


def logical_groups(groups: Sequence[GroupEntry], shards: RankShards | None = None) -> list[LogicalGroup]:
    """The stored ``groups`` as the groups a runtime reads: each group with its slices as one group of whole
    tensors (``shards`` None), or of this rank's local tensors; slice groups gone."""
    slices: dict[str, dict[int, GroupEntry]] = {}
    for g in groups:
        if g.tp_slice is not None:
            slices.setdefault(g.tp_slice.group, {})[g.tp_slice.index] = g
    out = []
    for g in groups:
        if g.tp_slice is not None:
            continue
        if g.tp is None and shards is None:
            out.append(LogicalGroup.stored(g))
        else:
            out.append(_logical(g, slices.get(g.name, {}), shards))
    return out


def _logical(base: GroupEntry, slices: Mapping[int, GroupEntry], shards: RankShards | None) -> LogicalGroup:
    cut = {t.name: t for t in base.tp.sliced} if base.tp is not None else {}
    count = base.tp.slices if base.tp is not None else 1
    rank, world = (shards.rank, shards.world) if shards is not None else (0, 1)
    if cut and count % world:
        raise CheckpointMismatchError(
            f"the container has {count} tensor-parallel slices, which {world} ranks cannot share",
            group=base.name,
            expected=f"a number of ranks dividing {count}",
            actual=world,
            hint=f"run on a divisor of {count} ranks, or re-pack with tp_slices a multiple of {world}",
        )
    whole = [t for t in base.logical_layout.tensors if t.name not in cut]
    order = whole + [base.tp.layout.spec(t.name) for t in base.tp.sliced] if cut else whole
    tensors, base_fills, slice_fills = [], [], {s: [] for s in slices}
    for spec in order:
        need = shards.of(spec.name, base.name) if shards is not None else None
        stored = cut.get(spec.name)
        itemsize = spec.torch_dtype.itemsize
        if stored is not None and need is not None and need != (stored.dim, stored.split):
            raise CheckpointMismatchError(
                "the container slices a tensor along another dimension than the model shards it",
                group=base.name,
                expected=f"{spec.name} cut along dimension {need[0]} (split {need[1]})",
                actual=f"sliced along dimension {stored.dim} (split {stored.split})",
                hint="re-pack the checkpoint with this version of transformers",
            )
        if need is None and stored is None:  # whole in the container, whole in the model
            tensors.append((spec.name, spec.torch_dtype, tuple(spec.shape)))
            base_fills.append(Fill(spec.name, Place.flat(base.layout.spec(spec.name).offset, 0, spec.nbytes)))
            continue
        dim, split = need or (stored.dim, stored.split)
        mine = (rank, world) if need is not None else (0, 1)
        if need is not None and spec.shape[dim] % (split * world):
            raise CheckpointMismatchError(
                "a sharded tensor does not divide evenly between the ranks",
                group=base.name,
                expected=f"dimension {dim} of {spec.name} divisible by {split * world}",
                actual=list(spec.shape),
            )
        tensors.append((spec.name, spec.torch_dtype, sliced_shape(spec.shape, dim, mine[1])))
        if stored is None:
            origin = base.layout.spec(spec.name).offset
            for p in shard_places(spec.shape, itemsize, dim, split, (0, 1), mine):
                base_fills.append(Fill(spec.name, p.moved(origin, 0)))
            continue
        for s, entry in slices.items():
            origin = entry.layout.spec(tp_slice_name(spec.name, s)).offset
            for p in shard_places(spec.shape, itemsize, dim, split, (s, count), mine):
                slice_fills[s].append(Fill(spec.name, p.moved(origin, 0)))
    fills = [(base, base_fills)] if base_fills else []
    fills += [(slices[s], slice_fills[s]) for s in sorted(slices) if slice_fills[s]]
    return LogicalGroup(base, tensors, fills)
