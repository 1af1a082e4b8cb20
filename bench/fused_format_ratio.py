"""How much smaller ``fused12`` makes real and random bf16 weights (CPU; writes a JSON result).

For each model (SmolLM2-135M and MiniLM-L6 from their packages, cast to bf16, and random N(0, 0.02)
matrices of the Llama shapes' aspect), every group is encoded exactly as ``pack`` does (``find_groups``,
one layout per group, the ``fused12`` codec), and this records:

* ``ratio``: decoded layout bytes / payload bytes over all groups (norms, biases, embeddings included,
  ties stored once, alignment included): what a container of the model saves;
* ``ratio_planes``: bf16 bytes / plane bytes over the tensors stored as planes (the format alone);
* ``escape_fraction``: escaped weights / weights stored as planes, and ``zero_fraction`` (exact zeros are
  escapes); ``verbatim_2d``: 2-D bf16 tensors the codec left verbatim (too many escapes).

Usage::

    python bench/fused_format_ratio.py bench/results/2026-11-30-cpu-fused-format-ratio.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from offload_runtime.loaders.groups import find_groups
from offload_runtime.native import GroupLayout, get_codec
from offload_runtime.native import fused12_format as fmt
from offload_runtime.native.fused12 import PLANES, parse_params

RANDOM_SHAPES = [(1024, 4096), (4096, 4096), (4096, 1024)]  # q/k/v/o and MLP aspect ratios, scaled down


def measure_state(groups: list[list[str]], state: dict[str, torch.Tensor]) -> dict:
    """Encode each group of ``state`` (names per group) with fused12; the totals of :mod:`this script`."""
    codec = get_codec("fused12")
    decoded = stored = plane_weights = plane_bytes = escapes = zeros = 0
    verbatim_2d = []
    for names in groups:
        layout = GroupLayout.from_tensors((name, state[name]) for name in names)
        encoded = codec.encode(layout, layout.pack(state))
        decoded += layout.size
        stored += encoded.payload.size
        for entry in parse_params(encoded.params, layout, encoded.chunks):
            spec = entry.spec
            if entry.kind == PLANES:
                plane_weights += spec.numel
                plane_bytes += sum(fmt.plane_nbytes(*spec.shape, entry.escapes).values())
                escapes += entry.escapes
                zeros += int((state[spec.name] == 0).sum())
            elif spec.dtype == "bfloat16" and len(spec.shape) == 2 and spec.numel:
                verbatim_2d.append(spec.name)
    return {
        "ratio": decoded / stored,
        "ratio_planes": plane_weights * 2 / plane_bytes if plane_bytes else None,
        "escape_fraction": escapes / max(plane_weights, 1),
        "zero_fraction": zeros / max(plane_weights, 1),
        "decoded_bytes": decoded,
        "stored_bytes": stored,
        "plane_weights": plane_weights,
        "verbatim_2d": verbatim_2d,
    }


def measure_model(model: torch.nn.Module) -> dict:
    state = model.state_dict()
    groups = [spec.tensors for spec in find_groups(model)]
    return measure_state(groups, state)


def measure_random(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    state = {
        f"w{i}": (torch.randn(shape, generator=generator) * 0.02).bfloat16()
        for i, shape in enumerate(RANDOM_SHAPES)
    }
    return measure_state([[name] for name in state], state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="JSON result path")
    args = parser.parse_args()
    from offload_runtime.packaged import load_minilm, load_smollm2

    results = {}
    for name, loader in (("smollm2-135m", load_smollm2), ("minilm-l6", load_minilm)):
        start = time.perf_counter()
        model, _ = loader(dtype=torch.bfloat16)
        results[name] = measure_model(model)
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(name, {k: v for k, v in results[name].items() if k != "verbatim_2d"}, flush=True)
    results["random-normal-0.02"] = measure_random()
    results["random-normal-0.02"]["shapes"] = RANDOM_SHAPES
    print("random", results["random-normal-0.02"], flush=True)
    report = {
        "what": "fused12 stored size vs bf16 (bench/fused_format_ratio.py)",
        "gate": "ratio >= 1.30 for every model",
        "passed": all(r["ratio"] >= 1.30 for r in results.values()),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("passed" if report["passed"] else "FAILED", "->", args.out)


if __name__ == "__main__":
    main()
