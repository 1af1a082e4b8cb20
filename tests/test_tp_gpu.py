"""Tensor-parallel slices streamed in one process: a rank's view of a sliced container through the runtime's
slots and decoders (on CUDA: the GPU decoders; slices decoded in place, or copied into place with strided
copies), bit for bit the rank's shards. The multi-GPU runs are ``bench/tp_offload.py``; the multi-process
CPU runs ``test_tp_offload.py``."""

from __future__ import annotations

import pytest
import torch

from offload_runtime.loaders import ContainerReader, pack
from offload_runtime.loaders.tp import planned_shard_dims
from offload_runtime.loaders.tp_slices import RankShards
from offload_runtime.scheduler.planner import GIB
from offload_runtime.scheduler.runtime import build_runtime
from offload_runtime.tiny import tiny_model

DEVICES = [
    pytest.param("cuda", "ans", marks=pytest.mark.gpu),
    pytest.param("cuda", "zstd", marks=pytest.mark.gpu),
    ("cpu", "zstd"),  # the same test through the CPU loader: the test itself runs in CI
]


def _shard(full: torch.Tensor, dim: int, split: int, index: int, count: int) -> torch.Tensor:
    return torch.cat([p.chunk(count, dim)[index] for p in full.chunk(split, dim)], dim)


@pytest.mark.parametrize("device,codec", DEVICES)
@pytest.mark.parametrize("arch,slices", [("llama", 2), ("llama", 4), ("qwen3_moe", 2)])
def test_rank_views_stream_bit_identical(arch, slices, device, codec, tmp_path):
    model = tiny_model(arch, dtype=torch.bfloat16)
    path = pack(model, tmp_path / "m.ort", codec=codec, progress=False, device=device, tp_slices=slices)
    dims = planned_shard_dims(model)
    state = model.state_dict()
    for rank in range(2):
        with ContainerReader(path) as reader:
            reader.shard(RankShards(rank, 2, dims))
            names = [g.name for g in reader.groups]
            runtime = build_runtime(reader, GIB, device=torch.device(device), force_streamed=names)
            parts = [p for g in reader.groups if g.codec == "reassembled" for p in g.params["parts"]]
            assert any(p.direct is not None for p in parts)  # decoded in place
            # copied into place: strided (2 slices per rank: a row-wise weight's column blocks) or experts
            assert any(p.direct is None for p in parts) == (slices > 2 or arch != "llama")
            assert runtime.streamed
            runtime.engine.begin_pass()
            for name in names:
                if name not in runtime.streamed:
                    continue
                runtime.engine.acquire(name)
                if device == "cuda":
                    torch.cuda.synchronize()
                for tensor, view in runtime.views[name].items():
                    want = state[tensor]
                    if tensor in dims:
                        want = _shard(want, *dims[tensor], rank, 2)
                    assert torch.equal(view.cpu(), want), (rank, tensor)
                runtime.engine.release(name)
            runtime.engine.end_pass()
            runtime.close()
