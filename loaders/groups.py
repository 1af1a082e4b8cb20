"""Split a model into *groups*: the unit that is stored, streamed and decoded together.

Each transformer block (an element of the decoder's ``ModuleList``) is one group; every other module
that owns parameters or persistent buffers directly (embeddings, final norm, LM head, pooler, ...) is a
group of its own. Tied weights (an LM head sharing the embedding matrix) are stored once, in the group
of the first name under which they appear, and the group records the alias so loading re-ties them and
the scheduler knows that the alias's module also needs that group.

With ``experts=True`` (what ``pack`` uses), every routed expert of a mixture-of-experts block is a group
of its own (``kind="expert"``, named ``<experts module>.<e>``, right after its block): its tensors are the
slices ``param[e]`` of the experts module's stacked parameters (see ``moe.py``), and the block's group
keeps the rest (attention, norms, router, shared experts).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from offload_runtime.loaders.format import ExpertInfo, ExpertSlice
from offload_runtime.loaders.moe import ExpertsModule, find_expert_modules, slice_name


@dataclass
class GroupSpec:
    """One group of a model.

    Attributes:
        name: the module path of the group (``"model.layers.3"``, ``"lm_head"``,
            ``"model.layers.3.mlp.experts.5"``).
        kind: ``"block"`` for a transformer block, ``"expert"`` for one routed expert, ``"module"`` for
            any other module.
        tensors: full state-dict names of the parameters and persistent buffers stored in this group; for
            an expert, the slice names ``"<param>[<e>]"``.
        users: module paths whose forward reads this group's tensors: the group's module first, then the
            modules that own a tied alias of one of its tensors.
        aliases: tied names that are not stored (``"lm_head.weight"``) -> the stored name they share.
        expert: for an expert group, which slices of which stacked parameters it holds.
    """

    name: str
    kind: str
    tensors: list[str]
    users: list[str]
    aliases: dict[str, str] = field(default_factory=dict)
    expert: ExpertInfo | None = None


def find_block_list(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The decoder/encoder's list of transformer blocks, or ``None`` when the model has none.

    Prefers the ``ModuleList`` whose elements are of a class listed in ``model._no_split_modules`` (what
    transformers and accelerate use to mark blocks); else the ``ModuleList`` holding the most parameters.
    """
    no_split = set(getattr(model, "_no_split_modules", None) or [])
    candidates = [
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod)
    ]
    marked = [(n, m) for n, m in candidates if type(m[0]).__name__ in no_split]
    pool = marked or candidates
    if not pool:
        return None
    return max(pool, key=lambda nm: sum(p.numel() for p in nm[1].parameters()))


def _persistent_buffers(module: nn.Module, prefix: str) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, buf in module.named_buffers(recurse=False):
        if buf is not None and name not in module._non_persistent_buffers_set:
            out.append((f"{prefix}.{name}" if prefix else name, buf))
    return out


def find_groups(model: nn.Module, *, experts: bool = False) -> list[GroupSpec]:
    """Split ``model`` into groups, in module registration order (which is execution order for HF models).

    Args:
        model (`nn.Module`): the model, on any device (``meta`` included).
        experts (`bool`, defaults to `False`): make each routed expert of an experts module inside a block
            a group of its own, placed after its block's group (what ``pack`` stores); else experts stay in
            their block's group (the granularity the block runtime streams).

    Returns:
        `list[GroupSpec]`: every parameter and persistent buffer belongs to exactly one group, either
        stored in it (whole, or as one slice per expert group) or as an alias of a tensor stored in
        another group.
    """
    blocks = find_block_list(model)
    block_prefix = blocks[0] if blocks else None
    block_names = {f"{block_prefix}.{i}" for i in range(len(blocks[1]))} if blocks else set()

    def group_of(module_path: str) -> tuple[str, str]:
        if block_prefix is not None and module_path.startswith(block_prefix + "."):
            index = module_path[len(block_prefix) + 1 :].split(".", 1)[0]
            return f"{block_prefix}.{index}", "block"
        return module_path, "module"

    groups: dict[str, GroupSpec] = {}
    stored_as: dict[int, tuple[str, str]] = {}  # id(tensor) -> (stored name, group)
    for module_path, module in model.named_modules(remove_duplicate=False):
        own = [
            (f"{module_path}.{n}" if module_path else n, p) for n, p in module.named_parameters(recurse=False)
        ]
        own += _persistent_buffers(module, module_path)
        for full_name, tensor in own:
            group_name, kind = group_of(module_path)
            key = id(tensor)
            if key in stored_as:
                canonical, owner = stored_as[key]
                if canonical == full_name:
                    continue  # the same module reached twice through a shared submodule
                groups[owner].aliases[full_name] = canonical
                if module_path not in groups[owner].users:
                    groups[owner].users.append(module_path)
                continue
            spec = groups.setdefault(group_name, GroupSpec(group_name, kind, [], [group_name]))
            spec.tensors.append(full_name)
            stored_as[key] = (full_name, group_name)
    # blocks first appear in order; keep registration order overall but make sure every block exists
    missing = block_names - set(groups)
    if missing:
        raise ValueError(f"blocks without parameters cannot be grouped: {sorted(missing)}")
    if not experts:
        return list(groups.values())
    return _split_experts(model, list(groups.values()), block_names)


def _split_experts(model: nn.Module, specs: list[GroupSpec], block_names: set[str]) -> list[GroupSpec]:
    """Move the stacked parameters of each experts module inside a block into one group per expert."""
    by_block: dict[str, list[ExpertsModule]] = {}
    for module in find_expert_modules(model):
        owner = next((b for b in block_names if module.path.startswith(b + ".")), None)
        if owner is not None:
            by_block.setdefault(owner, []).append(module)
    tied = {name for spec in specs for pair in spec.aliases.items() for name in pair}
    out = []
    for spec in specs:
        modules = [
            m
            for m in by_block.get(spec.name, [])
            if not any(m.param_name(a) in tied for a in m.params)  # a tied stack stays whole
        ]
        stacked = {m.param_name(a) for m in modules for a in m.params}
        spec.tensors = [t for t in spec.tensors if t not in stacked]
        out.append(spec)
        for module in modules:
            out.extend(_expert_specs(model, module))
    return out


def _expert_specs(model: nn.Module, module: ExpertsModule) -> list[GroupSpec]:
    shapes = {a: tuple(model.get_parameter(module.param_name(a)).shape) for a in module.params}
    specs = []
    for e in range(module.num_experts):
        slices = tuple(
            ExpertSlice(slice_name(module.param_name(a), e), module.param_name(a), e, shapes[a])
            for a in module.params
        )
        info = ExpertInfo(module.path, e, module.num_experts, slices)
        name = f"{module.path}.{e}"
        specs.append(GroupSpec(name, "expert", [s.tensor for s in slices], [module.path], expert=info))
    return specs
