"""Exact expert execution with only the routed experts present: the model side of expert streaming.

A runtime that streams experts runs the model's **own** experts forward; this module is the mechanism
that lets it do so while only the experts a step routes to hold real weights.

Protocol, for each experts module (``loaders/moe.py`` finds them) and each forward step:

1. **Binding, once** (:func:`attach_experts`): the module's stacked parameters (``gate_up_proj [E, 2I, H]``,
   ...) are replaced by views of an :class:`ExpertSlot`, one buffer the runtime owns holding every stacked
   parameter at its full shape, contiguous: the same shapes, dtypes and strides as the original
   parameters, so every experts implementation runs the same kernels on it. Nothing else changes.
2. **Routing** (:meth:`ExpertHook.pre_forward`): before the module's forward, the expert indices are read
   from the call's arguments: the one integer tensor among them (``top_k_index [tokens, k]``, passed
   positionally by Mixtral, Qwen2/3-MoE, DeepSeek-V3 and OLMoE, and as ``router_indices`` by gpt-oss).
   They are copied to the host, where their union is taken (an index ``>= E``, an expert-parallel
   sentinel the implementations skip, is no expert): **one host synchronisation per experts module per
   step**, never one per expert, and no kernel launch.
3. **Loads** (``provider.make_ready(module, expert_ids)``): with the sorted list of every expert the step
   uses, so a GPU provider enqueues all of them at once (cache hits, loads, decodes into their slices) and
   returns once the compute stream may read them (on CUDA: an event wait on the stream, no host sync).
4. **Compute**: the module's own forward runs unchanged. The implementations transformers selects read
   only the routed experts' slices: ``eager`` loops over the experts hit, ``batched_mm`` gathers
   ``param[expert_ids]``, ``grouped_mm`` passes the whole stack with per-expert offsets whose groups are
   empty for experts not routed. Same bytes in the slices read, same kernels, hence bit-identical outputs;
   the tests poison every other slice with NaN to prove nothing else is read.
5. **Release** (``provider.release(module, expert_ids)``), after the forward, also when it raised: the
   step's slices may be overwritten by work enqueued after this point (a GPU cache records an event and
   unpins the step's entries).

:class:`CopyProvider` (from tensors in memory) and :class:`ContainerProvider` (decoding expert groups of
a container on the CPU) are reference providers; a GPU provider with an expert cache implements the same
two calls.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from offload_runtime.errors import ExpertRoutingError
from offload_runtime.loaders.moe import ExpertsModule, find_expert_modules
from offload_runtime.native.layout import GroupLayout

EXPERT_HOOK_ATTR = "_offload_expert_hook"


class ExpertProvider(Protocol):
    """Makes experts' weights present in their slot's slices (see the module docstring)."""

    def make_ready(self, module: str, expert_ids: Sequence[int]) -> None:
        """Write experts ``expert_ids`` (sorted, unique, ``< E``) of experts module ``module`` into their
        slices; when it returns, the compute stream may read them."""

    def release(self, module: str, expert_ids: Sequence[int]) -> None:
        """The forward that read those slices has been issued; they may be overwritten after it."""


@dataclass
class ExpertSlot:
    """The buffer behind one experts module's stacked parameters.

    Attributes:
        module: the experts module's path.
        num_experts: ``E``.
        buffer: uint8 storage of every stacked parameter (laid out by ``layout``).
        layout: the stacked parameters by attribute name (``"gate_up_proj"``), full shapes.
        params: attribute name -> the stacked tensor (a view of ``buffer``); ``params[a][e]`` is expert
            ``e``'s slice.
    """

    module: str
    num_experts: int
    buffer: torch.Tensor
    layout: GroupLayout
    params: dict[str, torch.Tensor]

    @classmethod
    def allocate(
        cls,
        module: str,
        stacked: Mapping[str, torch.Tensor],
        device: torch.device | str = "cpu",
        fill: float | None = None,
    ) -> ExpertSlot:
        """A slot for stacked parameters shaped like ``stacked`` (attribute -> tensor, ``meta`` is fine).

        Args:
            fill (`float`, *optional*): value written everywhere (``nan`` makes any read of a slice that
                was not made ready visible); uninitialised when None.
        """
        layout = GroupLayout.from_tensors(stacked.items())
        buffer = torch.empty(layout.size, dtype=torch.uint8, device=device)
        params = layout.views(buffer)
        if fill is not None:
            for tensor in params.values():
                tensor.fill_(fill)
        num_experts = next(iter(params.values())).shape[0]
        return cls(module, num_experts, buffer, layout, params)

    def slices(self, expert: int) -> dict[str, torch.Tensor]:
        """Expert ``expert``'s slice of every stacked parameter."""
        return {attr: tensor[expert] for attr, tensor in self.params.items()}


def routed_experts(module: str, num_experts: int, args: tuple, kwargs: dict) -> list[int]:
    """The sorted unique experts an experts-module call routes to (one host sync).

    Raises:
        ExpertRoutingError: the call has no integer tensor, or several.
    """
    found = [
        t
        for t in (*args, *kwargs.values())
        if isinstance(t, torch.Tensor)
        and not t.is_floating_point()
        and not t.is_complex()
        and t.dtype != torch.bool
    ]
    if len(found) != 1:
        raise ExpertRoutingError(
            "cannot tell which experts this call routes to",
            group=module,
            expected="exactly one integer tensor of expert indices among the arguments",
            actual=f"{len(found)} integer tensors",
            hint="this experts module's signature is not supported; dispatch it at block granularity",
        )
    return unique_experts(found[0], num_experts)


def unique_experts(indices: torch.Tensor, num_experts: int) -> list[int]:
    """The sorted unique experts among ``indices`` (any shape, any device: one host sync); indices
    ``>= num_experts`` (expert-parallel sentinels) are not experts."""
    # the indices themselves come to the host (one copy, no kernel: at batch 1 three launches for a mask
    # on the device cost more host time than the copy); the union is taken there
    ids = np.unique(np.clip(indices.reshape(-1).cpu().numpy(), 0, num_experts))
    return ids[ids < num_experts].tolist()


class ExpertHook:
    """Make the routed experts ready before an experts module's forward; release them after.

    Args:
        path (`str`): the module's path (what the provider is told).
        slot (`ExpertSlot`): the buffer its stacked parameters are bound to.
        provider (`ExpertProvider`): who writes the experts' bytes.

    Attributes:
        calls: forwards seen; ``requested``: experts made ready over all calls.
    """

    def __init__(self, path: str, slot: ExpertSlot, provider: ExpertProvider) -> None:
        self.path, self.slot, self.provider = path, slot, provider
        self.calls = self.requested = 0
        self._original_forward: Any = None
        self._had_instance_forward = False
        self._original_params: dict[str, nn.Parameter] = {}

    def __repr__(self) -> str:
        return f"ExpertHook({self.path!r}, experts={self.slot.num_experts}, calls={self.calls})"

    def attach(self, module: nn.Module) -> nn.Module:
        """Bind the stacked parameters to the slot and wrap ``module.forward``."""
        if hasattr(module, EXPERT_HOOK_ATTR):
            raise ValueError(f"{self.path} already has an expert hook: {getattr(module, EXPERT_HOOK_ATTR)}")
        for attr, tensor in self.slot.params.items():
            old = module._parameters[attr]
            if tuple(old.shape) != tuple(tensor.shape) or old.dtype != tensor.dtype:
                raise ValueError(
                    f"slot tensor {attr} {tuple(tensor.shape)} {tensor.dtype} does not fit "
                    f"{self.path}.{attr} {tuple(old.shape)} {old.dtype}"
                )
            self._original_params[attr] = old
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        self._had_instance_forward = "forward" in module.__dict__
        self._original_forward = original = module.forward

        @functools.wraps(original)
        def forward(*args: Any, **kwargs: Any) -> Any:
            ids = self.pre_forward(args, kwargs)
            try:
                return original(*args, **kwargs)
            finally:
                self.post_forward(ids)

        module.forward = forward
        setattr(module, EXPERT_HOOK_ATTR, self)
        return module

    def pre_forward(self, args: tuple, kwargs: dict) -> list[int]:
        ids = routed_experts(self.path, self.slot.num_experts, args, kwargs)
        self.calls += 1
        self.requested += len(ids)
        self.provider.make_ready(self.path, ids)
        return ids

    def post_forward(self, ids: list[int]) -> None:
        self.provider.release(self.path, ids)

    def detach(self, module: nn.Module) -> nn.Module:
        """Undo :meth:`attach` exactly: the original parameters and ``forward`` are back."""
        if getattr(module, EXPERT_HOOK_ATTR, None) is not self:
            return module
        module._parameters.update(self._original_params)
        if self._had_instance_forward:
            module.forward = self._original_forward
        else:
            del module.forward
        delattr(module, EXPERT_HOOK_ATTR)
        self._original_params, self._original_forward = {}, None
        return module


def attach_experts(
    model: nn.Module,
    provider: ExpertProvider,
    *,
    device: torch.device | str = "cpu",
    fill: float | None = None,
    modules: Sequence[ExpertsModule] | None = None,
) -> dict[str, ExpertHook]:
    """Bind every experts module of ``model`` to a new slot and hook it to ``provider``.

    Args:
        model (`nn.Module`): the model (its experts' parameters may be on ``meta``).
        provider (`ExpertProvider`): makes experts ready (see the module docstring).
        device (`torch.device` or `str`, defaults to `"cpu"`): where the slots live.
        fill (`float`, *optional*): initial value of the slots (``float("nan")`` in tests).
        modules (`Sequence[ExpertsModule]`, *optional*): the experts modules; found when None.

    Returns:
        `dict[str, ExpertHook]`: module path -> its hook (its ``slot`` is the buffer to write into).
    """
    hooks = {}
    for found in find_expert_modules(model) if modules is None else modules:
        module = model.get_submodule(found.path)
        stacked = {a: module._parameters[a] for a in found.params}
        slot = ExpertSlot.allocate(found.path, stacked, device, fill)
        hooks[found.path] = ExpertHook(found.path, slot, provider)
        hooks[found.path].attach(module)
    return hooks


def detach_experts(model: nn.Module) -> None:
    """Remove every :class:`ExpertHook` under ``model``, restoring its parameters."""
    for module in model.modules():
        hook = getattr(module, EXPERT_HOOK_ATTR, None)
        if isinstance(hook, ExpertHook):
            hook.detach(module)


class CopyProvider:
    """Copies experts from tensors in memory (the original stacked parameters) into the slots.

    Args:
        sources (`Mapping[str, Mapping[str, torch.Tensor]]`): module path -> attribute -> stacked tensor.
        slots (`Mapping[str, ExpertSlot]`): module path -> its slot (e.g. ``hook.slot`` of
            :func:`attach_experts`'s hooks); may be set after construction.

    Attributes:
        log: ``(event, module, expert_ids)`` for every call, in order (for tests and statistics).
    """

    def __init__(
        self,
        sources: Mapping[str, Mapping[str, torch.Tensor]],
        slots: Mapping[str, ExpertSlot] | None = None,
    ) -> None:
        self.sources, self.slots = sources, dict(slots or {})
        self.log: list[tuple[str, str, list[int]]] = []

    def make_ready(self, module: str, expert_ids: Sequence[int]) -> None:
        self.log.append(("make_ready", module, list(expert_ids)))
        slot = self.slots[module]
        for e in expert_ids:
            for attr, dest in slot.slices(e).items():
                dest.copy_(self.sources[module][attr][e])

    def release(self, module: str, expert_ids: Sequence[int]) -> None:
        self.log.append(("release", module, list(expert_ids)))


class ContainerProvider:
    """Decodes expert groups of a container on the CPU into the slots, using only the index's records.

    Args:
        reader: a ``ContainerReader`` opened with ``granularity="expert"``.
        slots (`Mapping[str, ExpertSlot]`): module path -> its slot; may be set after construction.
    """

    def __init__(self, reader: Any, slots: Mapping[str, ExpertSlot] | None = None) -> None:
        self.reader, self.slots = reader, dict(slots or {})
        self.groups = {(g.expert.module, g.expert.index): g for g in reader.groups if g.expert is not None}
        largest = max((g.layout.size for g in self.groups.values()), default=0)
        self._scratch = torch.empty(largest, dtype=torch.uint8)
        self.decoded = 0

    def make_ready(self, module: str, expert_ids: Sequence[int]) -> None:
        slot = self.slots[module]
        for e in expert_ids:
            entry = self.groups[(module, e)]
            views = entry.layout.views(self.reader.decode_cpu(entry.name, self._scratch))
            for s in entry.expert.slices:  # slice s.index of parameter s.param gets tensor s.tensor
                attr = s.param[len(module) + 1 :]
                slot.params[attr][s.index].copy_(views[s.tensor])
            self.decoded += 1

    def release(self, module: str, expert_ids: Sequence[int]) -> None:
        """Nothing is cached: the next step decodes again."""
