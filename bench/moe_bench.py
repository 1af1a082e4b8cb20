"""Mixture-of-experts benchmark: block-granular vs expert-granular streaming of a synthetic MoE, one process.

Usage (exit status 1 when a gate fails, after writing OUT.json):
    python3 bench/moe_bench.py OUT.json --shape qwen3-30b-a3b --budget-gb 8 [--tokens 8]
    python3 bench/moe_bench.py OUT.json --shape mixtral-8x7b --budget-gb 24
    python3 bench/moe_bench.py OUT.json --dry-run        # tiny-qwen3-moe on the CPU (CI smoke test)

The model is synthetic (``offload_runtime.synthetic``): generated and encoded on the device once (one source
shared by every row), never materialised. Rows, greedy decoding at batch 1 after a warm-up:

* ``block``: every MoE block streamed with all its experts (today's block granularity);
* ``expert``: only the routed experts move, through the compressed expert cache (the default policy,
  ``layer-lru``), filled at dispatch;
* ``expert-lru``: the same with plain LRU (not in the default rows): what the policy is worth;
* ``expert+speculate``: the same, prefetching the next layer's likely experts on a guess;
* ``expert-decoded``: ``expert`` with a cache of decoded entries (fewer entries in the same bytes, no decode
  on a hit) instead of compressed ones;
* ``resident``: every weight decoded in VRAM (a budget above the model's size; not in the default rows): the
  model's own speed at this shape, what no offloading can beat, and the reference of ``--no-reference``.

``--profile ROW`` runs that row's generation once more under cProfile (after its timing) and records the
functions with the most own host time: where a step's host time goes.

Each row records tok/s, bytes over PCIe per token (measured by the runtime), the expert cache's hit rate and
wait time, peak weight memory against the budget, and whether its tokens equal the layer-by-layer reference
(each block materialised on the device only while it runs, its experts generated from the same seeds). The
PCIe bound of the expert rows is the measured pinned H2D rate over their measured bytes per token.
Random weights route nearly uniformly: their cache hit rates are a floor for trained models.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
from gpu_e2e import h2d_gbps  # this script's folder is on sys.path
from synthetic_70b import generate, prompt_ids, sync
from torch import nn

GIB = 1 << 30
ROWS = ("block", "expert", "expert+speculate")
EXTRA_ROWS = ("resident", "expert-decoded", "expert-lru")
RESIDENT_GB = 1024.0  # a budget above every synthetic shape: every group resident
GATE_SPEEDUP = {"mixtral-8x7b": 2.5, "qwen3-30b-a3b": 5.0}


class MoeLayerByLayer:
    """The synthetic MoE with each block (and its experts, stacked) materialised only while it runs."""

    def __init__(self, config, seed: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> None:
        from offload_runtime.loaders.groups import find_groups
        from offload_runtime.synthetic import synthetic_skeleton

        self.model = synthetic_skeleton(config, dtype)
        self.state = self.model.state_dict()  # shapes and dtypes, once (the placeholders keep both)
        self.seed, self.device, self.dtype = seed, device, dtype
        specs = find_groups(self.model, experts=True)
        self.experts_of: dict[str, list] = {}
        self.groups = []
        for spec in specs:
            if spec.kind == "expert":
                self.experts_of.setdefault(self.groups[-1].name, []).append(spec)
            else:
                self.groups.append(spec)
        for name, buf in list(self.model.named_buffers()):
            owner, attr = self._owner(name)
            owner._buffers[attr] = buf.to(device)
        self._placeholders()
        for group in self.groups:
            for user in group.users:
                module = self.model.get_submodule(user)
                module.register_forward_pre_hook(lambda m, a, g=group: self._place(g))
                module.register_forward_hook(lambda m, a, o, g=group: self._placeholders(g))

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        path, _, attr = name.rpartition(".")
        return (self.model.get_submodule(path) if path else self.model), attr

    def _placeholders(self, group=None) -> None:
        for name, param in list(self.model.named_parameters()):
            if group is not None and not name.startswith(group.name + "."):
                continue
            owner, attr = self._owner(name)
            stub = torch.empty(1, dtype=param.dtype, device=self.device).expand(param.shape)
            owner._parameters[attr] = nn.Parameter(stub, requires_grad=False)

    def _place(self, group) -> None:
        from offload_runtime.loaders.moe import parse_slice_name
        from offload_runtime.synthetic import init_group

        for name, tensor in init_group(
            self.model, group, self.seed, self.device, self.dtype, state=self.state
        ).items():
            owner, attr = self._owner(name)
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
        stacks: dict[str, torch.Tensor] = {}
        for spec in self.experts_of.get(group.name, []):
            for name, tensor in init_group(
                self.model, spec, self.seed, self.device, self.dtype, state=self.state
            ).items():
                param, index = parse_slice_name(name)
                if param not in stacks:
                    owner, attr = self._owner(param)
                    shape = owner._parameters[attr].shape
                    stacks[param] = torch.empty(shape, dtype=tensor.dtype, device=self.device)
                stacks[param][index].copy_(tensor)
        for param, tensor in stacks.items():
            owner, attr = self._owner(param)
            owner._parameters[attr] = nn.Parameter(tensor, requires_grad=False)


def pcie_bytes(stats) -> int:
    experts = stats.experts.h2d_bytes if stats.experts is not None else 0
    return stats.h2d_bytes + experts


def run_row(row: str, args, config, source, device, ids) -> tuple[dict, torch.Tensor]:
    from offload_runtime.synthetic import dispatch_synthetic

    start = time.perf_counter()
    model = dispatch_synthetic(
        config,
        RESIDENT_GB if row == "resident" else args.budget_gb,
        codec=args.codec,
        device=device,
        source=source,
        experts="block" if row in ("block", "resident") else "expert",
        expert_cache="decoded" if row == "expert-decoded" else "auto",
        expert_policy="lru" if row == "expert-lru" else "layer-lru",
        speculate=row == "expert+speculate",
        host_budget_gb=args.host_budget_gb,
    )
    built = time.perf_counter() - start
    plan, stats = model.offload_plan, model.offload_stats
    with torch.inference_mode():
        generate(model, ids, 2)  # warm-up: execution order, allocator, first-use checks
        sync(device)
        start = time.perf_counter()
        generate(model, ids, 1)  # the prefill alone: a decode rate without it (prompts hit most experts)
        sync(device)
        prefill = time.perf_counter() - start
        before_bytes, before_experts = pcie_bytes(stats), _expert_counts(stats)
        start = time.perf_counter()
        tokens = generate(model, ids, args.tokens)
        sync(device)
        seconds = time.perf_counter() - start
    per_token = (pcie_bytes(stats) - before_bytes) / args.tokens
    after = _expert_counts(stats)
    result = {
        "row": row,
        "dispatch_s": built,
        "tok_s": args.tokens / seconds,
        "prefill_s": prefill,
        "decode_tok_s": (args.tokens - 1) / (seconds - prefill) if seconds > prefill else None,
        "pcie_bytes_per_token": per_token,
        "plan": plan.summary(),
        "device_bytes": plan.device_bytes,
        "budget_bytes": plan.budget_bytes,
        "peak_weight_bytes": stats.peak_weight_bytes,
        "experts": {k: after[k] - before_experts.get(k, 0) for k in after},
        "experts_implementation": getattr(model.config, "_experts_implementation", None),
    }
    if plan.experts is not None:
        e = result["experts"]
        result["hit_rate"] = e["hits"] / e["requested"] if e["requested"] else 0.0
        result["cache_entries"] = plan.experts.capacity
        result["cache_policy"] = plan.experts.policy
        result["warmed_at_dispatch"] = stats.experts.warmed
        result["speculation_precision"] = e["speculated_used"] / e["speculated"] if e["speculated"] else None
    if row == args.profile:
        result["profile"] = profile_generate(model, ids, args.tokens, device)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        # freed pinned buffers stay in torch's host cache: hand them back, or the next row's host budget
        # (a share of the available RAM) is smaller than this row's was
        getattr(torch._C, "_host_emptyCache", lambda: None)()
    return result, tokens


def profile_generate(model, ids, tokens: int, device: torch.device, top: int = 30) -> dict:
    """cProfile of one more generation: the functions with the most own time (host seconds; cProfile's
    overhead inflates Python-heavy ones, so compare shares, not absolute times)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    with torch.inference_mode():
        profiler.enable()
        generate(model, ids, tokens)
        sync(device)
        profiler.disable()
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    total = sum(v[2] for v in stats.stats.values())
    return {
        "total_s": total,
        "tokens": tokens,
        "top_own_time": [
            {"function": f"{Path(f).name}:{line}:{name}", "calls": v[1], "own_s": v[2], "cum_s": v[3]}
            for (f, line, name), v in rows
        ],
    }


def _expert_counts(stats) -> dict:
    if stats.experts is None:
        return {}
    return {k: v for k, v in vars(stats.experts).items() if isinstance(v, int | float)}


def gates(results: dict) -> dict:
    rows = {r["row"]: r for r in results["rows"] if "tok_s" in r}
    compared = [r for r in results["rows"] if "tok_s" in r and not r.get("is_reference")]
    out = {"lossless_rows_identical": all(r.get("identical") for r in compared)}
    out["peak_weight<=budget"] = all(r["device_bytes"] <= r["budget_bytes"] for r in rows.values())
    need = GATE_SPEEDUP.get(results["shape"])
    if need and "block" in rows and "expert" in rows:
        out[f"expert>={need}x_block"] = rows["expert"]["tok_s"] >= need * rows["block"]["tok_s"]
        if rows["expert"].get("decode_tok_s") and rows["block"].get("decode_tok_s"):
            results["decode_speedup"] = rows["expert"]["decode_tok_s"] / rows["block"]["decode_tok_s"]
    if "resident" in rows and "expert" in rows:  # what no offloading can beat: the model's own speed
        results["expert_vs_resident"] = rows["expert"]["tok_s"] / rows["resident"]["tok_s"]
    h2d = results.get("h2d_pinned_GBps")
    if h2d and "expert" in rows and rows["expert"]["pcie_bytes_per_token"]:
        bound = h2d * 1e9 / rows["expert"]["pcie_bytes_per_token"]
        results["expert_pcie_bound_tok_s"] = bound
        out["expert>=0.7x_pcie_bound"] = rows["expert"]["tok_s"] >= 0.7 * bound
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--shape", default="qwen3-30b-a3b")
    parser.add_argument("--budget-gb", type=float, default=8.0)
    parser.add_argument("--host-budget-gb", type=float, default=None)
    parser.add_argument("--codec", default="ans")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument(
        "--rows", default=",".join(ROWS), help="comma-separated, of: " + ", ".join(ROWS + EXTRA_ROWS)
    )
    parser.add_argument("--profile", default=None, help="a row to profile once more under cProfile")
    parser.add_argument("--no-reference", action="store_true", help="skip the layer-by-layer reference")
    parser.add_argument("--dry-run", action="store_true", help="tiny-qwen3-moe, zstd, on the CPU")
    args = parser.parse_args()
    from offload_runtime.synthetic import synthetic_config, synthetic_skeleton, synthetic_source

    if args.dry_run:
        args.shape, args.codec, args.tokens, args.budget_gb = "tiny-qwen3-moe", "zstd", 4, 0.0009
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", 0)
    config = synthetic_config(args.shape)
    ids = prompt_ids(args.prompt_len, config.vocab_size, device)
    results: dict = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "shape": args.shape,
        "budget_gb": args.budget_gb,
        "codec": args.codec,
        "tokens": args.tokens,
        "rows": [],
        "note": "random weights route nearly uniformly: cache hit rates are a floor for trained models",
    }
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.1f} s] {message}", flush=True)

    try:
        if device.type == "cuda":
            results["h2d_pinned_GBps"] = h2d_gbps()
            log(f"H2D {results['h2d_pinned_GBps']:.1f} GB/s")
        reference = None
        if not args.no_reference:
            ref_model = MoeLayerByLayer(config, 0, device)
            with torch.inference_mode():
                reference = generate(ref_model.model, ids, args.tokens + 2)
            del ref_model
            gc.collect()
            log(f"reference tokens {reference.tolist()}")
        source = synthetic_source(synthetic_skeleton(config), codec=args.codec, device=device)
        results["source_s"] = time.perf_counter() - started
        log(f"source encoded: {source}")
        for row in args.rows.split(","):
            try:
                result, tokens = run_row(row, args, config, source, device, ids)
            except Exception as exc:  # a row that fails is recorded; the gates then fail
                result, tokens = {"row": row, "error": f"{type(exc).__name__}: {exc}"}, None
            if row == "resident" and reference is None and tokens is not None:
                reference = tokens  # the rows after it compare with it
                results["reference"] = "resident row"
                result["is_reference"] = True
            elif tokens is not None and reference is not None:
                result["identical"] = bool(torch.equal(tokens, reference[: args.tokens]))
            elif tokens is not None:
                result["identical"] = None
            results["rows"].append(result)
            log(json.dumps(result))
            Path(args.out).write_text(json.dumps(results, indent=2))  # a run cut short keeps its rows
        results["gates"] = gates(results)
        log(json.dumps(results["gates"]))
    finally:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if not all(results.get("gates", {}).values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
