"""Where the host's time goes in batch-1 decoding: cProfile of greedy generation, resident vs offloaded.

Usage:
    python3 bench/host_profile.py OUT.json [--layers 8] [--tokens 16] [--codec ans] [--budget all-in-vram]
        [--execute-compressed]   # with --codec fused12: the executed_compressed tier

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


def linear_call_times(model, calls: int = 2000) -> dict:
    """Per-call time of a bound (executed compressed) linear layer at batch 1, called back to back, beside
    ``F.linear`` on a bf16 weight of the same shape, and a cProfile of the bound calls (where the host time
    goes when no model code runs around them)."""
    import torch.nn.functional as F

    from offload_runtime.compressed_linear import bound_weights

    name = next(n for n in bound_weights(model) if n.endswith("gate_proj"))
    layer = model.get_submodule(name)
    x = torch.randn(1, 1, layer.in_features, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(layer.out_features, layer.in_features, device="cuda", dtype=torch.bfloat16)

    def per_call(fn) -> float:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls * 1e6

    with torch.inference_mode():
        out = {"layer": name, "bound_module_us": per_call(lambda: layer(x))}
        out["bound_forward_us"] = per_call(lambda: layer.forward(x))
        out["F.linear_us"] = per_call(lambda: F.linear(x, weight))
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            layer(x)
        profiler.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler)
    own_time = {f"{Path(f).name}:{line}:{fn}": v[2] for (f, line, fn), v in stats.stats.items()}
    rows = sorted(((own / calls * 1e6, where) for where, own in own_time.items()), reverse=True)
    out["profile_own_us_per_call"] = [[round(us, 2), where] for us, where in rows[:15]]
    return out


def main() -> None:
    import offload_runtime

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--codec", default="ans")
    parser.add_argument("--budget", choices=["all-in-vram", "pinned"], default="all-in-vram")
    parser.add_argument("--execute-compressed", action="store_true", help="with --codec fused12")
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
    offloaded = offload_runtime.load_compressed(
        path, budget_gb=budget, device="cuda", execute_compressed=args.execute_compressed
    )
    results["plan"] = str(offloaded.offload_plan)
    results["offloaded"] = profile_generate(offloaded, ids, args.tokens)
    if args.execute_compressed:
        results["linear_call_us"] = linear_call_times(offloaded)
        print("one linear layer, host+GPU per call:", results["linear_call_us"])
    for kind in ("resident", "offloaded"):
        print(kind, f"{results[kind]['ms_per_token_profiled']:.2f} ms/token (profiled)")
        for row in results[kind]["top_own_time"][:12]:
            own, calls = row["own_us_per_token"], row["calls_per_token"]
            print(f"  {own:8.1f} us  {calls:6.1f} calls  {row['function']}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    path.unlink()


if __name__ == "__main__":
    main()
