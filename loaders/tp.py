"""Tensor-parallel models: the runtime works on each rank's local shards, the model keeps its DTensors.

Under transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` or
``distributed_config=DistributedConfig(tp_size=N)``, transformers 5.17 to 5.24 at least), each parameter the
plan shards is a ``DTensor`` whose local tensor is this rank's shard (``Shard(d)``, or ``_StridedShard(d,
sf)`` for packed gate/up projections); the others stay plain tensors, whole on every rank. The modules' TP
forwards run their kernels on ``to_local()`` and reduce across ranks themselves.

So everything offload_runtime does with weights (group, pack, plan, stream into slots) is done on the
**local** tensors: each rank packs, plans and streams only its shards, within its own budget, through its
own device's link. Placements matter only at the model's edge. The protocol:

1. before anything is rebound, :func:`shard_specs` records each DTensor's mesh, placements, global shape
   and stride (:class:`ShardSpec`);
2. whoever reads tensors (``find_groups``' expert shapes, ``pack``, ``check_compatible``, the early budget
   check) reads :func:`local_state_dict`;
3. a runtime view bound into the model is wrapped back by :func:`as_model_tensor`: a DTensor with the same
   placements whose local tensor *is* the view, so the TP forward's ``to_local()`` reads the slot.

:func:`shard_empty_model` shards a model built on ``meta`` (``load_compressed``) with the model's own TP
plan, through the same two calls ``from_pretrained`` makes, so both paths place every parameter alike.
Only ``torch.distributed`` is used: the default process group, one mesh dimension.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ShardSpec:
    """How one DTensor parameter or buffer is laid over the ranks.

    Attributes:
        mesh: its ``DeviceMesh``.
        placements: its placements (``(Shard(0),)``, ``(_StridedShard(dim=1, sf=2),)``, ...).
        shape: the global shape; ``stride``: the global stride.
        local_shape: this rank's shard's shape.
    """

    mesh: Any
    placements: tuple
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    local_shape: tuple[int, ...]

    def dim_split(self) -> tuple[int, int] | None:
        """``(dim, split)`` of a one-dimensional sharding (``Shard(d)``: split 1, ``_StridedShard(d, sf)``:
        split ``sf``), or None when the tensor is whole on every rank (``Replicate``)."""
        if len(self.placements) != 1:
            raise ValueError(f"only one-dimensional tensor parallel meshes are supported: {self.placements}")
        placement = self.placements[0]
        split = getattr(placement, "split_factor", None)  # _StridedShard is no Shard in torch 2.13
        if not (placement.is_shard() or split is not None):
            return None
        return placement.dim % len(self.shape), int(split or 1)


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (without importing it when unused)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's local tensor of a DTensor; any other tensor as is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def local_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=True)`` with every DTensor replaced by its local tensor (same objects
    for tied names, so ties stay visible)."""
    out, seen = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if is_dtensor(tensor):
            tensor = seen.setdefault(id(tensor), tensor.to_local())
        out[name] = tensor
    return out


def shard_specs(model: nn.Module) -> dict[str, ShardSpec]:
    """The :class:`ShardSpec` of every DTensor parameter and buffer of ``model`` (tied names included);
    empty for a model that is not tensor parallel."""
    specs = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if is_dtensor(tensor):
            specs[name] = ShardSpec(
                tensor.device_mesh,
                tuple(tensor.placements),
                tuple(tensor.shape),
                tuple(tensor.stride()),
                tuple(tensor.to_local().shape),
            )
    return specs


def as_model_tensor(view: torch.Tensor, spec: ShardSpec | None) -> torch.Tensor:
    """``view`` as the model expects it: a DTensor of ``spec`` whose local tensor is ``view`` (no copy),
    or ``view`` itself for a tensor that is not sharded."""
    if spec is None:
        return view
    from torch.distributed.tensor import DTensor

    if tuple(view.shape) != spec.local_shape:
        raise ValueError(f"local shard is {tuple(view.shape)}, its placement needs {spec.local_shape}")
    return DTensor.from_local(
        view, spec.mesh, spec.placements, run_check=False, shape=torch.Size(spec.shape), stride=spec.stride
    )


def tp_world() -> tuple[int, int] | None:
    """``(rank, world size)`` of the default process group when one is initialised with more than one rank,
    else None."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.get_rank(), dist.get_world_size()


def tp_requested(tensor_parallel: bool | None) -> bool:
    """Whether a dispatch asked to shard its model: ``tensor_parallel``, or when it is None whether a
    process group of several ranks exists (:func:`tp_world`)."""
    return bool(tensor_parallel) or (tensor_parallel is None and tp_world() is not None)


def ranks_on_this_host() -> int:
    """How many ranks share this host's RAM (``LOCAL_WORLD_SIZE``, set by ``torchrun``; 1 otherwise)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def shard_empty_model(model: nn.Module) -> nn.Module:
    """Apply the model's own tensor-parallel plan over the default process group to ``model`` (built on
    ``meta``): exactly what ``from_pretrained(..., distributed_config=DistributedConfig(tp_size=N))`` does
    before it loads weights (the same two transformers calls; their signatures agree from 5.17 to 5.24).

    Raises:
        ValueError: the model has no tensor parallel plan.
    """
    from transformers.distributed import DistributedConfig

    world = tp_world()
    if world is None:
        return model
    if not getattr(model, "tp_plan", None):
        raise ValueError(f"{type(model).__name__} has no tensor parallel plan (tp_plan)")
    cls = type(model)
    config, _, mesh = cls.prepare_distribute_model(DistributedConfig(tp_size=world[1]))
    return cls.maybe_distribute_model(model, config, mesh)


def planned_shard_dims(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Parameter name -> ``(dim, split)`` along which ``model``'s own tensor-parallel plan would shard it,
    read from the plan's style names without applying it (``pack(..., tp_slices=S)`` works on a model that
    is not distributed). Parameters the plan keeps whole are absent; so are styles this table does not
    know (their tensors are stored whole, and a rank that needs a shard of one reads it whole).

    The table is what ``shard_param`` of transformers' styles does (5.17 to 5.24): column-wise ``Shard(ndim
    - 2)`` (a bias: dim 0; an embedding: dim 1), row-wise ``Shard(-1)`` (a bias whole; an embedding: dim 0),
    packed ones ``_StridedShard`` with the style's ``split_factor``, vocabulary-parallel embeddings dim 0. At
    load time the placements of the model actually sharded are what counts (``tp_slices.RankShards``); a
    disagreement is refused there, never silently re-cut.
    """
    plan = dict(getattr(model, "tp_plan", None) or {})
    if not plan:
        return {}
    out = {}
    for module_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            name = f"{module_name}.{attr}" if module_name else attr
            style = _style_of(name, plan)
            if style is not None:
                dim_split = _style_dim(style, module, attr, param.dim())
                if dim_split is not None:
                    out[name] = dim_split
    return out


def _style_of(name: str, plan: dict[str, str]) -> str | None:
    """The plan's style for parameter ``name``: its own rule, else its module's (transformers' matching)."""
    generic = re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name)
    if generic in plan:
        return plan[generic]
    return plan.get(generic.rsplit(".", 1)[0]) if "." in generic else None


def _style_dim(style: str, module: nn.Module, attr: str, ndim: int) -> tuple[int, int] | None:
    embedding = isinstance(module, nn.Embedding)
    if style == "embedding_rowwise":
        return 0, 1
    if style == "embedding_colwise":
        return 1, 1
    if style in ("packed_colwise", "packed_rowwise"):
        split = _split_factor(style)
        if ndim == 1:
            return (0, 1) if style == "packed_colwise" else None
        return (ndim - 2, split) if style == "packed_colwise" else (ndim - 1, split)
    if style.startswith("colwise"):
        return (1, 1) if embedding else (max(ndim - 2, 0), 1)
    if style.startswith("rowwise"):
        if embedding:
            return 0, 1
        return None if attr == "bias" or ndim == 1 else (ndim - 1, 1)
    return None


def _split_factor(style: str) -> int:
    try:
        from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

        return int(getattr(ALL_PARALLEL_STYLES[style], "split_factor", 2))
    except (ImportError, KeyError):
        return 2
