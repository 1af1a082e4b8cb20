"""``offload-runtime generate`` and ``demo``: run a container, and the packaged demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from offload_runtime import validate_args as check
from offload_runtime.cli_args import (
    DEVICE_HELP,
    add_budget,
    add_checkpoint,
    add_run_options,
    check_run_args,
    run_options,
)


def prompt_ids(tokenizer, prompt: str):
    """The prompt's token ids (1, n): through the chat template when the tokenizer has one."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt"
        )
        return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def check_generative_container(path: Path, name: str = "CHECKPOINT"):
    """Open container ``path`` and check it holds what text generation needs: a config, a model class
    that can generate, and a tokenizer. Returns the tokenizer and the positions the model handles (or
    ``None``); no weights are read."""
    import transformers

    import offload_runtime
    from offload_runtime.loaders import ContainerReader

    with ContainerReader(path) as reader:
        index = reader.index
        if index.config is None:
            raise check.usage_error(
                f"{name} {path} holds no model config (packed from a bare .safetensors file)",
                "pack a model folder with config.json, or a .gguf file",
            )
        class_name = index.model_class or (index.config.get("architectures") or [None])[0]
        cls = getattr(transformers, class_name, None) if class_name else None
        if cls is not None and not cls.can_generate():
            raise check.usage_error(
                f"{name} {path} holds a {class_name}, which cannot generate text",
                "generate and bench need a causal language model (a ...ForCausalLM); load this one in "
                "Python with offload_runtime.load_compressed",
            )
        if not index.tokenizer:
            raise check.usage_error(
                f"{name} {path} holds no tokenizer",
                "pack a model folder that holds its tokenizer files (tokenizer.json, ...), or a .gguf file",
            )
        return offload_runtime.load_tokenizer(reader), _max_positions(index.config)


def _max_positions(config: dict) -> int | None:
    """The positions the stored config says the model handles (``n_positions`` for GPT-2, ...)."""
    import transformers

    config = dict(config)
    try:
        hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    except (KeyError, ValueError, TypeError):
        return None  # load_compressed reports a config it cannot build
    value = getattr(hf_config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_length(prompt_tokens: int, max_new_tokens: int, max_positions: int | None) -> None:
    """Refuse a generation longer than the positions the model handles (learned position embeddings
    would index past their table), naming the longest ``--max-new-tokens`` that fits."""
    if max_positions is None or prompt_tokens + max_new_tokens <= max_positions:
        return
    if prompt_tokens >= max_positions:
        raise check.usage_error(
            f"the prompt is {prompt_tokens} tokens; the model handles {max_positions} positions",
            "give a shorter prompt",
        )
    raise check.usage_error(
        f"--max-new-tokens {max_new_tokens} after a prompt of {prompt_tokens} tokens exceeds the "
        f"{max_positions} positions the model handles",
        f"give --max-new-tokens {max_positions - prompt_tokens} or less",
    )


def add_generate(parser: argparse.ArgumentParser) -> None:
    add_checkpoint(parser)
    parser.add_argument(
        "--prompt", required=True, help="the text to answer (through the chat template, if any)"
    )
    add_budget(parser)
    add_run_options(parser, max_new_tokens=64)
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="print only the generated text: no progress bar, plan, load time or tok/s on stderr",
    )
    parser.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    check_run_args(args)
    path = check.container_file(args.checkpoint, "CHECKPOINT")
    if not args.prompt.strip():
        raise check.usage_error("--prompt is empty", "give the text to answer, e.g. --prompt 'Hello'")

    def say(text: str) -> None:
        if not args.quiet:
            print(text, file=sys.stderr, flush=True)

    from transformers import TextStreamer

    import offload_runtime

    tokenizer, max_positions = check_generative_container(path)
    ids = prompt_ids(tokenizer, args.prompt)
    check_length(ids.shape[1], args.max_new_tokens, max_positions)
    start = time.perf_counter()
    model = offload_runtime.load_compressed(
        path,
        budget_gb=args.budget_gb,
        device=args.device,
        prefetch=args.prefetch,
        host_budget_gb=args.host_budget_gb,
        progress=not args.quiet,
        **run_options(args),
    )
    say(f"loaded {path.name} in {time.perf_counter() - start:.1f} s; plan: {model.offload_plan.summary()}")
    ids = ids.to(model.device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    seconds = time.perf_counter() - start
    tokens = out.shape[1] - ids.shape[1]
    say(f"{tokens} tokens in {seconds:.1f} s: {tokens / seconds:.2f} tok/s")
    return 0


def add_demo(parser: argparse.ArgumentParser) -> None:
    add_budget(parser, default=None, default_text="default 40%% of the model's size")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=40,
        metavar="N",
        help="length of each answer, 1 or more (default 40)",
    )
    parser.add_argument(
        "--device", default=None, help=f"{DEVICE_HELP}; the GPU needs nvCOMP for the ans codec"
    )
    parser.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    check_run_args(args)
    from offload_runtime.demo import run_demo

    result = run_demo(
        budget_gb=args.budget_gb, max_new_tokens=args.max_new_tokens, device=args.device, stream=sys.stdout
    )
    return 0 if result.identical else 1
