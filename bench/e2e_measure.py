"""What each row of the end-to-end benchmark measures: greedy tok/s after a warm-up, prefill tok/s, and the
row's own peak VRAM and RSS. Shared by ``gpu_e2e.py``, its peer rows (``peers.py``) and ``host_profile.py``.
"""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import torch


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, ids: torch.Tensor, tokens: int, repeats: int = 3) -> tuple[torch.Tensor, float]:
    """Median tok/s of ``repeats`` greedy runs after one full-length warm-up run (which also learns the
    execution order and lets cuBLAS pick kernels for every sequence length)."""
    device = ids.device.type
    rates = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            sync(device)
            rates.append(tokens / (time.perf_counter() - start))
    return out[0, ids.shape[1] :].cpu(), sorted(rates)[len(rates) // 2]


def timed_prefill(model, length: int, vocab: int, device: str) -> float:
    """Prompt-processing tokens/s: one forward over a ``length``-token prompt (after a warm-up)."""
    ids = (torch.arange(length, device=device) * 7919 % vocab).unsqueeze(0)
    with torch.inference_mode():
        model(ids)
        sync(device)
        start = time.perf_counter()
        model(ids)
        sync(device)
    return length / (time.perf_counter() - start)


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def begin_row(device: str) -> dict:
    """Free what earlier rows left and reset the peak counters, so a row's peaks are its own."""
    gc.collect()
    start = {"vram_base": 0, "hwm_reset": False}
    if device == "cuda":
        torch.cuda.empty_cache()
        host_empty_cache = getattr(torch._C, "_host_emptyCache", None)  # pinned blocks torch keeps cached
        if host_empty_cache is not None:
            host_empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start["vram_base"] = torch.cuda.memory_allocated()
    try:  # "5" resets the kernel's RSS high-water mark (VmHWM); ru_maxrss never resets
        Path("/proc/self/clear_refs").write_text("5")
        start["hwm_reset"] = True
    except OSError:
        pass
    return start


def memory_fields(device: str, start: dict) -> dict:
    """Peak VRAM (over the row's base, and total), current RSS and, where it could be reset, peak RSS."""
    out = {"rss_after_bytes": _rss_bytes()}
    if start["hwm_reset"]:
        status = Path("/proc/self/status").read_text()
        out["peak_rss_bytes"] = int(status.split("VmHWM:")[1].split()[0]) * 1024
    if device == "cuda":
        out["peak_vram_bytes"] = torch.cuda.max_memory_allocated() - start["vram_base"]
        out["peak_vram_total_bytes"] = torch.cuda.max_memory_allocated()
    return out
