"""Quality cost of the lossy ``int8`` codec on the real SmolLM2-135M-Instruct, through a container round trip.

The model is packed with ``codec="int8"``, loaded back with ``load_state_dict`` into a copy, and compared
with the fp32 original. The original is SmolLM2's Q4_1 GGUF de-quantised to fp32 (see
``offload_runtime.packaged``), so int8 is measured relative to an already 4-bit-quantised model.
``bench/int8_quality.py`` prints the same metrics (and sizes) as JSON.
"""

from __future__ import annotations

import copy

import pytest
import torch

from offload_runtime.loaders import ContainerReader, load_state_dict, pack
from offload_runtime.native.int8 import INT8_MAX, SCALE_SUFFIX
from offload_runtime.quality import EVAL_TEXT, next_token_metrics, stored_int8

# Weights whose stored int8 values and scales are checked directly: first/middle/last block, attention and
# MLP, and the embedding (tied to lm_head, so its per-row scales are per-vocabulary-entry).
CHECKED_WEIGHTS = {
    "model.layers.0": ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"],
    "model.layers.15": ["model.layers.15.mlp.down_proj.weight", "model.layers.15.self_attn.k_proj.weight"],
    "model.layers.29": ["model.layers.29.mlp.up_proj.weight"],
    "model.embed_tokens": ["model.embed_tokens.weight"],
}
# |w - q*scale| <= scale/2 exactly in real arithmetic; in fp32, w/scale (|.| <= 127) and q*scale each round
# once with relative error <= 2**-24, adding at most 127 * 2**-24 of a scale each.
ROW_ERROR_BOUND = 0.5 + 2 * INT8_MAX * 2.0**-24


@pytest.fixture(scope="module")
def int8_round_trip(smollm2, tmp_path_factory):
    """``(container path, decoded state dict, copy of the model holding the int8 weights)``."""
    model, _ = smollm2
    path = pack(model, tmp_path_factory.mktemp("int8") / "smollm2-int8.ort", codec="int8", progress=False)
    with ContainerReader(path) as reader:
        state = load_state_dict(reader)
    quantised = copy.deepcopy(model)
    quantised.load_state_dict(state, strict=True)
    return path, state, quantised


def test_int8_perplexity_and_next_token_agreement(smollm2, int8_round_trip):
    model, tokenizer = smollm2
    _, _, quantised = int8_round_trip
    ids = tokenizer(EVAL_TEXT, return_tensors="pt").input_ids
    assert ids.shape[1] > 300  # "a few hundred tokens": enough positions for the rates below to mean much
    with torch.no_grad():
        ref_logits = model(ids).logits[0]
        int8_logits = quantised(ids).logits[0]
    metrics = next_token_metrics(ref_logits, int8_logits, ids[0])
    ppl_ref, ppl_int8 = metrics["perplexity_reference"], metrics["perplexity_candidate"]
    rel_delta, agreement, kl_mean = (
        metrics["perplexity_rel_delta"],
        metrics["top1_agreement"],
        metrics["kl_mean"],
    )

    # Measured on 2026-11-22 (CPU, 365 positions): ppl 22.64 -> 22.66 (+0.10%), top-1 agreement 95.9%,
    # mean KL 0.0036 nats. Bounds leave ~10x margin on the loss metrics and ~6 points on agreement (one
    # flipped argmax is 0.27 points), yet a real codec bug (a wrong scale, a transposed or shifted row,
    # truncation instead of rounding in a whole tensor) moves each of them far past its bound.
    assert 10 < ppl_ref < 50, f"fp32 perplexity {ppl_ref:.2f}: not a trained model on English prose?"
    assert not torch.equal(ref_logits, int8_logits), "int8 round trip was lossless: was it quantised at all?"
    assert abs(rel_delta) < 0.01, f"perplexity {ppl_ref:.3f} -> {ppl_int8:.3f} ({rel_delta:+.2%})"
    assert agreement > 0.90, f"top-1 next-token agreement {agreement:.1%}"
    assert kl_mean < 0.03, f"mean KL(fp32 || int8) {kl_mean:.4f} nats"


def test_int8_weights_within_half_a_step_of_stored_scales(smollm2, int8_round_trip):
    model, _ = smollm2
    path, state, _ = int8_round_trip
    original = model.state_dict()
    problems = []
    with ContainerReader(path) as reader:
        for group, names in CHECKED_WEIGHTS.items():
            assert reader.group(group).codec == "int8"
            stored = stored_int8(reader, group)
            for name in names:
                w, q, scale = original[name], stored[name], stored[name + SCALE_SUFFIX]
                assert q.dtype == torch.int8 and q.shape == w.shape, name
                assert scale.dtype == torch.float32 and scale.shape == (w.shape[0],), name
                if int(q.abs().max()) > INT8_MAX:
                    problems.append(f"{name}: -128 used (symmetric range is +-{INT8_MAX})")
                # each row's largest |w| maps to +-127: the scale uses the whole int8 range
                if not torch.equal(q.abs().amax(1), torch.full_like(scale, INT8_MAX, dtype=torch.int8)):
                    problems.append(f"{name}: some row does not reach +-{INT8_MAX}")
                if not torch.allclose(scale, w.abs().amax(1) / INT8_MAX, rtol=1e-6, atol=0):
                    problems.append(f"{name}: stored scales are not max|row| / {INT8_MAX}")
                if not torch.equal(state[name], q.float() * scale[:, None]):
                    problems.append(f"{name}: loaded weight is not stored int8 * stored scale")
                ratio = (w.double() - state[name].double()).abs().amax(1) / scale.double()
                if float(ratio.max()) > ROW_ERROR_BOUND:
                    problems.append(f"{name}: row error {float(ratio.max()):.7f} scale > {ROW_ERROR_BOUND}")
                # rounding to the nearest step: some row must actually lose ~half a step (it is lossy)
                if float(ratio.max()) < 0.4:
                    problems.append(f"{name}: max row error only {float(ratio.max()):.3f} scale")
    assert not problems, "\n".join(problems)


def test_int8_round_trip_keeps_non_2d_exact_ties_and_dtypes(smollm2, int8_round_trip):
    model, _ = smollm2
    path, state, quantised = int8_round_trip
    original = model.state_dict()
    assert state.keys() == original.keys()
    problems = [
        f"{n}: {tuple(state[n].shape)} {state[n].dtype} vs {tuple(t.shape)} {t.dtype}"
        for n, t in original.items()
        if state[n].shape != t.shape or state[n].dtype != t.dtype
    ]
    not_2d = [n for n, t in original.items() if t.dim() != 2]
    assert len(not_2d) == 2 * model.config.num_hidden_layers + 1  # two RMSNorms per block + the final one
    problems += [f"{n}: not bit-exact" for n in not_2d if not torch.equal(state[n], original[n])]
    with ContainerReader(path) as reader:
        aliases = {a: c for g in reader.groups for a, c in g.aliases.items()}
        quantised_names = {
            spec.name
            for g in reader.groups
            for spec in g.stored_layout.tensors
            if spec.dtype == "int8" and g.codec == "int8"
        }
    two_d = {n for n, t in original.items() if t.dim() == 2 and n not in aliases}
    if quantised_names != two_d:
        problems.append(f"quantised {sorted(quantised_names ^ two_d)} differently from the 2-D weights")
    assert not problems, "\n".join(problems)

    # SmolLM2 ties lm_head to the embeddings: stored once, loaded as one tensor, still tied in the model
    assert aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    assert quantised.lm_head.weight is quantised.model.embed_tokens.weight
    assert torch.equal(quantised.lm_head.weight, state["model.embed_tokens.weight"])


def test_int8_model_still_answers_a_chat_question(smollm2, int8_round_trip):
    _, tokenizer = smollm2
    _, _, quantised = int8_round_trip
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        out = quantised.generate(
            **batch, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
