"""Placement from the budget, prefetch, pinned staging, slots (installed as ``offload_runtime.scheduler``)."""
