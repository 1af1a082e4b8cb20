"""Placement from the budget, prefetch, pinned staging, slots (installed as ``offload_runtime.scheduler``).

* :mod:`~offload_runtime.scheduler.tiers`: the tiers a group can live in, as objects (costs, stores).
* :mod:`~offload_runtime.scheduler.planner`: budget -> tier per group and every buffer's size (:class:`Plan`).
* :mod:`~offload_runtime.scheduler.engine`: the prefetch thread and the slot/event protocol.
* :mod:`~offload_runtime.scheduler.loader`, :mod:`~offload_runtime.scheduler.cuda_loader`: the data path
  of one load, on the CPU or on CUDA; :mod:`~offload_runtime.scheduler.pcie`: payloads crossing PCIe.
* :mod:`~offload_runtime.scheduler.runtime`: allocates everything once, from one arena, and starts the engine.
"""

from offload_runtime.scheduler.planner import GroupSize, Plan, plan_placement
from offload_runtime.scheduler.runtime import Runtime, build_runtime
from offload_runtime.scheduler.stats import OffloadStats
from offload_runtime.scheduler.tiers import TIERS, Tier

__all__ = [
    "TIERS",
    "GroupSize",
    "OffloadStats",
    "Plan",
    "Runtime",
    "Tier",
    "build_runtime",
    "plan_placement",
]
