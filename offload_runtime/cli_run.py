"""``offload-runtime generate``, ``bench`` and ``demo``: run a container."""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

BENCH_PROMPT = "Write a short story about a lighthouse keeper."


def _existing(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(2, "No such file or directory", path)
    return p


def _prompt_ids(tokenizer, prompt: str):
    import torch

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def add_generate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="container written by `offload-runtime pack`")
    parser.add_argument("--prompt", required=True)
    parser.add_argument(
        "--budget-gb", type=float, default=1.0, help="weight memory budget in GiB (default 1)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    import offload_runtime

    path = _existing(args.checkpoint)
    tokenizer = offload_runtime.load_tokenizer(path)
    model = offload_runtime.load_compressed(path, budget_gb=args.budget_gb, device=args.device)
    ids = _prompt_ids(tokenizer, args.prompt).to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    return 0


def add_bench(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "checkpoint", nargs="?", default=None, help="container written by `offload-runtime pack`"
    )
    parser.add_argument(
        "--synthetic",
        metavar="SHAPE",
        default=None,
        help="instead of a container: a synthetic Llama-shaped model generated on the device, nothing "
        "written to disk (llama-70b, llama-8b, llama-2b, tiny)",
    )
    parser.add_argument(
        "--budget-gb", type=float, nargs="+", default=[1.0], help="one or several budgets (GiB)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.add_argument("--codec", default="auto", help="--synthetic only: auto, raw, zstd, ans or int8")
    parser.add_argument("--host-budget-gb", type=float, default=None, help="--synthetic only")
    parser.add_argument("--seed", type=int, default=0, help="--synthetic only: seed of the weights")
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


def run_bench_synthetic(args: argparse.Namespace) -> int:
    """``bench --synthetic``: a generated model per budget; prints each plan and tok/s, writes nothing."""
    import torch

    from offload_runtime.synthetic import dispatch_synthetic, synthetic_config

    try:
        config = synthetic_config(args.synthetic)
    except ValueError as exc:
        raise SystemExit(f"offload-runtime bench: {exc}") from None
    rows = []
    for budget in args.budget_gb:
        start = time.perf_counter()
        model = dispatch_synthetic(
            config,
            budget,
            codec=args.codec,
            device=args.device,
            host_budget_gb=args.host_budget_gb,
            seed=args.seed,
        )
        build = time.perf_counter() - start
        # a fixed prompt of token ids: a synthetic model has no tokenizer
        ids = (torch.arange(1, 17) * 7919 % config.vocab_size).unsqueeze(0).to(model.device)
        with torch.inference_mode():
            seconds, tokens = _timed_generate(model, ids, args.max_new_tokens)
        plan = model.offload_plan
        print(
            f"\nsynthetic {args.synthetic}, codec {args.codec}, budget {budget} GiB (built in {build:.1f} s)"
        )
        print(plan)
        rows.append((budget, tokens / seconds, _split(plan)))
        # not remove_offload: it would decode every group at once (the whole model, on the device)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    print("\n| budget GiB | tok/s | split |\n|---:|---:|---|")
    for budget, tok_s, split in rows:
        print(f"| {budget:g} | {tok_s:.2f} | {split} |")
    return 0


def _split(plan) -> str:
    """Groups per tier, e.g. ``resident 3, device_compressed 70, host 10``."""
    return ", ".join(f"{t.name} {len(plan.in_tier(t))}" for t in plan.tiers)


def run_bench(args: argparse.Namespace) -> int:
    import offload_runtime

    if args.synthetic is not None:
        if args.checkpoint is not None:
            raise SystemExit("offload-runtime bench: give a CHECKPOINT or --synthetic, not both")
        return run_bench_synthetic(args)
    if args.checkpoint is None:
        raise SystemExit("offload-runtime bench: give a CHECKPOINT (or --synthetic SHAPE)")
    path = _existing(args.checkpoint)
    tokenizer = offload_runtime.load_tokenizer(path)
    rows = []
    for budget in args.budget_gb:
        model = offload_runtime.load_compressed(path, budget_gb=budget, device=args.device)
        ids = _prompt_ids(tokenizer, BENCH_PROMPT).to(model.device)
        seconds, tokens = _timed_generate(model, ids, args.max_new_tokens)
        print(f"\nbudget {budget} GiB\n{model.offload_plan}")
        rows.append((budget, tokens / seconds, model.offload_plan))
        offload_runtime.remove_offload(model)
        del model
    print("\n| budget GiB | tok/s |\n|---:|---:|")
    for budget, tok_s, _ in rows:
        print(f"| {budget:g} | {tok_s:.2f} |")
    return 0


def add_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--budget-gb", type=float, default=None, help="budget in GiB (default: 40%% of the model)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--device", default=None)
    parser.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from offload_runtime.demo import run_demo

    result = run_demo(
        budget_gb=args.budget_gb, max_new_tokens=args.max_new_tokens, device=args.device, stream=sys.stdout
    )
    return 0 if result.identical else 1
