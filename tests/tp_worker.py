"""The rank side of ``test_tp_offload.py``: run in each of the processes ``torch.multiprocessing`` spawns.

Every rank loads the same tensor-parallel model (``from_pretrained`` with ``DistributedConfig(tp_size=N)``,
gloo on the CPU) as the reference, then runs the checks of :func:`run_checks` and writes what it saw to
``<out>/rank<r>.json``; the test process asserts on those files. One spawn serves every check (a process
importing torch and transformers takes seconds).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

PROMPT = 7
NEW_TOKENS = 5


def ids_batch(batch: int) -> torch.Tensor:
    return torch.randint(3, 256, (batch, PROMPT), generator=torch.Generator().manual_seed(batch))


def observe(model) -> dict[str, torch.Tensor]:
    """Logits at batch 1 and 3, and greedy tokens at batch 1 and 3 (KV cache)."""
    out = {}
    with torch.no_grad():
        for batch in (1, 3):
            ids = ids_batch(batch)
            out[f"logits_b{batch}"] = model(ids, attention_mask=torch.ones_like(ids)).logits
            out[f"tokens_b{batch}"] = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, bool]:
    return {key: bool(torch.equal(a[key], b[key])) for key in a}


def minimum_gb(dispatch) -> float:
    """The per-rank minimum working set, from the BudgetError a 1-byte budget raises."""
    from offload_runtime.errors import BudgetError

    try:
        dispatch(1e-9)
    except BudgetError as exc:
        return exc.expected / (1 << 30)
    raise AssertionError("a budget of one byte was accepted")


def budget_facts(model, budget_gb: float) -> dict:
    runtime = model._offload_runtime.runtime
    plan = model.offload_plan
    return {
        "budget_bytes": round(budget_gb * (1 << 30)),
        "plan_device_bytes": plan.device_bytes,
        "arena_bytes": runtime.arena.buffer.numel(),
        "arena_used": runtime.arena.offset,
        "plan_arena_bytes": plan.device_bytes - plan.overhead_bytes,
        "streamed": len(plan.streamed),
        "groups": len(plan.groups),
    }


def run_checks(rank: int, world: int, work: Path) -> dict:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from offload_runtime import dispatch_compressed, load_compressed, remove_offload

    results: dict = {}
    plan = json.loads((work / "plan.json").read_text())
    for arch, slices in plan.items():
        model = AutoModelForCausalLM.from_pretrained(
            work / arch, distributed_config=DistributedConfig(tp_size=world), dtype=torch.bfloat16
        ).eval()
        want = observe(model)
        local_bytes = sum(t.to_local().numel() for t in model.parameters() if hasattr(t, "to_local"))
        minimum = minimum_gb(lambda gb, m=model: dispatch_compressed(m, gb, device="cpu"))
        dispatch_compressed(model, minimum, device="cpu")
        row = {
            "dispatch": same(observe(model), want),
            "dispatch_budget": budget_facts(model, minimum),
            "sharded_params": local_bytes > 0,
        }
        remove_offload(model)
        row["removed"] = same(observe(model), want)

        # shard on load: a container of the unsharded model, tp_slices slices per sliced tensor
        path = work / f"{arch}.ort"
        dispatch_compressed(model, minimum, device="cpu", checkpoint=path)  # the TP model, its rank's slices
        row["dispatch_checkpoint"] = same(observe(model), want)
        row["dispatch_checkpoint_reads"] = reads(model._offload_runtime.reader, rank, world, slices)
        del model
        minimum = minimum_gb(lambda gb, p=path: load_compressed(p, gb, device="cpu"))
        model = load_compressed(path, minimum, device="cpu")
        row["load"] = same(observe(model), want)
        row["load_budget"] = budget_facts(model, minimum)
        row["load_reads"] = reads(model._offload_runtime.reader, rank, world, slices)
        results[arch] = row
    for shape in ("tiny", "tiny-qwen3-moe"):
        results[f"synthetic-{shape}"] = synthetic_checks(shape)
    return results


def synthetic_checks(shape: str) -> dict:
    """A synthetic model generated rank by rank (each rank only its shards) against the same model
    materialised and sharded (the unoffloaded TP reference)."""
    from offload_runtime.loaders.tp import shard_empty_model
    from offload_runtime.synthetic import (
        dispatch_synthetic,
        materialize,
        synthetic_config,
        synthetic_skeleton,
    )

    config = synthetic_config(shape)
    reference = materialize(shard_empty_model(synthetic_skeleton(config, torch.float32)), seed=3)
    want = observe(reference)
    del reference

    def dispatch(gb):
        return dispatch_synthetic(config, gb, codec="zstd", device="cpu", seed=3, dtype=torch.float32)

    minimum = minimum_gb(dispatch)
    model = dispatch(minimum)
    return {"dispatch": same(observe(model), want), "dispatch_budget": budget_facts(model, minimum)}


def reads(reader, rank: int, world: int, slices: int) -> dict:
    """What the rank read of the container, against what it should: its groups' own payloads and its
    slices [rank * slices / world, (rank + 1) * slices / world), nothing else."""
    groups = reader.index.groups
    own = {g.name for g in groups if g.tp_slice is None and g.stored_size}
    own |= {g.name for g in groups if g.tp_slice is not None and g.tp_slice.index * world // slices == rank}
    return {
        "only_own_groups": reader.stored_read == own,
        "others_slices_read": sorted(n for n in reader.stored_read - own),
        "distinct_bytes_read": sum(g.stored_size for g in groups if g.name in reader.stored_read),
        "container_bytes": sum(g.stored_size for g in groups),
        "slice_bytes_read": sum(g.stored_size for g in groups if g.tp_slice and g.name in reader.stored_read),
        "slice_bytes": sum(g.stored_size for g in groups if g.tp_slice is not None),
        "sliced_groups": sum(g.tp is not None for g in groups),
    }


def main(rank: int, world: int, work: str, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = run_checks(rank, world, Path(work))
        (Path(work) / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()
