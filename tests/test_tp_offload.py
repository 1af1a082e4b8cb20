"""Tensor-parallel models on the CPU: 2 ranks (gloo), each offloading only its own shards within its budget.

One spawn of ``WORLD`` processes runs every check (``tp_worker.py``); the tests below assert on what each
rank wrote. The reference is the same TP model, unoffloaded, on the same ranks: the reductions across ranks
are the model's in both, so logits and greedy tokens must be bit-identical.
"""

from __future__ import annotations

import json
import socket

import pytest
import torch

from offload_runtime.loaders import pack
from offload_runtime.tiny import tiny_model

WORLD = 2
# architecture -> tensor-parallel slices its container is packed with: 2 (one slice per rank, decoded in
# place) and 4 (two per rank, copied into place)
SLICES = {"llama": 4, "qwen3_moe": 2}
ARCHS = tuple(SLICES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    import tp_worker

    work = tmp_path_factory.mktemp("tp")
    for arch, slices in SLICES.items():
        tiny_model(arch, num_layers=3, dtype=torch.bfloat16).save_pretrained(work / arch)
        pack(work / arch, work / f"{arch}.ort", codec="zstd", progress=False, tp_slices=slices)
    (work / "plan.json").write_text(json.dumps(SLICES))
    torch.multiprocessing.spawn(tp_worker.main, args=(WORLD, str(work), _free_port()), nprocs=WORLD)
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("arch", ARCHS)
def test_dispatch_of_tp_model_is_bit_identical(ranks, arch):
    for rank, results in enumerate(ranks):
        row = results[arch]
        assert row["sharded_params"], f"rank {rank}: the reference has no DTensor parameters"
        assert all(row["dispatch"].values()), f"rank {rank}: {row['dispatch']}"
        assert all(row["removed"].values()), f"rank {rank}: after remove_offload {row['removed']}"
        assert all(row["dispatch_checkpoint"].values()), f"rank {rank}: {row['dispatch_checkpoint']}"
        assert row["dispatch_checkpoint_reads"]["only_own_groups"], f"rank {rank}"


@pytest.mark.parametrize("arch", ARCHS)
def test_dispatch_budget_is_per_rank(ranks, arch):
    for rank, results in enumerate(ranks):
        facts = results[arch]["dispatch_budget"]
        assert facts["plan_device_bytes"] <= facts["budget_bytes"], f"rank {rank}: {facts}"
        assert facts["arena_bytes"] == facts["plan_arena_bytes"] == facts["arena_used"], (
            f"rank {rank}: {facts}"
        )
        assert facts["streamed"] > 0, f"rank {rank}: nothing streamed at the minimum budget"


@pytest.mark.parametrize("arch", ARCHS)
def test_load_compressed_shards_on_load_bit_identical(ranks, arch):
    for rank, results in enumerate(ranks):
        row = results[arch]
        assert all(row["load"].values()), f"rank {rank}: {row['load']}"
        facts = row["load_budget"]
        assert facts["plan_device_bytes"] <= facts["budget_bytes"], f"rank {rank}: {facts}"
        assert facts["arena_bytes"] == facts["plan_arena_bytes"] == facts["arena_used"], f"rank {rank}"


@pytest.mark.parametrize("arch", ARCHS)
def test_no_rank_reads_another_ranks_slices(ranks, arch):
    for rank, results in enumerate(ranks):
        read = results[arch]["load_reads"]
        assert read["sliced_groups"] > 0
        assert read["only_own_groups"], f"rank {rank} read {read['others_slices_read']}"
        # its slices: 1/WORLD of the sliced bytes (give or take compression); never the whole container
        assert read["slice_bytes_read"] <= read["slice_bytes"] / WORLD * 1.2, f"rank {rank}: {read}"
        assert read["distinct_bytes_read"] < read["container_bytes"], f"rank {rank}: {read}"


@pytest.mark.parametrize("shape", ["tiny", "tiny-qwen3-moe"])
def test_synthetic_models_generate_only_their_shards_bit_identical(ranks, shape):
    for rank, results in enumerate(ranks):
        row = results[f"synthetic-{shape}"]
        assert all(row["dispatch"].values()), f"rank {rank}: {row['dispatch']}"
        facts = row["dispatch_budget"]
        assert facts["plan_device_bytes"] <= facts["budget_bytes"], f"rank {rank}: {facts}"
        assert facts["arena_bytes"] == facts["plan_arena_bytes"] == facts["arena_used"], f"rank {rank}"


def test_tensor_parallel_runs_experts_with_their_blocks_and_refuses_what_it_cannot_run(tmp_path):
    from offload_runtime import load_compressed
    from offload_runtime.errors import UsageError
    from offload_runtime.expert_dispatch import ExpertOptions, dispatch_options
    from offload_runtime.synthetic import dispatch_synthetic

    assert dispatch_options(tensor_parallel=True).experts == "block"
    assert dispatch_options("expert", "decoded", "lfu", True) == ExpertOptions(
        "expert", "decoded", "lfu", True
    )
    with pytest.raises(UsageError, match="experts='expert' is not supported under tensor parallelism"):
        dispatch_options(experts="expert", tensor_parallel=True)
    with pytest.raises(UsageError, match="execute_compressed is not supported under tensor parallelism"):
        dispatch_options(tensor_parallel=True, execute_compressed=True)
    with pytest.raises(UsageError, match="experts='expert' is not supported under tensor parallelism"):
        dispatch_synthetic("tiny-qwen3-moe", 1, device="cpu", experts="expert", tensor_parallel=True)
    path = pack(tiny_model("llama", num_layers=1), tmp_path / "m.ort", codec="raw", progress=False)
    with pytest.raises(UsageError, match="execute_compressed is not supported under tensor parallelism"):
        load_compressed(path, 1, device="cpu", execute_compressed=True, tensor_parallel=True)
