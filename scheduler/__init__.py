"""Placement from the budget, prefetch, pinned staging, slots (installed as ``offload_runtime.scheduler``).

* :mod:`~offload_runtime.scheduler.planner`: budget -> tier per group (:class:`Plan`).
* :mod:`~offload_runtime.scheduler.engine`: the prefetch thread and the slot/event protocol.
* :mod:`~offload_runtime.scheduler.loader`: the data path of one load, on the CPU or on CUDA.
* :mod:`~offload_runtime.scheduler.runtime`: allocates everything once and starts the engine.
"""

from offload_runtime.scheduler.planner import GroupSize, Plan, Tier, plan_placement
from offload_runtime.scheduler.runtime import Runtime, build_runtime
from offload_runtime.scheduler.stats import OffloadStats

__all__ = ["GroupSize", "OffloadStats", "Plan", "Runtime", "Tier", "build_runtime", "plan_placement"]
