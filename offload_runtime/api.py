"""Public API: run a model whose weights stream, compressed, through a fixed memory budget.

``dispatch_compressed`` attaches the runtime to a model (packing its weights first when no container is
given), ``load_compressed`` builds the model from a container, ``remove_offload`` undoes either.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from offload_runtime import compressed_linear
from offload_runtime.display import ReadProgress
from offload_runtime.errors import BudgetError
from offload_runtime.expert_dispatch import (
    ExpertOptions,
    dispatch_options,
    expert_granularity,
    experts_budget_error,
    prepare_experts,
)
from offload_runtime.hooks import GroupHook, attached_hooks
from offload_runtime.loaders import (
    ContainerReader,
    build_empty_model,
    check_compatible,
    load_tokenizer,
    pack,
)
from offload_runtime.loaders.source import GroupSource
from offload_runtime.loaders.tp import (
    ShardSpec,
    as_model_tensor,
    local_state_dict,
    ranks_on_this_host,
    shard_empty_model,
    shard_specs,
    tp_requested,
    tp_world,
)
from offload_runtime.loaders.tp_slices import RankShards
from offload_runtime.native import GroupLayout
from offload_runtime.scheduler.arena import arena_size
from offload_runtime.scheduler.planner import GIB, GroupSize, plan_placement
from offload_runtime.scheduler.runtime import Runtime, build_runtime
from offload_runtime.validate_args import check_dispatch, check_load

__all__ = ["dispatch_compressed", "load_compressed", "load_tokenizer", "remove_offload"]

logger = logging.getLogger("offload_runtime")

RUNTIME_ATTR = "_offload_runtime"
HOST_BUDGET_FRACTION = 0.8  # of psutil's available memory, when host_budget_gb is not given


@dataclass(eq=False)
class _Dispatch:
    """What ``remove_offload`` needs to undo a dispatch."""

    runtime: Runtime
    reader: GroupSource
    tmpdir: str | None
    requires_grad: dict[str, bool]
    shards: dict[str, ShardSpec] = field(default_factory=dict)
    finalizer: Any = None
    hooked: list[nn.Module] = field(default_factory=list)


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return (
            torch.device("cuda", torch.cuda.current_device())
            if torch.cuda.is_available()
            else torch.device("cpu")
        )
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device}")
    return device


def _host_budget(host_budget_gb: float | None) -> int:
    if host_budget_gb is not None:
        return int(host_budget_gb * GIB)
    import psutil

    # ranks started on one host (torchrun) share its RAM: each takes its part of the default
    return int(psutil.virtual_memory().available * HOST_BUDGET_FRACTION / ranks_on_this_host())


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module, attr = _owner(model, name)
    if attr in module._parameters:
        module._parameters[attr] = value
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(f"{name!r} is neither a parameter nor a buffer of {type(module).__name__}")


def _nested_groups(model: nn.Module, groups: list) -> set[str]:
    """Groups whose user modules contain another group's user module (or share one with it).

    Streaming both could deadlock (the outer group pins a slot while the inner one waits for it), so the
    outer ones are kept resident.
    """
    users = {g.name: set(g.users) for g in groups}
    outer = set()
    for name, mine in users.items():
        for other, theirs in users.items():
            if other == name:
                continue
            for a in mine:
                if any(b == a or b.startswith(a + ".") or a == "" for b in theirs):
                    outer.add(name)
    return outer


def _bind(model: nn.Module, runtime: Runtime, groups: list, shards: dict[str, ShardSpec]) -> None:
    """Point every stored tensor, and every tied alias, at its view (the same object for ties); a
    tensor-parallel parameter becomes a DTensor of its placements around its view (``loaders/tp.py``)."""
    for entry in groups:
        bound: dict[str, torch.Tensor] = {}
        for name, view in runtime.views[entry.name].items():
            module, attr = _owner(model, name)
            if not isinstance(view, torch.Tensor):  # a weight kept in a compute format (executed compressed)
                compressed_linear.bind(module, view, entry.layout.spec(name).torch_dtype)
                continue
            value = as_model_tensor(view, shards.get(name))
            if attr in module._parameters:
                value = nn.Parameter(value, requires_grad=False)
            _set_tensor(model, name, value)
            bound[name] = value
        for alias, canonical in entry.aliases.items():
            _set_tensor(model, alias, bound[canonical])


def _move_unstored(model: nn.Module, stored: set[str], device: torch.device) -> None:
    """Tensors not in the container (non-persistent buffers: rotary inv_freq, ...) move to ``device``."""
    for module_name, module in model.named_modules():
        for attr, buf in list(module._buffers.items()):
            full = f"{module_name}.{attr}" if module_name else attr
            if buf is not None and full not in stored and buf.device != device:
                module._buffers[attr] = buf.to(device)


def _attach(
    model: nn.Module,
    reader: GroupSource,
    budget_gb: float,
    device: torch.device,
    prefetch: int,
    host_budget_gb: float | None,
    tmpdir: str | None,
    options: ExpertOptions | None = None,
    execute_compressed: bool = False,
) -> nn.Module:
    budget = round(budget_gb * GIB)  # to the nearest byte: budget_gb = minimum / GIB must pass
    host_budget = _host_budget(host_budget_gb)
    shards = shard_specs(model)  # before anything is rebound
    experts = prepare_experts(model, reader, device, options or ExpertOptions())
    source = experts.block_source if experts is not None else reader
    reserved = experts.minimum_bytes if experts is not None else 0
    groups = list(source.groups)
    try:
        runtime = build_runtime(
            source,
            budget - reserved,
            device=device,
            prefetch=prefetch,
            host_budget_bytes=host_budget,
            keep_resident=_nested_groups(model, groups),
            executable=compressed_linear.executable_groups(model, groups) if execute_compressed else (),
        )
    except BudgetError as exc:
        if not reserved:
            raise
        raise experts_budget_error(exc, reserved, budget) from None
    if experts is not None:
        try:
            left_on_host = host_budget - runtime.plan.host_bytes
            experts.start(model, runtime, budget - runtime.plan.groups_device_bytes, left_on_host)
            runtime.plan.budget_bytes = budget  # the plan shows the whole budget, experts included
        except BaseException:
            runtime.close()
            raise
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    _bind(model, runtime, groups, shards)
    stored = {n for g in groups for n in [*g.layout.names, *g.aliases]}
    _move_unstored(model, stored, device)

    state = _Dispatch(runtime, reader, tmpdir, requires_grad, shards)
    users: dict[str, list[str]] = {}
    for entry in groups:
        if entry.name in runtime.streamed:
            for user in entry.users:
                users.setdefault(user, []).append(entry.name)
    for path, names in users.items():
        if path == "":
            continue
        GroupHook(runtime.engine, tuple(names)).attach(model.get_submodule(path))
    GroupHook(runtime.engine, tuple(users.get("", ())), marks_pass=True).attach(model)

    setattr(model, RUNTIME_ATTR, state)
    model.offload_plan = runtime.plan
    model.offload_stats = runtime.stats
    state.finalizer = weakref.finalize(model, _release, runtime, reader, tmpdir)
    logger.info("offload_runtime: dispatched %s: %s", type(model).__name__, runtime.plan.summary())
    return model


def _refuse_early(model: nn.Module, budget_gb: float, prefetch: int, options: ExpertOptions) -> None:
    """Raise the BudgetError before packing when even the decoded working set cannot fit.

    Decoded sizes are known from the model alone; staging and codec scratch (CUDA) only add to the
    minimum, so this is exact on the CPU and a lower bound on CUDA. When experts may stream on their own,
    the other groups must fit next to the experts' minimum (their slot and one decoded cache entry).
    """
    from offload_runtime.loaders.groups import find_groups
    from offload_runtime.loaders.moe import find_expert_modules, parse_slice_name
    from offload_runtime.scheduler.expert_runtime import slot_layout

    modules = find_expert_modules(model) if options.experts != "block" else []
    state = local_state_dict(model)  # a tensor-parallel model: this rank's shards
    specs = find_groups(model, experts=bool(modules))

    def tensor(name: str) -> torch.Tensor:  # an expert group's tensors are slices "param[e]"
        sliced = parse_slice_name(name)
        return state[sliced[0]][sliced[1]] if sliced else state[name]

    def size(spec) -> int:
        return arena_size(GroupLayout.from_tensors((n, tensor(n)) for n in spec.tensors).size)

    others = [s for s in specs if s.kind != "expert"]
    reserved = 0
    if modules:
        slot = max(arena_size(slot_layout(model, m).size) for m in modules)
        reserved = slot + max(size(s) for s in specs if s.kind == "expert")
    budget = round(budget_gb * GIB)
    sizes = [GroupSize(s.name, size(s), 0) for s in others]
    keep = _nested_groups(model, others)
    try:
        plan_placement(sizes, budget - reserved, device="cpu", prefetch=prefetch, keep_resident=keep)
    except BudgetError as exc:
        if not reserved:
            raise
        raise experts_budget_error(exc, reserved, budget) from None


def _open(
    path: str | os.PathLike, verify: str, device: torch.device, options: ExpertOptions
) -> ContainerReader:
    """The container, read at expert granularity when its experts stream on their own here."""
    reader = ContainerReader(path, verify=verify)
    if expert_granularity(reader.index.groups, device, options):
        reader.set_granularity("expert")  # the index is read and validated once
    return reader


def _shard_reader(reader: ContainerReader, model: nn.Module) -> None:
    """Make ``reader`` present this rank's local tensors when ``model`` is tensor parallel."""
    specs = shard_specs(model)
    world = tp_world()
    if not specs or world is None:
        return
    if not any(g.tp is not None for g in reader.index.groups):
        logger.warning(
            "offload_runtime: %s has no tensor-parallel slices: every rank reads every weight "
            "(pack it with tp_slices=%d to read only each rank's part)",
            reader.path,
            world[1],
        )
    reader.shard(RankShards.from_specs(world[0], world[1], specs))


def _release(runtime: Runtime, reader: GroupSource, tmpdir: str | None) -> None:
    """Stop the engine, close the container, delete a temporary container (model removed or collected)."""
    runtime.close()
    reader.close()
    if tmpdir is not None:
        shutil.rmtree(tmpdir, ignore_errors=True)


def dispatch_compressed(
    model: nn.Module,
    budget_gb: float,
    *,
    checkpoint: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    codec: str = "auto",
    prefetch: int = 1,
    host_budget_gb: float | None = None,
    verify: str = "once",
    experts: str = "auto",
    expert_cache: str = "auto",
    expert_policy: str = "layer-lru",
    speculate: bool = False,
    execute_compressed: bool = False,
) -> nn.Module:
    """Run ``model`` with its weights compressed and streamed through at most ``budget_gb`` of device memory.

    Args:
        model (`nn.Module`): a Hugging Face (or any) model; its weights are replaced in place.
        budget_gb (`float`): GiB the runtime may hold for weights on ``device`` (resident groups, compressed
            groups, decode slots, staging, codec scratch). On the CPU: decoded weights held in RAM.
        checkpoint (`str` or `os.PathLike`, *optional*): a container made by ``pack`` holding this model's
            weights. When ``None``, the current weights are packed into a temporary container (deleted
            when the model is removed or garbage collected) and the originals are freed.
        device (`torch.device` or `str`, *optional*): where the model runs; CUDA when available, else CPU.
        codec (`str`, defaults to `"auto"`): codec used when packing (``checkpoint=None`` only).
        prefetch (`int`, defaults to 1): groups decoded ahead of the one running.
        host_budget_gb (`float`, *optional*): GiB of compressed payloads kept in (pinned) host RAM;
            defaults to 80% of the available memory.
        verify (`str`, defaults to `"once"`): checksum policy of the container reader.
        experts (`str`, defaults to `"auto"`): mixtures of experts: ``"auto"`` streams each routed expert
            on its own when the container stores experts as groups (only the experts a step routes to
            move; see ``offload_runtime.expert_dispatch``), ``"expert"`` requires it, ``"block"`` streams
            them with their block.
        expert_cache (`str`, defaults to `"auto"`): ``"compressed"`` (CUDA default) or ``"decoded"``
            entries of the expert cache.
        expert_policy (`str`, defaults to `"layer-lru"`): the expert cache's replacement policy:
            ``"layer-lru"`` (recency counted in each MoE layer's own steps; a prefill's sweep over every
            expert does not flush it), ``"lru"`` or ``"lfu"``.
        speculate (`bool`, defaults to `False`): prefetch the next MoE layer's likely experts (CUDA).
        execute_compressed (`bool`, defaults to `False`): groups stored with a codec that executes
            compressed (``codec="fused12"``) whose compressed tensors are all ``nn.Linear`` weights are kept
            compressed in VRAM and their linear layers compute from the planes (the ``executed_compressed``
            tier): exact weights, another summation order than cuBLAS (outputs are not bitwise those of the
            resident model).

    Returns:
        `nn.Module`: ``model``, with ``offload_plan`` and ``offload_stats`` attributes.

    Raises:
        UsageError: an argument that cannot work, before any work: a budget that is not a positive finite
            number, a device this machine lacks, a ``checkpoint`` that is a folder; ``TypeError`` for an
            argument of the wrong type.
        BudgetError: the budget is below the minimum working set (nothing is changed).
        CheckpointMismatchError: ``checkpoint`` does not hold this model's tensors.
    """
    check_dispatch(
        model,
        budget_gb,
        checkpoint=checkpoint,
        device_=device,
        codec=codec,
        prefetch=prefetch,
        host_budget_gb=host_budget_gb,
        verify=verify,
    )
    if hasattr(model, RUNTIME_ATTR):
        raise ValueError("model is already dispatched; call remove_offload(model) first")
    device = _resolve_device(device)
    options = dispatch_options(
        experts,
        expert_cache,
        expert_policy,
        speculate,
        tensor_parallel=bool(shard_specs(model)),  # a tensor-parallel model: each rank its shards
        execute_compressed=execute_compressed,
    )
    tmpdir = None
    if checkpoint is None:
        _refuse_early(model, budget_gb, prefetch, options)
        tmpdir = tempfile.mkdtemp(prefix="offload_runtime-")
        try:
            # the device steers "auto" (and int8's inner codec) to codecs that decode there
            path = Path(tmpdir) / "model.safetensors"
            checkpoint = pack(model, path, codec=codec, progress=False, device=device)
        except BaseException:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise
    reader = _open(checkpoint, verify, device, options)
    try:
        if tmpdir is None:
            _shard_reader(reader, model)
            check_compatible(reader, model)
        return _attach(
            model, reader, budget_gb, device, prefetch, host_budget_gb, tmpdir, options, execute_compressed
        )
    except BaseException:
        reader.close()
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise


def load_compressed(
    path: str | os.PathLike,
    budget_gb: float,
    *,
    device: torch.device | str | None = None,
    prefetch: int = 1,
    host_budget_gb: float | None = None,
    verify: str = "once",
    experts: str = "auto",
    expert_cache: str = "auto",
    expert_policy: str = "layer-lru",
    speculate: bool = False,
    execute_compressed: bool = False,
    tensor_parallel: bool | None = None,
    progress: bool = False,
) -> nn.Module:
    """Build the model stored in container ``path`` and dispatch it, never materialising all its weights.

    The model is built on ``meta`` from the stored config; streamed groups are read through the container's
    mmap, so a model larger than host RAM runs.

    Under tensor parallelism (``torchrun``, a ``torch.distributed`` process group of several ranks), every
    rank calls this: the model is sharded on ``meta`` with its own TP plan (as ``from_pretrained(...,
    tp_plan="auto")`` shards it) and each rank plans, reads and streams only its shards, within its own
    ``budget_gb``. A container packed with ``tp_slices`` (a multiple of the number of ranks) is read slice
    by slice: no rank reads another's; any other container is read whole by every rank, which keeps its
    part of each tensor.

    Args:
        path (`str` or `os.PathLike`): a container made by ``pack``.
        budget_gb (`float`): see :func:`dispatch_compressed` (per rank under tensor parallelism).
        device, prefetch, host_budget_gb, verify, experts, expert_cache, expert_policy, speculate,
            execute_compressed: see :func:`dispatch_compressed`.
        tensor_parallel (`bool`, *optional*): shard the model over the default process group; by default
            when one is initialised with more than one rank.
        progress (`bool`, defaults to `False`): show on stderr the MiB read while the model loads
            (resident groups decoded, host-tier payloads copied into RAM).

    Returns:
        `transformers.PreTrainedModel`: the model, in eval mode, with ``offload_plan`` and ``offload_stats``.

    Raises:
        UsageError: see :func:`dispatch_compressed`; ``MissingFileError`` when ``path`` does not exist.
        CheckpointError: ``path`` is not a valid container, or holds no model config.
        BudgetError: the budget is below the minimum working set.
    """
    check_load(
        path, budget_gb, device_=device, prefetch=prefetch, host_budget_gb=host_budget_gb, verify=verify
    )
    tp = tp_requested(tensor_parallel)
    options = dispatch_options(
        experts,
        expert_cache,
        expert_policy,
        speculate,
        tensor_parallel=tp,
        execute_compressed=execute_compressed,
    )
    if tp:
        reader = ContainerReader(path, verify=verify)  # the device is bound once the model is sharded
    else:
        device = _resolve_device(device)
        reader = _open(path, verify, device, options)
    source = None
    try:
        model = build_empty_model(reader)
        if tp:
            model = shard_empty_model(model)  # binds this rank's CUDA device, as from_pretrained does
            _shard_reader(reader, model)
            device = _resolve_device(device)
        check_compatible(reader, model)
        # without a bar the runtime reads the reader itself: nothing is added to the streaming path
        source = ReadProgress(reader, f"load {reader.path.name}") if progress else None
        return _attach(
            model,
            source or reader,
            budget_gb,
            device,
            prefetch,
            host_budget_gb,
            None,
            options,
            execute_compressed,
        )
    except BaseException:
        reader.close()
        raise
    finally:
        if source is not None:
            source.finish()


def _restore_experts(model: nn.Module, runtime: Runtime, state: _Dispatch) -> None:
    """Stacked expert parameters made whole again: every expert decoded into its slice of a new tensor."""
    experts = runtime.experts
    fresh: dict[str, dict[str, torch.Tensor]] = {}
    for path, hook in experts.hooks.items():
        module = model.get_submodule(path)
        hook.detach(module)  # the original (meta) parameters are back: their shapes and dtypes
        fresh[path] = {a: torch.empty_like(p, device=runtime.device) for a, p in module._parameters.items()}
    experts.close()
    for entry in state.reader.groups:
        if entry.expert is None:
            continue
        buffer = torch.empty(entry.decoded_size, dtype=torch.uint8, device=runtime.device)
        runtime.engine.loader.decode_into(entry, buffer)
        views = entry.layout.views(buffer)
        for piece in entry.expert.slices:
            attr = piece.param[len(entry.expert.module) + 1 :]
            fresh[entry.expert.module][attr][piece.index].copy_(views[piece.tensor])
    for path, tensors in fresh.items():
        module = model.get_submodule(path)
        for attr, tensor in tensors.items():
            name = f"{path}.{attr}"
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=state.requires_grad.get(name, True))
    runtime.experts = None


def remove_offload(model: nn.Module) -> nn.Module:
    """Detach the runtime: ordinary parameters holding the decoded weights on the dispatch device, ties kept.

    Args:
        model (`nn.Module`): a model returned by :func:`dispatch_compressed` or :func:`load_compressed`.

    Returns:
        `nn.Module`: the same model, with no hooks and no offload attributes.
    """
    state: _Dispatch | None = getattr(model, RUNTIME_ATTR, None)
    if state is None:
        raise ValueError("model is not dispatched by offload_runtime")
    runtime = state.runtime
    for module, hook in attached_hooks(model):
        hook.detach(module)
    for module in model.modules():
        compressed_linear.unbind(module)
    runtime.engine.close()
    if runtime.experts is not None:
        _restore_experts(model, runtime, state)
    for entry in runtime.source.groups:
        fresh = runtime.decode_fresh(entry.name)
        bound: dict[str, torch.Tensor] = {}
        for name, view in fresh.items():
            module, attr = _owner(model, name)
            tensor = as_model_tensor(view.clone(), state.shards.get(name))
            if attr in module._parameters:
                tensor = nn.Parameter(tensor, requires_grad=state.requires_grad.get(name, True))
            _set_tensor(model, name, tensor)
            bound[name] = tensor
        for alias, canonical in entry.aliases.items():
            _set_tensor(model, alias, bound[canonical])
    state.finalizer()  # closes the reader, deletes a temporary container
    logger.info("offload_runtime: removed from %s: %s", type(model).__name__, runtime.stats)
    delattr(model, RUNTIME_ATTR)
    del model.offload_plan
    del model.offload_stats
    return model
