"""Expert cache policies on simulated routing traces, on the CPU: the hit rates of each policy of
:class:`~offload_runtime.scheduler.expert_cache.ExpertCache` (the real class), per trace and phase.

Usage: python3 bench/expert_cache_policies.py OUT.json [--prompts 3] [--tokens 9]

A trace is what the runtime looks up: ``prompts`` generations, each a prefill (per layer, the union of the
experts a ``prompt_len``-token prompt routes to) then ``tokens - 1`` decode steps of top-k, every MoE layer
in turn, with the cache's entries and shapes of the two synthetic MoE shapes the GPU benchmark runs
(Mixtral-8x7B: 32 layers x 8 experts, top-2, 79 entries at 24 GiB; Qwen3-30B-A3B: 48 x 128, top-8, 614
entries at 8 GiB). Routing:

* ``uniform``: every expert equally likely (what random weights do, roughly);
* ``zipf``: each layer has its own fixed popularity, weight 1/rank;
* ``sticky``: each of a layer's experts from the previous token is kept with probability 0.6 (trained
  routers reuse experts across neighbouring tokens), the rest uniform.

Simulated traces are not trained models' routing: the point is how the policies rank, not the rates.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

from offload_runtime.scheduler.expert_cache import POLICIES, ExpertCache

SHAPES = {
    "mixtral-8x7b": (32, 8, 2, 79),
    "qwen3-30b-a3b": (48, 128, 8, 614),
}  # layers, experts, top-k, entries
PATTERNS = ("uniform", "zipf", "sticky")
KEEP = 0.6  # sticky: chance a previous token's expert is routed again


class Router:
    """Draws one layer's top-k for one token under a routing pattern."""

    def __init__(self, pattern: str, layers: int, experts: int, k: int, rng: random.Random) -> None:
        self.pattern, self.experts, self.k, self.rng = pattern, experts, k, rng
        self.weights = []
        for _ in range(layers):
            ranks = [1 / (i + 1) for i in range(experts)]
            rng.shuffle(ranks)
            self.weights.append(ranks)
        self.previous: list[list[int]] = [[] for _ in range(layers)]

    def pick(self, layer: int) -> list[int]:
        rng, chosen = self.rng, set()
        if self.pattern == "sticky":
            chosen = {e for e in self.previous[layer] if rng.random() < KEEP}
        while len(chosen) < self.k:
            if self.pattern == "zipf":
                chosen.add(rng.choices(range(self.experts), weights=self.weights[layer])[0])
            else:
                chosen.add(rng.randrange(self.experts))
        self.previous[layer] = sorted(chosen)
        return self.previous[layer]


def trace(router: Router, layers: int, prompts: int, tokens: int, prompt_len: int) -> Iterator[tuple]:
    """``(phase, layer, experts)`` lookups of ``prompts`` generations."""
    for _ in range(prompts):
        for layer in range(layers):
            union = set()
            for _ in range(prompt_len):
                union.update(router.pick(layer))
            yield "prefill", layer, sorted(union)
        for _ in range(tokens - 1):
            for layer in range(layers):
                yield "decode", layer, router.pick(layer)


def simulate(shape: str, pattern: str, policy: str, prompts: int, tokens: int, prompt_len: int) -> dict:
    layers, experts, k, entries = SHAPES[shape]
    cache = ExpertCache(entries, policy, layer_order=range(layers))
    counts = {"prefill": [0, 0], "decode": [0, 0]}
    router = Router(pattern, layers, experts, k, random.Random(1))  # the same trace for every policy
    host, lookups = 0.0, 0
    for phase, layer, chosen in trace(router, layers, prompts, tokens, prompt_len):
        keys = [(layer, e) for e in chosen]
        start = time.perf_counter()
        result = cache.lookup(keys)
        cache.release(result.step)
        host += time.perf_counter() - start
        lookups += 1
        counts[phase][0] += len(result.hits)
        counts[phase][1] += len(chosen)
    rates = {phase: hits / requests for phase, (hits, requests) in counts.items()}
    return {**rates, "host_us_per_lookup": host / lookups * 1e6}  # the runtime pays it once per MoE layer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=9)
    parser.add_argument("--prompt-len", type=int, default=16)
    args = parser.parse_args()
    rows = []
    for shape in SHAPES:
        for pattern in PATTERNS:
            for policy in POLICIES:
                rates = simulate(shape, pattern, policy, args.prompts, args.tokens, args.prompt_len)
                rows.append({"shape": shape, "routing": pattern, "policy": policy, **rates})
                print(
                    f"{shape:14s} {pattern:8s} {policy:10s} prefill {rates['prefill']:.3f}  decode "
                    f"{rates['decode']:.3f}  {rates['host_us_per_lookup']:.0f} us/lookup",
                    flush=True,
                )
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": "cpu (pure Python: ExpertCache)",
        "command": f"python3 bench/expert_cache_policies.py OUT --prompts {args.prompts} "
        f"--tokens {args.tokens} --prompt-len {args.prompt_len}",
        "note": "hit rates on simulated routing; prefill: the prompts' lookups, decode: the tokens' after; "
        "host_us_per_lookup: lookup + release on this CPU, prefill and decode together",
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
