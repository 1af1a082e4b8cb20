"""Split a model into *groups*: the unit that is stored, streamed and decoded together.

Each transformer block (an element of the decoder's ``ModuleList``) is one group; every other module
that owns parameters or persistent buffers directly (embeddings, final norm, LM head, pooler, ...) is a
group of its own. Tied weights (an LM head sharing the embedding matrix) are stored once, in the group
of the first name under which they appear, and the group records the alias so loading re-ties them and
the scheduler knows that the alias's module also needs that group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class GroupSpec:
    """One group of a model.

    Attributes:
        name: the module path of the group (``"model.layers.3"``, ``"lm_head"``).
        kind: ``"block"`` for a transformer block, ``"module"`` for any other module.
        tensors: full state-dict names of the parameters and persistent buffers stored in this group.
        users: module paths whose forward reads this group's tensors: the group's module first, then the
            modules that own a tied alias of one of its tensors.
        aliases: tied names that are not stored (``"lm_head.weight"``) -> the stored name they share.
    """

    name: str
    kind: str
    tensors: list[str]
    users: list[str]
    aliases: dict[str, str] = field(default_factory=dict)


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


def find_groups(model: nn.Module) -> list[GroupSpec]:
    """Split ``model`` into groups, in module registration order (which is execution order for HF models).

    Args:
        model (`nn.Module`): the model, on any device (``meta`` included).

    Returns:
        `list[GroupSpec]`: every parameter and persistent buffer belongs to exactly one group, either
        stored in it or as an alias of a tensor stored in another group.
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
    return list(groups.values())
