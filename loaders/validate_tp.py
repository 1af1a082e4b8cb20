"""Validation of the tensor-parallel records of an untrusted index (format version 3; see ``FORMAT.md``).

A ``tp`` record tells a reader which tensors of a group live in slice groups and how to cut them; a
``tp_slice`` record which slice a slice group holds. A forged record could make a reader copy out of a
slot's bounds or leave bytes unwritten, so everything is checked before any payload is read: types and
ranges, each sliced tensor in the logical layout once, in order, its dimension divisible into the slices
(times its packed parts), the group's own layout exactly its unsliced tensors, and the ``S`` slice groups
following the group in order, each named ``<group>#tp<s>``, with the users of the group, no aliases and
exactly the layout the record implies.
"""

from __future__ import annotations

from typing import Any

from offload_runtime.errors import CorruptCheckpointError
from offload_runtime.loaders.format import TP_SLICE_KIND, GroupEntry, TpInfo, TpSlice, TpTensor, tp_slice_name
from offload_runtime.loaders.tp_slices import MAX_TP_SLICES, expected_layouts
from offload_runtime.loaders.validate_fields import parse_layout, typed
from offload_runtime.native.layout import GroupLayout

MAX_SPLIT = 64  # packed parts of one dimension (fused gate/up: 2); far below a forged 2**62


def _fail(message: str, entry: GroupEntry, path: str, **fields: Any) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        message, file=path, group=entry.name, hint="re-pack the checkpoint", **fields
    )


def parse_tp(value: Any, entry: GroupEntry, path: str) -> TpInfo:
    """The :class:`TpInfo` of ``entry`` from its JSON ``value`` (the layouts it implies are checked by
    :func:`check_tp_groups`).

    Raises:
        CorruptCheckpointError: naming the file and group.
    """
    try:
        rows = typed(value["sliced"], list)
        layout = parse_layout(value["layout"], path, entry.name, "tp layout")
        info = TpInfo(
            slices=typed(value["slices"], int),
            layout=layout,
            sliced=tuple(
                TpTensor(typed(r["name"], str), typed(r["dim"], int), typed(r["split"], int)) for r in rows
            ),
        )
    except CorruptCheckpointError:
        raise
    except (KeyError, TypeError) as exc:
        raise _fail(f"malformed tp record ({type(exc).__name__}: {exc})", entry, path) from None
    if entry.kind == TP_SLICE_KIND:
        raise _fail("a slice group cannot itself be sliced", entry, path)
    if not 2 <= info.slices <= MAX_TP_SLICES:
        raise _fail(
            "tp record's number of slices is out of range",
            entry,
            path,
            expected=f"2..{MAX_TP_SLICES}",
            actual=info.slices,
        )
    if not info.sliced:
        raise _fail("tp record slices no tensor", entry, path)
    order = {t.name: i for i, t in enumerate(info.layout.tensors)}
    last = -1
    for t in info.sliced:
        if order.get(t.name, -1) <= last:
            raise _fail(
                f"sliced tensor {t.name!r} is not in the tp layout, or not once and in layout order",
                entry,
                path,
            )
        last = order[t.name]
        spec = info.layout.spec(t.name)
        if not 0 <= t.dim < len(spec.shape) or not 1 <= t.split <= MAX_SPLIT:
            raise _fail(
                f"sliced tensor {t.name!r} has an invalid dim or split",
                entry,
                path,
                expected=f"0 <= dim < {len(spec.shape)}, 1 <= split <= {MAX_SPLIT}",
                actual=f"dim {t.dim}, split {t.split}",
            )
        if spec.nbytes == 0 or spec.shape[t.dim] % (t.split * info.slices):
            raise _fail(
                f"sliced tensor {t.name!r} does not divide into its slices",
                entry,
                path,
                expected=f"dimension {t.dim} divisible by {t.split * info.slices}",
                actual=list(spec.shape),
            )
    return info


def parse_tp_slice(value: Any, entry: GroupEntry, path: str) -> TpSlice:
    """The :class:`TpSlice` of slice group ``entry`` from its JSON ``value`` (checked with its group by
    :func:`check_tp_groups`)."""
    try:
        return TpSlice(typed(value["group"], str), typed(value["index"], int))
    except (KeyError, TypeError) as exc:
        raise _fail(f"malformed tp_slice record ({type(exc).__name__}: {exc})", entry, path) from None


def check_tp_groups(entries: list[GroupEntry], path: str) -> None:
    """Every sliced group has its unsliced tensors and is followed by its slices, in order, each as its
    record implies; no other slice.

    Raises:
        CorruptCheckpointError: naming the file and the first offending group.
    """
    expected_at: dict[int, tuple[GroupEntry, int, GroupLayout]] = {}
    for position, entry in enumerate(entries):
        if entry.tp is None:
            continue
        expected = expected_layouts(entry.tp)
        message = "the group's layout is not the tp layout's unsliced tensors"
        _check_layout(entry, expected.base, message, path)
        for s, layout in enumerate(expected.slices):
            expected_at[position + 1 + s] = (entry, s, layout)
    for position, entry in enumerate(entries):
        want = expected_at.get(position)
        if entry.tp_slice is None:
            if want is not None:
                base, s, _ = want
                raise _fail(
                    f"slice {s} of {base.name!r} is missing (its slices follow it in order)",
                    entry,
                    path,
                    expected=tp_slice_name(base.name, s),
                )
            continue
        if want is None:
            raise _fail(
                "slice group is not right after the group it slices",
                entry,
                path,
                actual=f"slice {entry.tp_slice.index} of {entry.tp_slice.group!r}",
            )
        base, s, layout = want
        if (entry.tp_slice.group, entry.tp_slice.index) != (base.name, s) or entry.name != tp_slice_name(
            base.name, s
        ):
            raise _fail(
                "slice group is out of order or misnamed",
                entry,
                path,
                expected=f"{tp_slice_name(base.name, s)}: slice {s} of {base.name!r}",
                actual=f"slice {entry.tp_slice.index} of {entry.tp_slice.group!r}",
            )
        if entry.users != base.users or entry.aliases or entry.expert is not None:
            raise _fail("a slice group has its group's users, no aliases and no expert record", entry, path)
        _check_layout(entry, layout, "slice group's layout is not what its group's tp record implies", path)


def _check_layout(entry: GroupEntry, want: GroupLayout, message: str, path: str) -> None:
    if entry.layout != want:
        raise _fail(message, entry, path, expected=want.to_json(), actual=entry.layout.to_json())
