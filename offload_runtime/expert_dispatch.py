"""Expert granularity in ``dispatch_compressed``/``load_compressed``: when experts stream on their own, and
how the budget is split between the model's other groups and its experts.

A container whose MoE blocks store each routed expert as a group (``pack`` does so for transformers'
stacked experts modules) runs at expert granularity unless asked not to (``experts="block"``), the device
cannot decode its experts in batches (on CUDA: every expert stored with one codec that has a batched GPU
decoder; ``int8`` has none), or the model has no experts modules. Then:

* the other groups (attention, norms, routers, shared experts, embeddings: every token uses them) are
  planned first, by the ordinary planner, in the budget less the experts' minimum (their slot and one
  cache entry);
* the experts get whatever budget the other groups' plan leaves (``ExpertPlan``: slot, cache, staging),
  and the host budget they leave for their homes.

Anything else falls back to block granularity (a reader that reassembles blocks), with one log line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from offload_runtime.errors import BudgetError
from offload_runtime.loaders.format import GroupEntry
from offload_runtime.loaders.moe import ExpertsModule, find_expert_modules
from offload_runtime.native import get_codec
from offload_runtime.scheduler.arena import arena_size
from offload_runtime.scheduler.expert_runtime import ExpertRuntime, slot_layout
from offload_runtime.scheduler.experts_plan import ExpertPlan, ExpertSize, plan_experts
from offload_runtime.scheduler.planner import GIB, budget_gb_for
from offload_runtime.scheduler.runtime import Runtime
from offload_runtime.validate_args import check_expert_options, usage_error

logger = logging.getLogger("offload_runtime")


@dataclass(frozen=True)
class ExpertOptions:
    """How experts are run.

    Attributes:
        experts: ``"auto"`` (expert granularity when the container and device allow it), ``"expert"``
            (required: an error otherwise), ``"block"`` (experts stream with their block).
        cache: ``"auto"``, ``"compressed"`` or ``"decoded"`` cache entries (``auto``: compressed on CUDA).
        policy: ``"layer-lru"``, ``"lru"`` or ``"lfu"``.
        speculate: prefetch the next MoE layer's likely experts (CUDA).
    """

    experts: str = "auto"
    cache: str = "auto"
    policy: str = "layer-lru"
    speculate: bool = False

    def __post_init__(self) -> None:
        check_expert_options(self.experts, self.cache, self.policy)


def dispatch_options(
    experts: str = "auto",
    cache: str = "auto",
    policy: str = "layer-lru",
    speculate: bool = False,
    *,
    tensor_parallel: bool = False,
    execute_compressed: bool = False,
) -> ExpertOptions:
    """The :class:`ExpertOptions` of a dispatch (``dispatch_compressed``, ``load_compressed``,
    ``dispatch_synthetic``).

    Under tensor parallelism experts stream with their blocks (the expert runtime binds whole stacks, not
    shards), and weights are decoded before they are used (a compressed linear would replace the TP
    forward that reduces across ranks).

    Raises:
        UsageError: a value that is not one of its choices (``validate_args.check_expert_options``), or
            what tensor parallelism cannot run (``experts="expert"``, ``execute_compressed``).
    """
    options = ExpertOptions(experts, cache, policy, speculate)
    if not tensor_parallel:
        return options
    if experts == "expert":
        raise usage_error(
            "experts='expert' is not supported under tensor parallelism", "use experts='auto' or 'block'"
        )
    if execute_compressed:
        raise usage_error(
            "execute_compressed is not supported under tensor parallelism", "drop execute_compressed=True"
        )
    return ExpertOptions("block", cache, policy, speculate)


def expert_granularity(groups: Sequence[GroupEntry], device: torch.device, options: ExpertOptions) -> bool:
    """Whether groups stored with experts of their own (a container's, a synthetic source's) run at expert
    granularity on ``device``.

    Raises:
        UsageError: ``experts="expert"`` where it cannot run, or compressed cache entries off CUDA.
    """
    experts = [g for g in groups if g.kind == "expert"]
    if not experts or options.experts == "block":
        return False
    reason = None
    codecs = {g.codec for g in experts}
    if device.type == "cuda":
        if len(codecs) != 1:
            reason = f"its experts are stored with several codecs ({', '.join(sorted(codecs))})"
        elif get_codec(next(iter(codecs))).batch_decoder_sizes(1, 1) is None:
            reason = f"codec {next(iter(codecs))!r} has no batched GPU decoder"
    if reason is None:
        if device.type != "cuda" and options.cache == "compressed":
            raise usage_error(
                f"expert_cache='compressed' needs a CUDA device (its entries are decoded on the GPU), got "
                f"device {str(device)!r}",
                "use expert_cache='decoded' or 'auto' on the CPU",
            )
        return True
    if options.experts == "expert":
        raise usage_error(f"experts='expert' is not possible here: {reason}", "use experts='block'")
    logger.warning("offload_runtime: experts stream with their blocks (block granularity): %s", reason)
    return False


def experts_budget_error(exc: BudgetError, reserved: int, budget: int) -> BudgetError:
    """The BudgetError of the groups other than experts, planned in the budget less the experts' minimum
    ``reserved``, restated for the whole budget: the minimum is both parts, each named."""
    minimum = exc.expected + reserved
    return BudgetError(
        f"budget {budget:,} bytes ({budget / GIB:.4f} GiB) is below the minimum working set of "
        f"{minimum:,} bytes ({minimum / GIB:.4f} GiB): {exc.expected} bytes for the groups other than the "
        f"experts and {reserved} bytes for the experts (their slot and one cache entry)",
        group=exc.group,
        expected=minimum,
        actual=budget,
        hint=f"raise budget_gb to at least {budget_gb_for(minimum)}",
    )


class WithoutExperts:
    """A group source seen without its expert groups (what the ordinary runtime plans and streams)."""

    def __init__(self, source: Any) -> None:
        self._source = source
        self.groups = [g for g in source.groups if g.expert is None]

    def __getattr__(self, name: str) -> Any:  # path, policy, group, read_into, decode_cpu, close, ...
        return getattr(self._source, name)


@dataclass
class ExpertSetup:
    """The expert part of a dispatch, before and after the other groups are planned."""

    source: Any
    modules: list[ExpertsModule]
    sizes: list[ExpertSize]
    slot_bytes: int
    options: ExpertOptions
    device: torch.device

    @property
    def block_source(self) -> WithoutExperts:
        return WithoutExperts(self.source)

    def plan(self, budget_bytes: int, host_budget_bytes: int | None) -> ExpertPlan:
        codec = get_codec(next(iter({g.codec for g in self.source.groups if g.expert is not None})))
        cache = None if self.options.cache == "auto" else self.options.cache
        return plan_experts(
            self.sizes,
            self.slot_bytes,
            budget_bytes,
            device=self.device.type,
            host_budget_bytes=host_budget_bytes,
            mode=cache,
            policy=self.options.policy,
            decoder_sizes=codec.batch_decoder_sizes,
        )

    @property
    def minimum_bytes(self) -> int:
        """The experts' minimum: the fixed part and one cache entry."""
        try:
            self.plan(0, None)
        except BudgetError as exc:
            return int(exc.expected)
        return 0

    def start(self, model: nn.Module, runtime: Runtime, budget_bytes: int, host_budget_bytes: int | None):
        plan = self.plan(budget_bytes, host_budget_bytes)
        runtime.plan.experts = plan
        runtime.experts = ExpertRuntime(
            self.source, plan, model, self.modules, self.device, runtime.stats, self.options.speculate
        )
        runtime.stats.peak_weight_bytes += plan.device_bytes
        return runtime.experts


def prepare_experts(model: nn.Module, source: Any, device: torch.device, options: ExpertOptions):
    """The :class:`ExpertSetup` of a source read at expert granularity, or None when it has no experts."""
    entries: list[GroupEntry] = [g for g in source.groups if g.expert is not None]
    if not entries:
        return None
    modules = [m for m in find_expert_modules(model) if any(g.expert.module == m.path for g in entries)]
    sizes = [
        ExpertSize(
            g.name,
            g.expert.module,
            g.expert.index,
            arena_size(g.decoded_size),
            arena_size(g.stored_size),
            len(g.chunks),
            max((c.decoded_size for c in g.chunks), default=0),
        )
        for g in entries
    ]
    slot = max(arena_size(slot_layout(model, m).size) for m in modules)
    return ExpertSetup(source, modules, sizes, slot, options, device)
