"""``offload-runtime generate``, ``bench`` and ``demo``: run a container."""

from __future__ import annotations

import argparse
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
    parser.add_argument("checkpoint", help="container written by `offload-runtime pack`")
    parser.add_argument(
        "--budget-gb", type=float, nargs="+", default=[1.0], help="one or several budgets (GiB)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--device", default=None)
    parser.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import torch

    import offload_runtime

    path = _existing(args.checkpoint)
    tokenizer = offload_runtime.load_tokenizer(path)
    rows = []
    for budget in args.budget_gb:
        model = offload_runtime.load_compressed(path, budget_gb=budget, device=args.device)
        ids = _prompt_ids(tokenizer, BENCH_PROMPT).to(model.device)
        model.generate(ids, max_new_tokens=2, do_sample=False)  # warm-up: execution order, allocator
        start = time.perf_counter()
        out = model.generate(
            ids, max_new_tokens=args.max_new_tokens, do_sample=False, min_new_tokens=args.max_new_tokens
        )
        if ids.is_cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        tokens = out.shape[1] - ids.shape[1]
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
