"""End-to-end benchmark: resident vs the strongest peers vs offload_runtime on a Llama-shaped model.

Usage (exit status 1 when a gate fails, after writing OUT.json):
    python3 bench/gpu_e2e.py OUT.json [--layers 8|32] [--tokens 16] [--codecs raw,ans,int8] [--scenarios ...]
    python3 bench/gpu_e2e.py OUT.json --dry-run                       # tiny model on the CPU (CI smoke test)

Measured first, in the same process: pinned and pageable host->device GB/s. Then greedy decoding at
batch 1 for: the GPU-resident model; the peers (``peers.py``: diffusers' group offloading at leaf level
with streams and at block level, AirLLM, accelerate ``cpu_offload`` and ``disk_offload``; a peer library
that is not installed gives a ``skipped`` row); offload_runtime
with each codec at budgets that force every group to stream from pinned RAM, from disk, half resident, a
budget of 3/4 of the weights, and (compressing codecs) every payload compressed in VRAM plus two slots;
the lossy ``int8`` runs only the pinned-RAM and in-VRAM scenarios. Each row records tok/s, 512-token
prefill tok/s, (compressed) bytes streamed per token, effective GB/s over the measured H2D GB/s, peak
weight memory vs budget, peak VRAM, RSS, and whether its tokens equal the resident run's (lossy rows:
also the top-1 agreement with the resident model). Gates (``gates``) compare ratios measured in this run;
one of them: ``ans`` streamed from pinned RAM at least 1.8x the fastest peer row."""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import torch
from e2e_measure import begin_row, memory_fields, timed_generate, timed_prefill
from peers import PEER_ROWS, peer_rows

from offload_runtime.scheduler.tiers import TIERS

GIB = 2**30
SCENARIOS = (
    "streamed from pinned RAM",
    "streamed from disk",
    "half resident",
    "budget 0.75x weights",
    "all compressed in VRAM",
    "all executed compressed",
)
LOSSY_SCENARIOS = ("streamed from pinned RAM", "all compressed in VRAM")  # int8: the rows the issue asks for
# fused12 groups kept compressed and computed from (execute_compressed=True): exact weights, another
# summation order than cuBLAS, so the row reports top-1 agreement and max |logit difference| beside tokens
EXECUTED = "all executed compressed"


def h2d_gbps(nbytes: int = 1 << 30, pinned: bool = True, repeats: int = 10) -> float:
    """Host->device GB/s of the best of ``repeats`` 1 GiB copies: the copy engine's sustained rate, which a
    median under-reports when other work on the machine interferes with a single copy."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dev.copy_(host, non_blocking=pinned)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del host, dev
    return nbytes / min(times[1:]) / 1e9


def llama_config(layers: int, tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def config_name(layers: int, tiny: bool) -> str:
    if tiny:
        return "tiny"
    shape = {8: "llama-2b", 32: "llama-7b-shape"}.get(layers, f"llama-{layers}-layer")
    return f"{shape} ({layers} x 4096, MLP 14336, GQA 8, vocab 32000)"


def build_model(layers: int, device: str, tiny: bool):
    """Random normal (std 0.02) bf16 weights, built directly on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(llama_config(layers, tiny), dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model.eval()


def minimum_budget_gb(path: Path, device: str) -> float:
    """The planner's minimum working set for this container (read from the BudgetError it raises)."""
    import offload_runtime
    from offload_runtime.errors import BudgetError

    try:
        offload_runtime.remove_offload(offload_runtime.load_compressed(path, budget_gb=1e-6, device=device))
    except BudgetError as exc:
        return exc.expected / GIB
    raise RuntimeError("a budget of 1 KiB was accepted")


def top1(model, seq: torch.Tensor) -> torch.Tensor:
    """Argmax next token at every position of one teacher-forced forward over ``seq`` (on the CPU)."""
    with torch.inference_mode():
        return model(seq).logits[0].argmax(-1).cpu()


def vram_budget_gb(results: dict, codec: str, path: Path) -> float:
    """Every payload compressed in VRAM, two slots of the largest group and, for a lossy codec, the decode
    workspace of its largest stored (int8 + scales) layout."""
    from offload_runtime.loaders import ContainerReader

    with ContainerReader(path) as reader:
        largest = max(g.decoded_size for g in reader.groups)
        stored = max((g.stored_layout.size for g in reader.groups if g.stored_layout is not None), default=0)
    return (results[f"stored_bytes_{codec}"] + 2 * largest + stored) / GIB + 0.02


def paired_in_vram(results: dict, model, ids, path: Path, codec: str, tokens: int, rounds: int = 3) -> None:
    """Resident vs every payload compressed in VRAM, measured alternately in the same process state.

    Batch-1 decoding is launch-bound, so the host's state moves both numbers (the same resident model ran
    1.5x slower at the end of one run than at its start): the 0.7x gate needs them side by side.
    """
    import offload_runtime

    offloaded = offload_runtime.load_compressed(
        path, budget_gb=vram_budget_gb(results, codec, path), device="cuda"
    )
    resident_rates, offloaded_rates = [], []
    for _ in range(rounds):
        resident_rates.append(timed_generate(model, ids, tokens)[1])
        out, rate = timed_generate(offloaded, ids, tokens)
        offloaded_rates.append(rate)
    resident, ours = sorted(resident_rates)[rounds // 2], sorted(offloaded_rates)[rounds // 2]
    results["paired_in_vram"] = {
        "codec": codec,
        "resident_tok_s": resident_rates,
        "in_vram_tok_s": offloaded_rates,
        "ratio_of_medians": ours / resident,
        # host interference only ever slows a launch-bound run down: the fastest rounds are the least noisy
        "ratio_of_best": max(offloaded_rates) / max(resident_rates),
        "identical": bool(torch.equal(out, timed_generate(model, ids, tokens, repeats=1)[0])),
        "plan_tiers": sorted({p.tier.name for p in offloaded.offload_plan.groups}),
    }
    print(f"paired: resident {resident:.1f} tok/s, {codec} in VRAM {ours:.1f} tok/s", flush=True)
    offload_runtime.remove_offload(offloaded)


def write_atomic(path: str | Path, results: dict) -> None:
    """``results`` as JSON at ``path``, replaced whole (a reader never sees half a file)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


def run_scenarios(
    results: dict,
    containers: dict,
    ref: dict,
    weight_bytes: int,
    tokens: int,
    device: str,
    wanted: list,
    out_path: str | Path | None = None,
):
    import offload_runtime
    from offload_runtime.native import get_codec

    ids, ref_tokens = ref["ids"], ref["tokens"]
    h2d = results.get("h2d_pinned_GBps")
    for codec, path in containers.items():
        lossless = get_codec(codec).lossless
        minimum = minimum_budget_gb(path, device)
        budgets = {
            "streamed from pinned RAM": (minimum * 1.001, None),
            "streamed from disk": (minimum * 1.001, 0.0),
            "half resident": (minimum + weight_bytes / 2 / GIB, None),
            # a budget of 3/4 of the weights: with ans the rest fits compressed in VRAM, raw must stream
            "budget 0.75x weights": (max(minimum * 1.001, 0.75 * weight_bytes / GIB), None),
        }
        if codec != "raw":  # every payload compressed in VRAM plus two slots: less than the weights
            budgets["all compressed in VRAM"] = (vram_budget_gb(results, codec, path), None)
        if get_codec(codec).executes_compressed:
            budgets[EXECUTED] = (vram_budget_gb(results, codec, path), None)
            if EXECUTED in wanted:  # its decode-to-slot row is ans's, slower: the executed row replaces it
                budgets.pop("all compressed in VRAM", None)
        names = [n for n in wanted if n in budgets and (lossless or n in LOSSY_SCENARIOS)]
        if device == "cpu":  # nothing to compress into: the CPU has no VRAM
            names = [
                n for n in names if n not in ("budget 0.75x weights", "all compressed in VRAM", EXECUTED)
            ]
        for name in names:
            budget, host_budget = budgets[name]
            start = begin_row(device)
            row = {
                "method": f"offload_runtime {codec}",
                "scenario": name,
                "budget_gb": budget,
                "lossless": lossless,
            }
            try:
                kwargs = {} if host_budget is None else {"host_budget_gb": host_budget}
                if name == EXECUTED:
                    kwargs["execute_compressed"] = True
                    row["exact_weights"] = True  # not bitwise: another summation order than cuBLAS
                model = offload_runtime.load_compressed(path, budget_gb=budget, device=device, **kwargs)
                plan = model.offload_plan
                before = _stats_dict(model.offload_stats)
                out, tok_s = timed_generate(model, ids, tokens, repeats=3 if "disk" not in name else 1)
                after = _stats_dict(model.offload_stats)
                if name == EXECUTED:
                    row["top1_agreement"] = float((top1(model, ref["seq"]) == ref["top1"]).double().mean())
                    row["token_agreement"] = float((out == ref_tokens).double().mean())
                if not lossless:  # a lossy codec's tokens may differ: how often its top-1 agrees instead
                    row["top1_agreement"] = float((top1(model, ref["seq"]) == ref["top1"]).double().mean())
                    row["token_agreement"] = float((out == ref_tokens).double().mean())
                row["prefill_512_tok_s"] = timed_prefill(model, 512, model.config.vocab_size, device)
                streamed_bytes = sum(p.stored_bytes for p in plan.groups if p.tier.crosses_pcie(plan.device))
                row.update(
                    tok_s=tok_s,
                    identical=bool(torch.equal(out, ref_tokens)),
                    tiers={t.name.upper(): len(plan.in_tier(t)) for t in TIERS},
                    h2d_bytes_per_token=streamed_bytes,
                    stats_delta={k: after[k] - before.get(k, 0) for k in after},
                    peak_weight_bytes=after.get("peak_weight_bytes"),
                    budget_bytes=int(budget * GIB),
                    plan=str(plan),
                )
                if h2d:
                    row["effective_GBps"] = streamed_bytes * tok_s / 1e9
                    row["fraction_of_h2d"] = row["effective_GBps"] / h2d
                    row["limit_tok_s"] = h2d * 1e9 / streamed_bytes if streamed_bytes else None
                row.update(memory_fields(device, start))
                offload_runtime.remove_offload(model)
                del model
            except Exception as exc:  # record the failure and go on with the other rows
                row["error"] = f"{type(exc).__name__}: {exc}"
            results["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "plan"}), flush=True)
            if out_path is not None:  # rows so far survive a run cut short by a time limit
                write_atomic(out_path, results)


def _stats_dict(stats) -> dict:
    return {k: v for k, v in vars(stats).items() if isinstance(v, (int, float))}


def fastest_peer(rows: list) -> dict | None:
    """The fastest completed peer row (accelerate, diffusers, AirLLM), or None."""
    return max(
        (r for r in rows if r["method"] in PEER_ROWS and "tok_s" in r), key=lambda r: r["tok_s"], default=None
    )


def gates(results: dict) -> dict:
    rows = results["rows"]

    def find(method, scenario=None):
        return next(
            (r for r in rows if r["method"] == method and r.get("scenario") == scenario and "tok_s" in r),
            None,
        )

    out = {}
    ans_pinned = find("offload_runtime ans", "streamed from pinned RAM")
    peer = fastest_peer(rows)
    resident = max(
        (r for r in rows if r["method"] == "resident" and "tok_s" in r),
        key=lambda r: r["tok_s"],
        default=None,
    )
    vram = find("offload_runtime ans", "all compressed in VRAM")
    if ans_pinned and "fraction_of_h2d" in ans_pinned:
        out["ans_pinned_fraction_of_h2d>=0.85"] = ans_pinned["fraction_of_h2d"] >= 0.85
    if ans_pinned and peer:
        out["ans_pinned>=1.8x_fastest_peer"] = ans_pinned["tok_s"] >= 1.8 * peer["tok_s"]
    paired = results.get("paired_in_vram")
    if paired:  # measured side by side with the resident model (see paired_in_vram)
        ratio = paired.get("ratio_of_best", paired["ratio_of_medians"])
        out["in_vram>=0.7x_resident"] = ratio >= 0.7 and paired["identical"]
    elif vram and resident:
        out["in_vram>=0.7x_resident"] = vram["tok_s"] >= 0.7 * resident["tok_s"]
    out["peak_weight<=budget_all_rows"] = all(
        r["peak_weight_bytes"] <= r["budget_bytes"] for r in rows if r.get("peak_weight_bytes") is not None
    )
    # ours and the resident reruns; a peer's tokens are its own finding (shown in its row), not our gate's.
    # Rows written before the "lossless" key existed were all lossless.
    out["lossless_rows_identical"] = all(
        r.get("identical", False)
        for r in rows
        if "tok_s" in r
        and r.get("lossless", True)
        and r["method"] not in PEER_ROWS
        and not r.get("exact_weights")
    )
    return out


def name_list(known: tuple):
    """An argparse type: a comma list of names, each one of ``known``."""

    def parse(text: str) -> list:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown {unknown}; known: {', '.join(known)}")
        return names

    return parse


def main() -> None:
    from offload_runtime.native import available_codecs

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--layers", type=int, default=8, help="8: the 2 B shape; 32: the 7 B shape")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument(
        "--peer-tokens",
        "--accelerate-tokens",
        type=int,
        default=4,
        help="new tokens of the slow peers' rows (accelerate, diffusers block_level, AirLLM)",
    )
    parser.add_argument(
        "--codecs",
        type=name_list(tuple(available_codecs())),
        help="offload_runtime codecs (default raw,ans,int8; dry run raw,zstd,int8)",
    )
    parser.add_argument(
        "--scenarios",
        type=name_list(SCENARIOS + PEER_ROWS),
        default=list(SCENARIOS + PEER_ROWS),
        help="rows to run besides the resident reference (default all): " + ", ".join(SCENARIOS + PEER_ROWS),
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU, raw, zstd and int8")
    args = parser.parse_args()
    codecs = args.codecs or (["raw", "zstd", "int8"] if args.dry_run else ["raw", "ans", "int8"])

    import offload_runtime

    device = "cpu" if args.dry_run else "cuda"
    results: dict = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "layers": args.layers,
        "config": config_name(args.layers, args.dry_run),
        "tokens": args.tokens,
        "codecs": codecs,
        "scenarios": args.scenarios,
        "rows": [],
    }
    if device == "cuda":
        results["h2d_pinned_GBps"] = h2d_gbps(pinned=True)
        results["h2d_pageable_GBps"] = h2d_gbps(pinned=False)
        print(
            f"H2D pinned {results['h2d_pinned_GBps']:.1f} GB/s, "
            f"pageable {results['h2d_pageable_GBps']:.1f} GB/s",
            flush=True,
        )
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 29916, 432, 17204, 975, 278]]) % (
        512 if args.dry_run else 32000
    )
    ids = ids.to(device)

    start = begin_row(device)
    model = build_model(args.layers, device, args.dry_run)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results["weight_bytes"] = weight_bytes
    ref_tokens, tok_s = timed_generate(model, ids, args.tokens)
    prefill = timed_prefill(model, 512, model.config.vocab_size, device)
    results["rows"].append(
        {
            "method": "resident",
            "tok_s": tok_s,
            "identical": True,
            "lossless": True,
            "prefill_512_tok_s": prefill,
            **memory_fields(device, start),
        }
    )
    print(f"resident: {tok_s:.2f} tok/s", flush=True)
    # lossy rows are scored by teacher-forced top-1 against the resident model over prompt + its tokens
    seq = torch.cat([ids[0].cpu(), ref_tokens]).unsqueeze(0).to(device)
    ref = {"ids": ids, "tokens": ref_tokens, "seq": seq, "top1": top1(model, seq)}

    tmp = Path(tempfile.mkdtemp(prefix="offload_bench_"))
    try:
        containers = {}
        for codec in codecs:
            path = tmp / f"model-{codec}.safetensors"
            t0 = time.perf_counter()
            # device: int8 then stores through an inner codec that decodes there (zstd on the CPU, else ans)
            offload_runtime.pack(model, path, codec=codec, progress=False, device=device)
            containers[codec] = path
            results[f"pack_{codec}_s"] = time.perf_counter() - t0
            results[f"stored_bytes_{codec}"] = path.stat().st_size
            size, seconds = path.stat().st_size / GIB, results[f"pack_{codec}_s"]
            print(f"packed {codec}: {size:.3f} GiB in {seconds:.1f} s", flush=True)

        if device == "cuda" and "ans" in containers and "all compressed in VRAM" in args.scenarios:
            paired_in_vram(results, model, ids, containers["ans"], "ans", args.tokens)
        # the peers: weights in CPU RAM or on disk, moved to the GPU module by module (see peers.py)
        model = model.to("cpu")
        peer_rows(
            results, model, ref, weight_bytes, args.tokens, args.peer_tokens, tmp, args.scenarios, device
        )
        del model
        gc.collect()

        run_scenarios(results, containers, ref, weight_bytes, args.tokens, device, args.scenarios, args.out)
        # batch-1 decoding is launch-bound and the first timing of the process runs cold: measure the
        # resident model again, last; the gates compare with the faster of the two resident runs
        start = begin_row(device)
        model = build_model(args.layers, device, args.dry_run)
        again, tok_s = timed_generate(model, ids, args.tokens)
        results["rows"].append(
            {
                "method": "resident",
                "scenario": "again, last",
                "tok_s": tok_s,
                "lossless": True,
                "identical": bool(torch.equal(again, ref_tokens)),
                **memory_fields(device, start),
            }
        )
        print(f"resident again: {tok_s:.2f} tok/s", flush=True)
        del model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peer = fastest_peer(results["rows"])
    results["fastest_peer"] = {"method": peer["method"], "tok_s": peer["tok_s"]} if peer else None
    results["gates"] = gates(results)
    print(json.dumps(results["gates"]), flush=True)
    write_atomic(args.out, results)
    failed = [name for name, passed in results["gates"].items() if not passed]
    if failed:  # asserted: gpu_suite.sh exits non-zero; the JSON is written first, with every row
        raise SystemExit(f"gates failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
