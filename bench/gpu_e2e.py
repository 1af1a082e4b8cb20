"""End-to-end GPU benchmark: resident vs accelerate vs offload_runtime on a Llama-shaped model.

Usage: python3 bench/gpu_e2e.py OUT.json [--layers 8] [--tokens 16]

Measures, in one process on one GPU: pinned and pageable host->device GB/s; resident tok/s; accelerate
``cpu_offload`` tok/s; offload_runtime with ``raw`` and ``ans`` at budgets that force every group to be
streamed from pinned RAM, from disk, half resident, and everything compressed in VRAM. Every row records
tok/s, compressed bytes per token, effective GB/s over the measured H2D GB/s, peak weight memory against
the budget, total peak VRAM, peak RSS and whether its tokens equal the resident run's.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import tempfile
import time
from pathlib import Path

import torch


def h2d_gbps(nbytes: int = 1 << 30, pinned: bool = True, repeats: int = 5) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=pinned)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return nbytes / sorted(times)[len(times) // 2] / 1e9


def llama_config(layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )


def build_model(layers: int, device: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(layers), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model.eval()


def timed_generate(model, ids: torch.Tensor, tokens: int) -> tuple[torch.Tensor, float]:
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        torch.cuda.synchronize()
    return out[0, ids.shape[1] :].cpu(), tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--accelerate-tokens", type=int, default=4)
    args = parser.parse_args()

    import offload_runtime

    results: dict = {"device": torch.cuda.get_device_name(0), "layers": args.layers, "rows": []}
    results["h2d_pinned_GBps"] = h2d_gbps(pinned=True)
    results["h2d_pageable_GBps"] = h2d_gbps(pinned=False)
    h2d = results["h2d_pinned_GBps"]
    print(f"H2D pinned {h2d:.1f} GB/s, pageable {results['h2d_pageable_GBps']:.1f} GB/s", flush=True)
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278]], device="cuda")

    model = build_model(args.layers, "cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results["weight_bytes"] = weight_bytes
    ref_tokens, tok_s = timed_generate(model, ids, args.tokens)
    results["rows"].append({"method": "resident", "tok_s": tok_s, "bytes_per_token": 0, "identical": True})
    print(f"resident: {tok_s:.2f} tok/s", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="offload_bench_"))
    containers = {}
    for codec in ("raw", "ans"):
        path = tmp / f"model-{codec}.safetensors"
        start = time.perf_counter()
        offload_runtime.pack(model, path, codec=codec, progress=False)
        containers[codec] = path
        results[f"pack_{codec}_s"] = time.perf_counter() - start
        results[f"stored_bytes_{codec}"] = path.stat().st_size
        print(
            f"packed {codec}: {path.stat().st_size / 2**30:.2f} GiB in {results[f'pack_{codec}_s']:.1f} s",
            flush=True,
        )

    # accelerate's cpu_offload: weights in (pageable) CPU RAM, copied layer by layer
    from accelerate import cpu_offload

    cpu_model = model.to("cpu")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    cpu_offload(cpu_model, execution_device=torch.device("cuda"))
    acc_tokens, acc_tok_s = timed_generate(cpu_model, ids, args.accelerate_tokens)
    results["rows"].append(
        {
            "method": "accelerate cpu_offload",
            "tok_s": acc_tok_s,
            "bytes_per_token": weight_bytes,
            "identical": bool(torch.equal(acc_tokens, ref_tokens[: len(acc_tokens)])),
        }
    )
    print(f"accelerate cpu_offload: {acc_tok_s:.2f} tok/s", flush=True)
    del cpu_model
    gc.collect()

    gib = 2**30
    scenarios = {
        "streamed from pinned RAM": dict(budget_gb=None, host_budget_gb=None),
        "streamed from disk": dict(budget_gb=None, host_budget_gb=0.0),
        "half resident": dict(budget_gb=weight_bytes / 2 / gib, host_budget_gb=None),
        "compressed in VRAM": dict(budget_gb="compressed", host_budget_gb=None),
    }
    for codec, path in containers.items():
        for name, sc in scenarios.items():
            budget = sc["budget_gb"]
            if budget is None:
                budget = 3 * weight_bytes / (args.layers + 2) / gib  # a few groups' worth: forces streaming
            elif budget == "compressed":
                budget = results[f"stored_bytes_{codec}"] / gib + 3 * weight_bytes / (args.layers + 2) / gib
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row = {"method": f"offload_runtime {codec}", "scenario": name, "budget_gb": budget}
            try:
                kwargs = {} if sc["host_budget_gb"] is None else {"host_budget_gb": sc["host_budget_gb"]}
                m = offload_runtime.load_compressed(path, budget_gb=budget, device="cuda", **kwargs)
                tokens, tok_s = timed_generate(m, ids, args.tokens)
                stats = m.offload_stats
                row.update(
                    tok_s=tok_s,
                    identical=bool(torch.equal(tokens, ref_tokens)),
                    plan=str(m.offload_plan),
                    stats={k: v for k, v in vars(stats).items() if isinstance(v, (int, float))}
                    if hasattr(stats, "__dict__")
                    else str(stats),
                    peak_vram_bytes=torch.cuda.max_memory_allocated(),
                )
                offload_runtime.remove_offload(m)
                del m
            except Exception as exc:  # record the failure in the results and go on with the other rows
                row["error"] = f"{type(exc).__name__}: {exc}"
            gc.collect()
            results["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)

    results["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
