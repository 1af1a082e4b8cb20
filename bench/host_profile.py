"""Where the host's time goes in batch-1 decoding: cProfile of greedy generation, resident vs offloaded.

Usage:
    python3 bench/host_profile.py OUT.json [--layers 8] [--tokens 16] [--codec ans] [--budget all-in-vram]

Batch-1 decoding of these shapes is launch-bound: the GPU waits for the Python thread that launches the
kernels, so every microsecond the runtime spends on the host per group shows in tok/s. This profiles the
same generate() on the resident model and on the offloaded one (every payload compressed in VRAM by
default, or streamed from pinned RAM) and writes the functions with the most own time, per token.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
from pathlib import Path

import torch
from gpu_e2e import build_model, minimum_budget_gb, timed_generate, vram_budget_gb


def profile_generate(model, ids, tokens: int, top: int = 25) -> dict:
    timed_generate(model, ids, tokens, repeats=1)  # warm-up (order learned, kernels chosen)
    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    start = time.perf_counter()
    profiler.enable()
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    profiler.disable()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        rows.append(
            {
                "function": f"{Path(file).name}:{line}:{name}",
                "calls_per_token": calls / tokens,
                "own_us_per_token": own / tokens * 1e6,
                "cumulative_us_per_token": cumulative / tokens * 1e6,
            }
        )
    rows.sort(key=lambda r: -r["own_us_per_token"])
    return {"ms_per_token_profiled": seconds / tokens * 1e3, "top_own_time": rows[:top]}


def main() -> None:
    import offload_runtime

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--codec", default="ans")
    parser.add_argument("--budget", choices=["all-in-vram", "pinned"], default="all-in-vram")
    args = parser.parse_args()

    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278]], device="cuda")
    model = build_model(args.layers, "cuda", tiny=False)
    results = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d"), **vars(args)}
    results["resident"] = profile_generate(model, ids, args.tokens)
    path = Path(tempfile.mkdtemp(prefix="host_profile_")) / "model.safetensors"
    offload_runtime.pack(model, path, codec=args.codec, progress=False, device="cuda")
    results[f"stored_bytes_{args.codec}"] = path.stat().st_size
    if args.budget == "all-in-vram":
        budget = vram_budget_gb(results, args.codec, path)
    else:  # the planner's minimum: every block streamed from pinned RAM
        budget = minimum_budget_gb(path, "cuda") * 1.001
    del model
    torch.cuda.empty_cache()
    offloaded = offload_runtime.load_compressed(path, budget_gb=budget, device="cuda")
    results["plan"] = str(offloaded.offload_plan)
    results["offloaded"] = profile_generate(offloaded, ids, args.tokens)
    for kind in ("resident", "offloaded"):
        print(kind, f"{results[kind]['ms_per_token_profiled']:.2f} ms/token (profiled)")
        for row in results[kind]["top_own_time"][:12]:
            own, calls = row["own_us_per_token"], row["calls_per_token"]
            print(f"  {own:8.1f} us  {calls:6.1f} calls  {row['function']}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    path.unlink()


if __name__ == "__main__":
    main()
