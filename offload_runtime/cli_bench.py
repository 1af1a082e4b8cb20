"""``offload-runtime bench``: tok/s and the plan for one or more budgets, from a container or a synthetic
model generated on the device."""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

from offload_runtime import validate_args as check
from offload_runtime.cli_args import add_budget, add_checkpoint, add_run_options, check_run_args, run_options

BENCH_PROMPT = "Write a short story about a lighthouse keeper."
SHAPES = "tiny, llama-2b, llama-8b, llama-70b; MoE: tiny-mixtral, tiny-qwen3-moe, mixtral-8x7b, qwen3-30b-a3b"


def add_bench(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser, optional=True)
    parser.add_argument(
        "--synthetic",
        metavar="SHAPE",
        default=None,
        help=f"instead of a CHECKPOINT: a synthetic model generated on the device, nothing written to "
        f"disk ({SHAPES})",
    )
    add_budget(parser, several=True)
    add_run_options(parser, max_new_tokens=32)
    parser.add_argument(
        "--codec", default=None, help="--synthetic only: auto (default), raw, zstd, ans or int8"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="--synthetic only: seed of the weights (default 0)",
    )
    parser.set_defaults(func=run_bench)


def _timed_generate(model, ids, max_new_tokens: int) -> tuple[float, int]:
    """(seconds, new tokens) of one greedy generation after a 2-token warm-up."""
    import torch

    model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: execution order, allocator
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, min_new_tokens=max_new_tokens)
    if ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out.shape[1] - ids.shape[1]


def _check_bench_args(args: argparse.Namespace) -> Path | None:
    """Check ``bench``'s arguments; returns the container's path (``None`` with ``--synthetic``)."""
    if args.synthetic is None and args.checkpoint is None:
        raise check.usage_error("give a CHECKPOINT or --synthetic SHAPE", f"SHAPE is one of {SHAPES}")
    if args.synthetic is not None and args.checkpoint is not None:
        raise check.usage_error("give a CHECKPOINT or --synthetic SHAPE, not both", "drop one of them")
    if args.synthetic is None and (args.codec is not None or args.seed is not None):
        raise check.usage_error(
            "--codec and --seed apply to --synthetic only",
            "a container's codec was chosen when it was packed",
        )
    check_run_args(args)
    if args.synthetic is not None:
        from offload_runtime.synthetic import SYNTHETIC_SHAPES

        check.one_of(args.synthetic, "--synthetic", sorted(SYNTHETIC_SHAPES))
        check.non_negative_int(0 if args.seed is None else args.seed, "--seed")
        check.codec_name(args.codec or "auto", "--codec")
        return None
    return check.container_file(args.checkpoint, "CHECKPOINT")


def run_bench_synthetic(args: argparse.Namespace) -> int:
    """``bench --synthetic``: a generated model per budget; prints each plan and tok/s, writes nothing."""
    import torch

    from offload_runtime.synthetic import dispatch_synthetic, synthetic_config

    config = synthetic_config(args.synthetic)
    codec, seed = args.codec or "auto", args.seed or 0
    rows = []
    for budget in args.budget_gb:
        start = time.perf_counter()
        model = dispatch_synthetic(
            config,
            budget,
            codec=codec,
            device=args.device,
            prefetch=args.prefetch,
            host_budget_gb=args.host_budget_gb,
            seed=seed,
            **run_options(args),
        )
        build = time.perf_counter() - start
        # a fixed prompt of token ids: a synthetic model has no tokenizer
        ids = (torch.arange(1, 17) * 7919 % config.vocab_size).unsqueeze(0).to(model.device)
        with torch.inference_mode():
            seconds, tokens = _timed_generate(model, ids, args.max_new_tokens)
        plan = model.offload_plan
        print(f"\nsynthetic {args.synthetic}, codec {codec}, budget {budget:g} GiB (built in {build:.1f} s)")
        print(plan)
        rows.append((budget, tokens / seconds, _split(plan)))
        # not remove_offload: it would decode every group at once (the whole model, on the device)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    _print_rows(rows)
    return 0


def _print_rows(rows: list[tuple[float, float, str]]) -> None:
    """The summary table: one row ``(budget GiB, tok/s, split)`` per budget."""
    print("\n| budget GiB | tok/s | split |\n|---:|---:|---|")
    for budget, tok_s, split in rows:
        print(f"| {budget:g} | {tok_s:.2f} | {split} |")


def _split(plan) -> str:
    """Groups per tier, e.g. ``resident 3, device_compressed 70, host 10``."""
    return ", ".join(f"{t.name} {len(plan.in_tier(t))}" for t in plan.tiers)


def run_bench(args: argparse.Namespace) -> int:
    path = _check_bench_args(args)
    if path is None:
        return run_bench_synthetic(args)
    import offload_runtime
    from offload_runtime.cli_run import check_generative_container, check_length, prompt_ids

    tokenizer, max_positions = check_generative_container(path)
    prompt = prompt_ids(tokenizer, BENCH_PROMPT)
    check_length(prompt.shape[1], args.max_new_tokens, max_positions)
    rows = []
    for budget in args.budget_gb:
        model = offload_runtime.load_compressed(
            path,
            budget_gb=budget,
            device=args.device,
            prefetch=args.prefetch,
            host_budget_gb=args.host_budget_gb,
            **run_options(args),
        )
        ids = prompt.to(model.device)
        seconds, tokens = _timed_generate(model, ids, args.max_new_tokens)
        print(f"\nbudget {budget:g} GiB\n{model.offload_plan}")
        rows.append((budget, tokens / seconds, _split(model.offload_plan)))
        offload_runtime.remove_offload(model)
        del model
    _print_rows(rows)
    return 0
