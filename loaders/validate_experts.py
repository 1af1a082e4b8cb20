"""Validation of the expert records of an untrusted index (format version 2; see ``FORMAT.md``).

An expert group's record tells a runtime where each of its tensors goes: slice ``index`` of a stacked
parameter of an experts module. A forged record could make it write out of a slot's bounds or leave a
slice unwritten, so everything is checked before any payload is read: types, the index in range, each slice
shape equal to the stacked shape without its first dimension, the first dimension equal to the number of
experts, one slice per layout tensor, every expert of a module present exactly once with the same
stacked parameters, and an owning (non-expert) group whose name prefixes the module's path.
"""

from __future__ import annotations

from typing import Any

from offload_runtime.errors import CorruptCheckpointError
from offload_runtime.loaders.format import ExpertInfo, ExpertSlice, GroupEntry
from offload_runtime.loaders.validate_fields import typed

MAX_EXPERTS = 1 << 16  # far above any model (DeepSeek-V3: 256), far below a forged 2**62


def parse_expert(value: Any, entry: GroupEntry, path: str) -> ExpertInfo:
    """The :class:`ExpertInfo` of expert group ``entry`` from its JSON ``value``, checked against its layout.

    Raises:
        CorruptCheckpointError: naming the file and group.
    """

    def fail(message: str, **fields: Any) -> CorruptCheckpointError:
        hint = "re-pack the checkpoint"
        return CorruptCheckpointError(message, file=path, group=entry.name, hint=hint, **fields)

    try:
        rows = typed(value["slices"], list)
        info = ExpertInfo(
            module=typed(value["module"], str),
            index=typed(value["index"], int),
            num_experts=typed(value["num_experts"], int),
            slices=tuple(
                ExpertSlice(
                    tensor=typed(r["tensor"], str),
                    param=typed(r["param"], str),
                    index=typed(r["index"], int),
                    shape=tuple(typed(d, int) for d in typed(r["shape"], list)),
                )
                for r in rows
            ),
        )
    except (KeyError, TypeError) as exc:
        raise fail(f"malformed expert record ({type(exc).__name__}: {exc})") from None
    if not 1 <= info.num_experts <= MAX_EXPERTS:
        raise fail(
            "expert record's num_experts is out of range",
            expected=f"1..{MAX_EXPERTS}",
            actual=info.num_experts,
        )
    if not 0 <= info.index < info.num_experts:
        raise fail(
            "expert index out of range", expected=f"0 <= index < {info.num_experts}", actual=info.index
        )
    layout = entry.logical_layout  # its tensors whole, wherever tensor-parallel slices store them
    names = [t.name for t in layout.tensors]
    if [s.tensor for s in info.slices] != names:
        raise fail(
            "expert slices do not name the group's layout tensors, one each, in order",
            expected=names,
            actual=[s.tensor for s in info.slices],
        )
    for s, spec in zip(info.slices, layout.tensors, strict=True):
        if s.index != info.index:
            raise fail(f"slice {s.tensor!r} is of another expert", expected=info.index, actual=s.index)
        if not s.param.startswith(info.module + "."):
            raise fail(f"stacked parameter {s.param!r} is not in the experts module {info.module!r}")
        if len(s.shape) < 2 or s.shape[0] != info.num_experts or s.shape[1:] != tuple(spec.shape):
            raise fail(
                f"slice {s.tensor!r} does not fit its stacked parameter {s.param!r}",
                expected=f"stacked shape [{info.num_experts}, *{list(spec.shape)}]",
                actual=list(s.shape),
            )
    if len({s.param for s in info.slices}) != len(info.slices):
        raise fail("expert group holds two slices of one stacked parameter")
    return info


def check_expert_groups(entries: list[GroupEntry], path: str) -> None:
    """Check the expert groups of an index together: each module's experts complete and consistent.

    Raises:
        CorruptCheckpointError: naming the file and the first offending group.
    """
    modules: dict[str, list[GroupEntry]] = {}
    for entry in entries:
        if entry.expert is not None:
            modules.setdefault(entry.expert.module, []).append(entry)
    if not modules:
        return
    stored = {spec.name for e in entries for spec in e.logical_layout.tensors}
    aliases = {name for e in entries for pair in e.aliases.items() for name in pair}
    owners = {e.name for e in entries if e.expert is None}
    for module, experts in modules.items():
        first = experts[0]
        signature = _signature(first)
        seen: dict[int, str] = {}
        for entry in experts:
            info = entry.expert
            if info.index in seen:
                raise CorruptCheckpointError(
                    f"expert {info.index} of {module!r} is stored twice",
                    file=path,
                    group=entry.name,
                    actual=f"also in {seen[info.index]}",
                    hint="re-pack the checkpoint",
                )
            seen[info.index] = entry.name
            if _signature(entry) != signature:
                raise CorruptCheckpointError(
                    f"expert {info.index} of {module!r} disagrees with expert {first.expert.index} on the "
                    "stacked parameters (names, shapes, dtypes or number of experts)",
                    file=path,
                    group=entry.name,
                    expected=signature,
                    actual=_signature(entry),
                    hint="re-pack the checkpoint",
                )
        missing = sorted(set(range(first.expert.num_experts)) - set(seen))
        if missing:
            raise CorruptCheckpointError(
                f"experts module {module!r} lacks experts {missing[:8]}",
                file=path,
                group=first.name,
                expected=f"{first.expert.num_experts} experts",
                actual=f"{len(seen)} stored",
                hint="re-pack the checkpoint",
            )
        for s in first.expert.slices:
            if s.param in stored or s.param in aliases:
                raise CorruptCheckpointError(
                    f"stacked parameter {s.param!r} is also stored whole or tied",
                    file=path,
                    group=first.name,
                    hint="re-pack the checkpoint",
                )
        if not any(module.startswith(owner + ".") for owner in owners):
            raise CorruptCheckpointError(
                f"experts module {module!r} has no owning group (a group whose name prefixes its path)",
                file=path,
                group=first.name,
                hint="re-pack the checkpoint",
            )


def _signature(entry: GroupEntry) -> list:
    info = entry.expert
    dtypes = [t.dtype for t in entry.logical_layout.tensors]
    stacked = [(s.param, list(s.shape), d) for s, d in zip(info.slices, dtypes, strict=True)]
    return [info.num_experts, *stacked]
