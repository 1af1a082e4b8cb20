"""Several GPUs, each streaming its own shards over its own link: tensor-parallel offload (issue 16).

Every rank of a ``torchrun`` job dispatches the same synthetic Llama-shaped model (``dispatch_synthetic(...,
tensor_parallel=True)``: sharded with transformers' TP plan, each rank generating, encoding and streaming
only its shards, ``ans``) within its own per-GPU budget; the TP reductions are the model's (NCCL).

Usage on the device machine (kind ``nvidia-h200-x2``; each call stays under 10 minutes)::

    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
    torchrun --nproc-per-node 2 bench/tp_offload.py OUTDIR --rows h2d,8b      # ~3 min
    torchrun --nproc-per-node 2 bench/tp_offload.py OUTDIR --rows 70b-tp      # ~5 min
    torchrun --nproc-per-node 2 bench/tp_offload.py OUTDIR --rows 70b-1gpu-40 # ~4 min
    torchrun --nproc-per-node 2 bench/tp_offload.py OUTDIR --rows 70b-1gpu-80 # ~4 min
    python3 bench/tp_offload.py OUTDIR --report      # merges OUTDIR/*.json, gates -> OUTDIR/tp_offload.json

    torchrun --nproc-per-node 2 bench/tp_offload.py OUTDIR --dry-run   # CPU, gloo, tiny shape (CI)

Rows (each writes ``OUTDIR/<row>.json``, rank 0 writing what every rank measured):

* ``h2d``: each GPU's pinned host-to-device GB/s alone (one after the other) and all at once;
* ``8b``: the 8 B shape in the streamed regime. One GPU at a budget near its minimum (the other rank
  idle) against every GPU at the same per-GPU budget (links *and* memory: each GPU then holds a larger
  share of its half in VRAM), and every GPU at its own minimum (links only: everything streamed), each with
  every link's achieved GB/s; bit-identity of each against its resident reference (both fit);
* ``70b-tp``: the 70 B shape on every GPU at 40 GiB each, bit-identical to the unoffloaded TP reference
  (70.5 GB of bf16 shards per GPU: it fits an H200), then timed;
* ``70b-1gpu-40`` / ``70b-1gpu-80``: the 70 B shape on one GPU at 40 and 80 GiB (timed only: its
  bit-identity against a layer-by-layer reference is ``synthetic_70b.py``'s and was shown there).

The environment variables keep NCCL, symmetric memory and NVSHMEM off NVLink multicast (NVLS), which the
lent machines do not provide; the script sets them too if they are missing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
for _key, _value in NO_MULTICAST.items():
    os.environ.setdefault(_key, _value)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: shared measurement helpers
from synthetic_70b import compare_logits, generate, plan_split, prompt_ids  # noqa: E402

GIB = 1 << 30
ROWS = ("h2d", "8b", "70b-tp", "70b-1gpu-40", "70b-1gpu-80")
HOST_FRACTION = 0.8  # of the host's available RAM for compressed payloads, split between ranks that stream


class Ctx:
    """This rank, the job and where results go."""

    def __init__(self, out: Path, dry_run: bool, tokens: int, prompt_len: int, repeats: int) -> None:
        import torch.distributed as dist

        self.dist = dist
        backend = "gloo" if dry_run else "nccl"
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dry_run:
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group(backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cpu") if dry_run else torch.device("cuda", self.local_rank)
        self.out, self.dry_run = out, dry_run
        self.tokens, self.prompt_len, self.repeats = tokens, prompt_len, repeats
        self.started = time.perf_counter()

    def log(self, message: str) -> None:
        if self.rank == 0:
            print(f"[{time.perf_counter() - self.started:7.1f} s] {message}", flush=True)

    def gather(self, value) -> list:
        values = [None] * self.world
        self.dist.all_gather_object(values, value)
        return values

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


# -- measurements ---------------------------------------------------------------------------------------


def greedy(model, ids: torch.Tensor, tokens: int) -> torch.Tensor:
    with torch.no_grad():  # not inference_mode: DTensors are made in the TP forwards
        return generate(model, ids, tokens)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=torch.ones_like(ids)).logits[0].float().cpu()


def timed(ctx: Ctx, model, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Greedy tokens and the median seconds per token of ``repeats`` runs after a full-length warm-up."""
    out = greedy(model, ids, ctx.tokens)
    times = []
    for _ in range(ctx.repeats):
        ctx.sync()
        start = time.perf_counter()
        again = greedy(model, ids, ctx.tokens)
        ctx.sync()
        times.append((time.perf_counter() - start) / ctx.tokens)
        if not torch.equal(again, out):
            raise RuntimeError("greedy generation is not repeatable on this model")
    return out, sorted(times)[len(times) // 2]


def host_budget_gb(ranks_streaming: int) -> float:
    import psutil

    return psutil.virtual_memory().available * HOST_FRACTION / ranks_streaming / GIB


def reference(ctx: Ctx, config, tp: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy tokens and logits of the model resident on the device: materialised (this rank's shards
    when ``tp``) from the same seeds as the synthetic source."""
    from offload_runtime.api import _move_unstored
    from offload_runtime.loaders.tp import shard_empty_model
    from offload_runtime.synthetic import materialize, synthetic_skeleton

    model = synthetic_skeleton(config, torch.bfloat16)
    if tp:
        model = shard_empty_model(model)
    materialize(model, seed=seed, device=ctx.device, store=ctx.device)
    _move_unstored(model, set(), ctx.device)  # rotary inv_freq
    ids = prompt_ids(ctx.prompt_len, config.vocab_size, ctx.device)
    tokens = greedy(model, ids, ctx.tokens)
    full = torch.cat([ids[0].cpu(), tokens]).unsqueeze(0).to(ctx.device)
    out = tokens, logits(model, full)
    del model
    ctx.free()
    return out


def offloaded(ctx: Ctx, config, budget_gb: float, tp: bool, seed: int, codec: str, want=None) -> dict:
    """Dispatch the synthetic model within ``budget_gb`` on this GPU (its shards when ``tp``), time greedy
    generation, compare with ``want`` (tokens, logits) when given. Returns this rank's row."""
    from offload_runtime.errors import BudgetError
    from offload_runtime.synthetic import dispatch_synthetic

    host = host_budget_gb(ctx.world if tp else 1)
    start = time.perf_counter()
    kwargs = {
        "codec": codec,
        "device": ctx.device,
        "host_budget_gb": host,
        "seed": seed,
        "tensor_parallel": tp,
    }
    try:
        model = dispatch_synthetic(config, budget_gb, **kwargs)
    except BudgetError as exc:  # the CUDA minimum (staging, decoder scratch) is only known once encoded
        budget_gb = exc.expected / GIB * 1.01
        model = dispatch_synthetic(config, budget_gb, **kwargs)
    dispatch_seconds = time.perf_counter() - start
    plan = model.offload_plan
    stream_bytes = sum(g.stored_bytes for g in plan.groups if g.tier.crosses_pcie(plan.device))
    ids = prompt_ids(ctx.prompt_len, config.vocab_size, ctx.device)
    tokens, seconds = timed(ctx, model, ids)
    row = {
        "rank": ctx.rank,
        "budget_GiB": budget_gb,
        "host_budget_GiB": host,
        "dispatch_seconds": dispatch_seconds,
        "plan_device_bytes": plan.device_bytes,
        "within_budget": plan.device_bytes <= round(budget_gb * GIB),
        "plan_split": plan_split(plan),
        "host_stream_bytes_per_token": stream_bytes,
        "tok_s": 1.0 / seconds,
        "link_GBps": stream_bytes / seconds / 1e9,
        "tokens": tokens.tolist(),
        "plan": str(plan),
    }
    if want is not None:
        full = torch.cat([ids[0].cpu(), want[0]]).unsqueeze(0).to(ctx.device)
        row["tokens_identical"] = bool(torch.equal(tokens, want[0]))
        row["logits_vs_reference"] = compare_logits(want[1], logits(model, full))
    if ctx.device.type == "cuda":
        row["peak_vram_allocated_GiB"] = torch.cuda.max_memory_allocated(ctx.device) / GIB
    del model
    ctx.free()
    return row


def minimum_gb(ctx: Ctx, config, tp: bool) -> float:
    """The decoded working-set minimum of this rank (raised before anything is generated)."""
    from offload_runtime.errors import BudgetError
    from offload_runtime.synthetic import dispatch_synthetic

    try:
        dispatch_synthetic(config, 1e-9, codec="raw", device="cpu", tensor_parallel=tp)
    except BudgetError as exc:
        return exc.expected / GIB
    raise RuntimeError("a budget of one byte was accepted")


def near_minimum_gb(ctx: Ctx, config, tp: bool) -> float:
    """A budget near this rank's minimum: the decoded minimum plus room for staging and decoder scratch
    (a BudgetError on the device raises it to the exact minimum, see :func:`offloaded`)."""
    if ctx.dry_run:
        return minimum_gb(ctx, config, tp) * 1.001
    return minimum_gb(ctx, config, tp) * 1.05 + 1.0


# -- rows ------------------------------------------------------------------------------------------------


def row_h2d(ctx: Ctx, args) -> dict:
    from gpu_e2e import h2d_gbps

    if ctx.dry_run:
        return {"skipped": "no GPU in a dry run"}
    alone = None
    for r in range(ctx.world):  # one link at a time
        ctx.dist.barrier()
        if ctx.rank == r:
            alone = h2d_gbps()
        ctx.dist.barrier()
    ctx.dist.barrier()
    together = h2d_gbps()  # every link at once
    alone_all, together_all = ctx.gather(alone), ctx.gather(together)
    return {"alone_GBps": alone_all, "together_GBps": together_all, "together_sum_GBps": sum(together_all)}


def row_8b(ctx: Ctx, args) -> dict:
    from offload_runtime.synthetic import synthetic_config

    config = synthetic_config("tiny" if ctx.dry_run else "llama-8b")
    out: dict = {"shape": "tiny" if ctx.dry_run else "llama-8b", "codec": args.codec}
    # one GPU: rank 0 alone, at a budget near its minimum
    single = None
    if ctx.rank == 0:
        budget = near_minimum_gb(ctx, config, tp=False)
        want = reference(ctx, config, tp=False, seed=args.seed)
        single = offloaded(ctx, config, budget, False, args.seed, args.codec, want)
        ctx.log(f"8b one GPU at {single['budget_GiB']:.2f} GiB: {single['tok_s']:.2f} tok/s")
    single = ctx.gather(single)[0]
    out["one_gpu"] = single
    want = reference(ctx, config, tp=True, seed=args.seed)
    # every GPU at the one-GPU budget: links and memory
    same = offloaded(ctx, config, single["budget_GiB"], True, args.seed, args.codec, want)
    out["tp_same_budget"] = ctx.gather(same)
    ctx.log(f"8b {ctx.world} GPUs at {single['budget_GiB']:.2f} GiB each: {same['tok_s']:.2f} tok/s")
    # every GPU at its own minimum: links only
    own = offloaded(ctx, config, near_minimum_gb(ctx, config, tp=True), True, args.seed, args.codec, want)
    out["tp_streamed"] = ctx.gather(own)
    ctx.log(f"8b {ctx.world} GPUs at {own['budget_GiB']:.2f} GiB each (streamed): {own['tok_s']:.2f} tok/s")
    return out


def row_70b_tp(ctx: Ctx, args) -> dict:
    from offload_runtime.synthetic import synthetic_config

    config = synthetic_config("tiny" if ctx.dry_run else "llama-70b")
    budget = near_minimum_gb(ctx, config, tp=True) * 1.5 if ctx.dry_run else args.budget_70b_gb
    want = reference(ctx, config, tp=True, seed=args.seed)
    ctx.log("70b TP reference done")
    row = offloaded(ctx, config, budget, True, args.seed, args.codec, want)
    ctx.log(f"70b {ctx.world} GPUs at {budget:.1f} GiB each: {row['tok_s']:.2f} tok/s")
    return {"shape": "tiny" if ctx.dry_run else "llama-70b", "codec": args.codec, "tp": ctx.gather(row)}


def row_70b_one_gpu(budget_gb: float):
    def row(ctx: Ctx, args) -> dict:
        from offload_runtime.synthetic import synthetic_config

        config = synthetic_config("tiny" if ctx.dry_run else "llama-70b")
        budget = near_minimum_gb(ctx, config, tp=False) * 2 if ctx.dry_run else budget_gb
        one = offloaded(ctx, config, budget, False, args.seed, args.codec) if ctx.rank == 0 else None
        one = ctx.gather(one)[0]
        ctx.log(f"70b one GPU at {budget:.1f} GiB: {one['tok_s']:.2f} tok/s")
        return {"shape": "tiny" if ctx.dry_run else "llama-70b", "codec": args.codec, "one_gpu": one}

    return row


RUNNERS = {
    "h2d": row_h2d,
    "8b": row_8b,
    "70b-tp": row_70b_tp,
    "70b-1gpu-40": row_70b_one_gpu(40.0),
    "70b-1gpu-80": row_70b_one_gpu(80.0),
}


# -- report ----------------------------------------------------------------------------------------------


def report(outdir: Path) -> dict:
    """Merge the rows' JSON files and evaluate the issue's gates (missing rows: gates left None)."""
    files = {name: outdir / f"{name}.json" for name in ROWS}
    rows = {name: json.loads(f.read_text()) for name, f in files.items() if f.is_file()}
    gates: dict = {}
    summary: dict = {}
    h2d = rows.get("h2d", {})
    alone = h2d.get("alone_GBps")
    if "8b" in rows:
        r = rows["8b"]
        one = r["one_gpu"]["tok_s"]
        same = min(x["tok_s"] for x in r["tp_same_budget"])  # ranks run in lockstep; take the slowest
        streamed = min(x["tok_s"] for x in r["tp_streamed"])
        summary["8b"] = {
            "one_gpu_tok_s": one,
            "tp_same_budget_tok_s": same,
            "tp_streamed_tok_s": streamed,
            "speedup_same_budget": same / one,
            "speedup_links_only": streamed / one,
            "link_GBps_one_gpu": r["one_gpu"]["link_GBps"],
            "link_GBps_tp_streamed": [x["link_GBps"] for x in r["tp_streamed"]],
        }
        gates["8b: TP >= 1.8x one GPU at the same per-GPU budget (streamed regime)"] = same / one >= 1.8
        if alone:
            fractions = [x["link_GBps"] / alone[x["rank"]] for x in r["tp_streamed"]]
            summary["8b"]["link_fraction_of_h2d_tp_streamed"] = fractions
            gates["8b: each link >= 0.9x its measured H2D (TP, all streamed)"] = min(fractions) >= 0.9
        identical = [r["one_gpu"].get("tokens_identical")] + [
            x.get("tokens_identical") and x["logits_vs_reference"]["bit_identical"]
            for x in r["tp_same_budget"] + r["tp_streamed"]
        ]
        gates["8b: bit-identical to the resident references"] = all(identical)
    if "70b-tp" in rows:
        tp = rows["70b-tp"]["tp"]
        summary["70b"] = {"tp_40GiB_tok_s": min(x["tok_s"] for x in tp)}
        gates["70b: TP at 40 GiB per GPU bit-identical to the unoffloaded TP reference"] = all(
            x["tokens_identical"] and x["logits_vs_reference"]["bit_identical"] for x in tp
        )
        for name in ("70b-1gpu-40", "70b-1gpu-80"):
            if name in rows:
                one = rows[name]["one_gpu"]["tok_s"]
                summary["70b"][f"{name}_tok_s"] = one
                summary["70b"][f"tp_40GiB_vs_{name}"] = summary["70b"]["tp_40GiB_tok_s"] / one
    merged = {"rows": rows, "summary": summary, "gates": gates}
    (outdir / "tp_offload.json").write_text(json.dumps(merged, indent=2))
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--rows", default="h2d,8b", help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--codec", default="ans")
    parser.add_argument("--budget-70b-gb", type=float, default=40.0, help="per GPU, row 70b-tp")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="tiny shape, zstd, CPU, gloo")
    parser.add_argument("--report", action="store_true", help="merge OUTDIR's rows and evaluate the gates")
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    if args.report:
        print(json.dumps(report(args.outdir)["gates"], indent=2))
        return
    if args.dry_run:
        args.codec, args.tokens, args.repeats = "zstd", 4, 1
    ctx = Ctx(args.outdir, args.dry_run, args.tokens, args.prompt_len, args.repeats)
    try:
        for name in args.rows.split(","):
            if name not in RUNNERS:
                raise SystemExit(f"error: unknown row {name!r}; choose from {', '.join(ROWS)}")
            result: dict = {"row": name, "world": ctx.world, "date": time.strftime("%Y-%m-%d %H:%M")}
            result["device"] = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
            result["torch"] = torch.__version__
            result["transformers"] = transformers.__version__
            result["environment"] = {k: os.environ.get(k) for k in NO_MULTICAST}
            try:
                result.update(RUNNERS[name](ctx, args))
            except BaseException as exc:
                result["error"] = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                if ctx.rank == 0:
                    (args.outdir / f"{name}.json").write_text(json.dumps(result, indent=2))
            ctx.dist.barrier()
    finally:
        ctx.dist.destroy_process_group()


if __name__ == "__main__":
    main()
