"""Synthetic models, built without ever holding them: 70 B on one GPU, no checkpoint needed.

Shapes: Llama (``tiny`` ... ``llama-70b``) and mixtures of experts (``mixtral-8x7b``, ``qwen3-30b-a3b``
and their ``tiny-`` versions), whose groups include one group per routed expert, split as ``pack``
splits them (``find_groups(model, experts=True)``): a synthetic source and a packed container of the
materialised model hold the same groups.

The model skeleton lives on ``meta``. Each group's weights are produced on the device by
:func:`init_group` (2-D weights normal(0, 0.02), norms ones, as Hugging Face initialises them) from a
``torch.Generator`` seeded per group, so any group can be regenerated, bit for bit, at any time. A
:class:`~offload_runtime.loaders.synthetic_source.SyntheticSource` encodes the groups one at a time and
hands the runtime their payloads when it places them in their tier; the whole model is never materialised.

:func:`materialize` fills a real (small) model with exactly the same tensors: packed with the ordinary
``pack`` and loaded with ``load_compressed`` it must give bit-identical outputs to
:func:`dispatch_synthetic` (the tests check this).

Tensor parallel (``dispatch_synthetic(..., tensor_parallel=True)`` on every rank of a process group): the
skeleton is sharded with its TP plan (``loaders/tp.py``) and each rank generates only its shards. The
model is then defined rank by rank: tensors every rank holds whole are drawn from the group's generator
as above (the same on every rank), each rank's shards from a second generator seeded by the group and
``(rank, world)``. A model without sharded tensors draws exactly what it drew before.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import nn

from offload_runtime.loaders.groups import GroupSpec, find_groups
from offload_runtime.loaders.moe import parse_slice_name
from offload_runtime.loaders.reassemble import ReassembledSource
from offload_runtime.loaders.tp import (
    as_model_tensor,
    local,
    local_state_dict,
    shard_empty_model,
    shard_specs,
    tp_requested,
    tp_world,
)
from offload_runtime.native import GroupLayout

__all__ = [
    "INIT_STD",
    "SYNTHETIC_SHAPES",
    "dispatch_synthetic",
    "group_layout",
    "init_group",
    "materialize",
    "synthetic_config",
    "synthetic_skeleton",
]

INIT_STD = 0.02  # LlamaConfig.initializer_range: what HF draws Linear and Embedding weights from

_LLAMA3 = {"num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0}
SYNTHETIC_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "num_hidden_layers": 3,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
    },
    "llama-2b": {
        "num_hidden_layers": 8,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
    },
    "llama-8b": {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "rope_theta": 500000.0,
    },
    "llama-70b": {"num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672, **_LLAMA3},
    # mixtures of experts: 93 GB and 61 GB in bf16; a token reads 2 of 8 and 8 of 128 experts per layer
    "mixtral-8x7b": {
        "model_type": "mixtral",
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "intermediate_size": 14336,  # one expert's MLP
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
        "rope_theta": 1000000.0,
    },
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe",
        "num_hidden_layers": 48,
        "hidden_size": 2048,
        "intermediate_size": 6144,  # dense MLP width of the config; every layer here is MoE
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "norm_topk_prob": True,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 151936,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
    },
    "tiny-mixtral": {
        "model_type": "mixtral",
        "num_hidden_layers": 3,
        "hidden_size": 64,
        "intermediate_size": 32,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
    },
    "tiny-qwen3-moe": {
        "model_type": "qwen3_moe",
        "num_hidden_layers": 3,
        "hidden_size": 64,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_experts": 8,
        "num_experts_per_tok": 4,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 256,
    },
}
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}


def synthetic_config(name: str, **overrides: Any):
    """The config of synthetic shape ``name`` (a key of :data:`SYNTHETIC_SHAPES`): a ``LlamaConfig``, or
    for a mixture of experts a ``MixtralConfig`` / ``Qwen3MoeConfig``.

    Args:
        name (`str`): ``"tiny"``, ``"llama-2b"``, ``"llama-8b"``, ``"llama-70b"``, ``"mixtral-8x7b"``,
            ``"qwen3-30b-a3b"``, ``"tiny-mixtral"`` or ``"tiny-qwen3-moe"``.
        overrides: config fields to change (``num_hidden_layers=1``, ``tie_word_embeddings=True``, ...).

    Raises:
        ValueError: an unknown shape name, listing the known ones.
    """
    from transformers import AutoConfig

    if name not in SYNTHETIC_SHAPES:
        raise ValueError(f"unknown synthetic shape {name!r}; choose one of {sorted(SYNTHETIC_SHAPES)}")
    fields = {
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "initializer_range": INIT_STD,
        **SYNTHETIC_SHAPES[name],
        **overrides,
    }
    model_type = fields.pop("model_type", "llama")
    return AutoConfig.for_model(model_type, architectures=[_ARCHITECTURES[model_type]], **fields)


def synthetic_skeleton(config, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The model of ``config`` with parameters on ``meta`` (buffers real), in eval mode, ties made.

    Built exactly as ``load_compressed`` builds a model from a container's stored config, so both paths
    run the same modules.
    """
    from offload_runtime.loaders.load import empty_model_from_config
    from offload_runtime.native.layout import dtype_name

    architecture = (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0]
    return empty_model_from_config(config.to_dict(), architecture, dtype=dtype_name(dtype))


def group_layout(
    model: nn.Module,
    group: GroupSpec,
    dtype: torch.dtype | None = None,
    *,
    state: dict[str, torch.Tensor] | None = None,
) -> GroupLayout:
    """The decoded layout of ``group``: its tensors' shapes, floating ones in ``dtype`` (default: as is).

    An expert group's tensors are slices ``param[e]`` of stacked parameters: the stack's shape less its
    first dimension. A tensor-parallel model's tensors are this rank's shards.

    Args:
        state (`dict[str, torch.Tensor]`, *optional*): ``local_state_dict(model)``, built once by a caller
            that lays out many groups (building it per group takes seconds for a large skeleton); only
            shapes and dtypes are read.
    """
    if state is None:
        state = local_state_dict(model)
    metas = []
    for name in group.tensors:
        sliced = parse_slice_name(name)
        tensor = state[name] if sliced is None else state[sliced[0]][0]
        target = dtype if dtype is not None and tensor.dtype.is_floating_point else tensor.dtype
        metas.append((name, torch.empty(tensor.shape, dtype=target, device="meta")))
    return GroupLayout.from_tensors(metas)


def group_seed(seed: int, group: str) -> int:
    """The generator seed of ``group``: a function of the base seed and the group's name only."""
    return (seed * 0x9E3779B1 + zlib.crc32(group.encode())) % (1 << 63)


def _norm_like(model: nn.Module, name: str) -> bool:
    sliced = parse_slice_name(name)
    name = sliced[0] if sliced is not None else name
    owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    return "norm" in type(owner).__name__.lower()


def fill_group(
    model: nn.Module,
    group: GroupSpec,
    layout: GroupLayout,
    seed: int,
    buffer: torch.Tensor,
    sharded: frozenset[str] = frozenset(),
) -> None:
    """Write ``group``'s synthetic tensors into ``buffer`` (uint8, ``layout.size`` bytes, zeroed), in place.

    Floating tensors with 2+ dimensions (an expert's slices of stacked weights included) are drawn from
    normal(0, :data:`INIT_STD`) by one generator on the buffer's device, in layout order; 1-D floating
    tensors are ones in norm modules, zeros elsewhere (biases); other tensors stay zero. Tensors named in
    ``sharded`` (this rank's shards, :func:`sharded_tensors`) are drawn from a second generator seeded by the
    group and this rank.
    """
    generator = torch.Generator(device=buffer.device)
    generator.manual_seed(group_seed(seed, group.name))
    mine = None
    if sharded:
        rank, world = tp_world() or (0, 1)
        mine = torch.Generator(device=buffer.device)
        mine.manual_seed(group_seed(seed, f"{group.name}#tp{rank}/{world}"))
    for spec, view in zip(layout.tensors, layout.views(buffer).values(), strict=True):
        if not spec.torch_dtype.is_floating_point or spec.numel == 0:
            continue
        if len(spec.shape) >= 2:
            view.normal_(0.0, INIT_STD, generator=mine if spec.name in sharded else generator)
        elif _norm_like(model, spec.name):
            view.fill_(1.0)


def sharded_tensors(model: nn.Module) -> frozenset[str]:
    """The stored names (an expert's slices ``param[e]`` included) of the tensors a tensor-parallel model
    holds as shards on this rank; empty for any other model."""
    specs = {name for name, spec in shard_specs(model).items() if spec.dim_split() is not None}
    names = set(specs)
    for group in find_groups(model, experts=True):
        names |= {n for n in group.tensors if (parse_slice_name(n) or (None,))[0] in specs}
    return frozenset(names)


def init_group(
    model: nn.Module,
    group: GroupSpec,
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype | None = torch.bfloat16,
    sharded: frozenset[str] = frozenset(),
    state: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The synthetic tensors of ``group`` on ``device``: deterministic in (``seed``, group name).

    Args:
        model (`nn.Module`): the model (``meta`` is fine: only shapes and module types are read).
        group (`GroupSpec`): one of ``find_groups(model)``.
        seed (`int`): the base seed.
        device (`torch.device` or `str`): where the tensors are generated (values differ between CPU and
            CUDA: each has its own generator).
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): dtype of the floating tensors;
            ``None`` keeps the model's.
        sharded (`frozenset[str]`, *optional*): this rank's sharded tensors (:func:`sharded_tensors`).
        state (`dict[str, torch.Tensor]`, *optional*): see :func:`group_layout`.

    Returns:
        `dict[str, torch.Tensor]`: stored tensor name -> tensor (views into one buffer of the group).
    """
    layout = group_layout(model, group, dtype, state=state)
    buffer = torch.zeros(layout.size, dtype=torch.uint8, device=device)
    fill_group(model, group, layout, seed, buffer, sharded)
    return layout.views(buffer)


def materialize(
    model: nn.Module,
    seed: int = 0,
    device: torch.device | str = "cpu",
    store: torch.device | str = "cpu",
) -> nn.Module:
    """Give ``model`` real weights: exactly the tensors :func:`init_group` makes (the ordinary path).

    For shapes that fit (the whole model, or this rank's shards of it, is materialised). Parameters on
    ``meta`` are allocated; tied weights stay tied; a tensor-parallel model's shards become DTensors of
    their placements.

    Args:
        model (`nn.Module`): e.g. :func:`synthetic_skeleton`'s model.
        seed (`int`, defaults to 0): the base seed.
        device (`torch.device` or `str`, defaults to `"cpu"`): where the tensors are generated (use the
            device :func:`dispatch_synthetic` generates on to get its weights).
        store (`torch.device` or `str`, defaults to `"cpu"`): where they are kept.

    Returns:
        `nn.Module`: ``model``, with every stored tensor replaced in place.
    """
    specs = shard_specs(model)
    sharded = sharded_tensors(model)
    stacks: dict[str, torch.Tensor] = {}  # stacked expert parameters, filled slice by slice
    state = local_state_dict(model)  # shapes and dtypes: assigning real tensors below changes neither
    for group in find_groups(model, experts=True):
        for name, tensor in init_group(model, group, seed, device, None, sharded, state).items():
            sliced = parse_slice_name(name)
            if sliced is not None:
                param, index = sliced
                if param not in stacks:
                    meta = local(model.get_parameter(param))
                    stacks[param] = torch.zeros(meta.shape, dtype=meta.dtype, device=store)
                stacks[param][index].copy_(tensor)
                continue
            _assign(model, name, tensor.to(store, copy=True), specs)
    for name, value in stacks.items():
        _assign(model, name, value, specs)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _assign(model: nn.Module, name: str, value: torch.Tensor, specs: dict) -> None:
    module_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(module_path) if module_path else model
    value = as_model_tensor(value, specs.get(name))
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = value


def synthetic_source(
    model: nn.Module,
    *,
    seed: int = 0,
    codec: str = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
):
    """A :class:`~offload_runtime.loaders.synthetic_source.SyntheticSource` of ``model``'s synthetic groups.

    Encodes every group once (phase 1), on ``device``; see :func:`dispatch_synthetic`. Its groups are those
    ``pack`` stores: one per routed expert of a mixture of experts.
    """
    from offload_runtime.loaders.synthetic_source import SyntheticSource

    specs = find_groups(model, experts=True)
    state = local_state_dict(model)
    layouts = [group_layout(model, spec, dtype, state=state) for spec in specs]
    sharded = sharded_tensors(model)

    def fill(index: int, buffer: torch.Tensor) -> None:
        fill_group(model, specs[index], layouts[index], seed, buffer, sharded)

    return SyntheticSource(specs, layouts, fill, codec=codec, device=device)


def dispatch_synthetic(
    name_or_config: str | Any,
    budget_gb: float,
    *,
    codec: str = "auto",
    device: torch.device | str | None = None,
    prefetch: int = 1,
    host_budget_gb: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    experts: str = "auto",
    expert_cache: str = "auto",
    expert_policy: str = "layer-lru",
    speculate: bool = False,
    source: Any = None,
    execute_compressed: bool = False,
    tensor_parallel: bool | None = None,
) -> nn.Module:
    """A synthetic model of shape ``name_or_config``, dispatched in ``budget_gb`` without materialising it.

    Each group is generated and encoded on ``device`` (on CUDA: generated, packed and, for ``ans``/
    ``int8``, encoded on the GPU), and only its chunk table is kept; when the runtime places a group in its
    tier (resident, compressed in VRAM, pinned host RAM) the group is generated and encoded again and its
    payload checked against the first encoding's CRC-32s. Nothing is written to disk.

    Args:
        name_or_config (`str` or config): a key of :data:`SYNTHETIC_SHAPES` or a config.
        budget_gb (`float`): see :func:`~offload_runtime.dispatch_compressed`.
        codec (`str`, defaults to `"auto"`): ``auto``, ``raw``, ``zstd``, ``ans`` or ``int8``.
        device (`torch.device` or `str`, *optional*): CUDA when available, else CPU.
        prefetch (`int`, defaults to 1), host_budget_gb (`float`, *optional*): see ``dispatch_compressed``.
        seed (`int`, defaults to 0): base seed of the weights.
        dtype (`torch.dtype`, defaults to `torch.bfloat16`): dtype of the weights.
        experts, expert_cache, expert_policy, speculate: a mixture of experts' granularity and expert cache,
            see :func:`~offload_runtime.dispatch_compressed` (at block granularity each block is streamed
            with its experts reassembled).
        source (*optional*): a :func:`synthetic_source` of the same config, seed, codec, device and dtype,
            already encoded (several dispatches of one shape then encode it once).
        execute_compressed (`bool`, defaults to `False`): see :func:`~offload_runtime.dispatch_compressed`
            (with ``codec="fused12"``).
        tensor_parallel (`bool`, *optional*): call on every rank of a process group: the model is sharded
            with its TP plan and each rank generates, encodes and streams only its shards within its own
            ``budget_gb`` (see the module docstring); by default when a group of several ranks exists.

    Returns:
        `transformers.PreTrainedModel`: the model, in eval mode, with ``offload_plan``, ``offload_stats``.

    Raises:
        UsageError: an unknown shape name, or an argument that cannot work (see ``dispatch_compressed``).
        BudgetError: the budget is below the minimum working set (raised before anything is generated).
    """
    from offload_runtime.api import _attach, _refuse_early, _resolve_device
    from offload_runtime.expert_dispatch import dispatch_options, expert_granularity
    from offload_runtime.validate_args import check_synthetic

    check_synthetic(
        name_or_config,
        budget_gb,
        codec=codec,
        device_=device,
        prefetch=prefetch,
        host_budget_gb=host_budget_gb,
        seed=seed,
        dtype=dtype,
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
    config = synthetic_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    model = synthetic_skeleton(config, dtype)
    if tp:
        model = shard_empty_model(model)  # binds this rank's CUDA device
    device = _resolve_device(device)
    _refuse_early(model, budget_gb, prefetch, options)  # decoded sizes are known on meta: fail early
    owned = source is None
    if source is None:
        source = synthetic_source(model, seed=seed, codec=codec, device=device, dtype=dtype)
    stored = source
    if any(g.expert is not None for g in source.groups) and not expert_granularity(
        source.groups, device, options
    ):
        source = ReassembledSource(source)  # the block runtime streams each block with its experts
    try:
        _attach(model, source, budget_gb, device, prefetch, host_budget_gb, None, options, execute_compressed)
    except BaseException:
        if owned:
            stored.close()
        raise
    stored.trim()  # the pinned D2H buffer is only needed while groups are placed
    return model
