"""Host time per call of a bound fused12 linear layer at batch 1: Triton's launch vs a replayed one (H200).

A model decoding one token calls its linear layers back to back; when the host needs longer per call than
the GPU needs per kernel, host time sets the speed. For each shape (a 2 B layer's and a 70 B layer's), in one
process: microseconds of host time per call (``calls`` back-to-back calls, then one synchronisation) for

* ``cublas``: ``F.linear`` of the bf16 weight (what a resident layer runs);
* ``fused_standard``: ``fused_linear`` with Triton's standard launch;
* ``fused_replayed``: ``fused_linear`` with the weight's ``LaunchCache`` (what ``compressed_linear`` does);

and the GPU time per call from CUDA events over the same loop. Writes OUT.json.

Usage: ``python3 bench/fused_launch_overhead.py OUT.json``
"""

from __future__ import annotations

import json
import sys
import time

import torch

SHAPES = ((4096, 4096), (1024, 4096), (14336, 4096), (8192, 8192), (1024, 8192), (28672, 8192))


def _time(fn, calls: int) -> dict:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {
        "host_us": host / calls * 1e6,
        "wall_us": wall / calls * 1e6,
        "gpu_us": start.elapsed_time(end) / calls * 1e3,
    }


def main() -> None:
    from offload_runtime.native import fused12_format as fmt
    from offload_runtime.native.fused12_linear import fused_linear
    from offload_runtime.native.triton_launch import LaunchCache

    out = sys.argv[1]
    rows = []
    for n, k in SHAPES:
        weight = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
        planes = fmt.encode(weight)
        x = torch.randn(1, k, device="cuda").bfloat16()
        cache = LaunchCache()
        row = {"n": n, "k": k, "m": 1}
        for name, fn in (
            ("cublas", lambda x=x, w=weight: torch.nn.functional.linear(x, w)),
            ("fused_standard", lambda x=x, p=planes: fused_linear(x, p)),
            ("fused_replayed", lambda x=x, p=planes, c=cache: fused_linear(x, p, launches=c)),
        ):
            row[name] = min((_time(fn, 300) for _ in range(3)), key=lambda r: r["wall_us"])
        row["replays"] = cache.replays
        same = torch.equal(fused_linear(x, planes), fused_linear(x, planes, launches=cache))
        row["replayed_equals_standard"] = same
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "what": "host and GPU time per batch-1 linear call (bench/fused_launch_overhead.py)",
        "device": torch.cuda.get_device_name(0),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "rows": rows,
    }
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
