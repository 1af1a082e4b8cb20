"""What executing ``fused12`` weights compressed changes in SmolLM2-135M-Instruct's outputs; one JSON object.

The weights are exact (every decoded bit equals the original); the fused kernels sum in another order than
cuBLAS, so logits may differ in their last bits. This script measures how much, on the GPU:

* the reference: SmolLM2 loaded in bf16 the way users load it (``from_pretrained(dtype=bfloat16)``: fp32
  rotary ``inv_freq``), resident on the device;
* ``executed``: the same model dispatched with ``codec="fused12"``, ``execute_compressed=True`` and a budget
  that holds every payload: its linear layers compute from the stored planes;
* ``decoded``: the same container with ``execute_compressed=False`` (decode, then cuBLAS), which must be
  bit-identical to the reference: it shows that what differs in ``executed`` is the summation order alone.

Reported over the evaluation text (:data:`offload_runtime.quality.EVAL_TEXT`): max |logit difference|,
top-1 agreement and KL of the whole text in one forward (a prefill: long inputs take the decode + cuBLAS
path, so these match bitwise) and of its first :data:`STEPS` tokens fed one at a time with the KV cache (the
batch-1 kernels that decoding runs); and the greedy answers to the demo prompts (identical or not).

Usage: ``python3 bench/fused12_quality.py OUT.json`` (``--dry-run``: on the CPU, where every path is the
reference decode + torch's linear, so it checks the script, not the kernels).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from offload_runtime.demo import DEMO_PROMPT
from offload_runtime.quality import EVAL_TEXT, next_token_metrics

PROMPTS = (DEMO_PROMPT, "What is the capital of France?", "Write a haiku about the sea.")
STEPS = 128  # tokens of the evaluation text fed one at a time (batch-1 kernels)
BUDGET_GB = 2.0  # SmolLM2 is 0.27 GB in bf16: every group stays on the device


def greedy(model, tokenizer, prompt: str, device: torch.device, max_new_tokens: int = 40) -> str:
    batch = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    ids = batch["input_ids"].to(device)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def stepwise_logits(model, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Logits ``[STEPS, V]`` of the first tokens of ``ids`` fed one per forward, with the KV cache."""
    past, rows = None, []
    with torch.inference_mode():
        for t in range(min(STEPS, ids.shape[1])):
            out = model(ids[:, t : t + 1].to(device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            rows.append(out.logits[0, -1].float().cpu())
    return torch.stack(rows)


def measure(model, tokenizer, ids: torch.Tensor, device: torch.device) -> tuple:
    with torch.inference_mode():
        logits = model(ids.to(device)).logits[0].float().cpu()
    steps = stepwise_logits(model, ids, device)
    return logits, steps, [greedy(model, tokenizer, p, device) for p in PROMPTS]


def main() -> None:
    import offload_runtime
    from offload_runtime.packaged import load_smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU (checks the script only)")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    results: dict = {
        "what": "SmolLM2-135M-Instruct bf16: fused12 executed compressed vs resident",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "rows": {},
    }
    model, tokenizer = load_smollm2(torch.bfloat16)
    ids = tokenizer(EVAL_TEXT, return_tensors="pt").input_ids
    ref_logits, ref_steps, ref_answers = measure(model.to(device), tokenizer, ids, device)
    results["reference_answers"] = ref_answers
    results["eval_tokens"] = int(ids.shape[1])
    del model
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="fused12_quality_") as tmp:
        path = Path(tmp) / "smollm2-fused12.safetensors"
        source, _ = load_smollm2(torch.bfloat16)
        offload_runtime.pack(source, path, codec="fused12", progress=False)
        results["stored_bytes"] = path.stat().st_size
        del source
        for row, execute in (("executed", True), ("decoded", False)):
            model, _ = load_smollm2(torch.bfloat16)
            model = offload_runtime.dispatch_compressed(
                model, BUDGET_GB, checkpoint=path, device=device, execute_compressed=execute
            )
            plan = model.offload_plan
            logits, steps, answers = measure(model, tokenizer, ids, device)
            results["rows"][row] = {
                "tiers": {t: n for t, n in plan_tiers(plan).items() if n},
                "prefill": {
                    "bit_identical_logits": bool(torch.equal(logits, ref_logits)),
                    **next_token_metrics(ref_logits, logits, ids[0]),
                },
                "stepwise": {
                    "bit_identical_logits": bool(torch.equal(steps, ref_steps)),
                    **next_token_metrics(ref_steps, steps, ids[0, : len(steps)]),
                },
                "answers": answers,
                "answers_identical": answers == ref_answers,
            }
            print(row, json.dumps(results["rows"][row]), flush=True)
            offload_runtime.remove_offload(model)
            del model
            gc.collect()
    rows = results["rows"]
    results["checks"] = {
        "executed_top1_agreement==1": all(
            rows["executed"][k]["top1_agreement"] == 1.0 for k in ("prefill", "stepwise")
        ),
        "executed_answers_identical": rows["executed"]["answers_identical"],
        "decoded_bit_identical": all(
            rows["decoded"][k]["bit_identical_logits"] for k in ("prefill", "stepwise")
        ),
    }
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["checks"]))


def plan_tiers(plan) -> dict[str, int]:
    from offload_runtime.scheduler.tiers import TIERS

    return {t.name: len(plan.in_tier(t)) for t in TIERS}


if __name__ == "__main__":
    main()
