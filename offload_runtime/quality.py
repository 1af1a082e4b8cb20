"""Measuring what a lossy codec costs: next-token metrics on a fixed English text, and the stored int8 values.

Shared by ``tests/test_int8_quality.py`` (bounds that can fail) and ``bench/int8_quality.py`` (the numbers
committed under ``bench/results/``), so both measure the same thing on the same text.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offload_runtime.loaders import ContainerReader
from offload_runtime.native import get_codec

# Ordinary prose written for this purpose (no download): ~370 SmolLM2 tokens.
EVAL_TEXT = (
    "The village sat at the bend of a slow brown river, and most of the people who lived there had never "
    "seen the sea. In the mornings the baker opened his shutters before the sun was up, and the smell of "
    "warm bread drifted down the main street, past the post office, the school and the small stone church. "
    "Children walked to school in pairs, kicking pebbles and arguing about football, while their parents "
    "hurried to the bus stop with cups of coffee in their hands. On market days the square filled with "
    "stalls selling apples, cheese, honey, cheap shoes and second-hand books, and old men sat on the "
    "benches under the plane trees, talking about the weather and the price of everything. Nobody was "
    "rich, but few were truly poor, and people looked after one another when times were hard. In winter "
    "the river sometimes flooded the lower fields, and the farmers would lose a season of work, but the "
    "town council had slowly built a wall of earth and stone along the bank, and the floods came less "
    "often than they used to. The young people often left for the city after finishing school, hoping to "
    "find better jobs and a more exciting life. Some of them came back years later with children of their "
    "own, saying that the city was too loud, too expensive and too lonely. They bought the empty houses at "
    "the edge of the village, repaired the roofs, painted the doors in bright colours and planted "
    "vegetables in the gardens. The old teacher, who had taught three generations of the same families, "
    "liked to say that a place is not made by its buildings but by the people who choose to stay in it. "
    "Every summer there was a festival by the river, with music, dancing and a long table where everyone "
    "shared the food they had brought, and for one evening the whole village ate together under the stars."
)


def next_token_metrics(reference: torch.Tensor, candidate: torch.Tensor, ids: torch.Tensor) -> dict:
    """Compare two models' logits ``[T, V]`` over the same tokens ``ids`` ``[T]``."""
    ref_logp = F.log_softmax(reference[:-1].double(), dim=-1)
    cand_logp = F.log_softmax(candidate[:-1].double(), dim=-1)
    targets = ids[1:]
    ref_nll = -ref_logp.gather(1, targets[:, None]).mean()
    cand_nll = -cand_logp.gather(1, targets[:, None]).mean()
    kl = (ref_logp.exp() * (ref_logp - cand_logp)).sum(-1)  # KL(reference || candidate) per position
    ppl_ref, ppl_cand = float(ref_nll.exp()), float(cand_nll.exp())
    return {
        "positions": int(targets.numel()),
        "perplexity_reference": ppl_ref,
        "perplexity_candidate": ppl_cand,
        "perplexity_rel_delta": ppl_cand / ppl_ref - 1.0,
        "top1_agreement": float((reference[:-1].argmax(-1) == candidate[:-1].argmax(-1)).double().mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "logits_max_abs_diff": float((reference - candidate).abs().max()),
    }


def stored_int8(reader: ContainerReader, group: str) -> dict[str, torch.Tensor]:
    """The int8 values and fp32 row scales stored for ``group`` (the inner codec's decode only)."""
    entry = reader.group(group)
    scratch = torch.empty(entry.stored_layout.size, dtype=torch.uint8)
    inner = get_codec(entry.params["inner"])
    inner.decode_cpu(
        reader.payload(group), entry.chunks, entry.params["inner_params"], entry.stored_layout, scratch
    )
    return {name: view.clone() for name, view in entry.stored_layout.views(scratch).items()}
