"""The executed_compressed tier on CUDA: the Triton kernels compute every linear layer of the streamed blocks
from their planes; weights exact, summation order not cuBLAS's: close logits, the same top-1 almost
everywhere (random weights have near ties)."""

from __future__ import annotations

import copy

import pytest
import torch

from offload_runtime import load_compressed
from offload_runtime.loaders import pack
from offload_runtime.scheduler.tiers import EXECUTED_COMPRESSED
from offload_runtime.tiny import tiny_model

pytestmark = pytest.mark.cuda  # Triton kernels: CUDA, no nvCOMP


def test_llama_blocks_compute_from_planes_on_cuda(tmp_path):
    model = tiny_model(
        "llama", num_layers=4, dtype=torch.bfloat16, hidden_size=512, intermediate_size=1408, vocab_size=2048
    )
    path = pack(model, tmp_path / "m.safetensors", codec="fused12", progress=False, device="cuda")
    reference = copy.deepcopy(model).cuda()
    ids = torch.randint(3, 2048, (1, 12), device="cuda")
    with torch.no_grad():
        want = reference(ids).logits.float()
    offloaded = load_compressed(path, 1.0, device="cuda", execute_compressed=True)
    assert {p.name for p in offloaded.offload_plan.in_tier(EXECUTED_COMPRESSED)} >= {
        f"model.layers.{i}" for i in range(4)
    }
    with torch.no_grad():
        got = offloaded(ids).logits.float()
    assert (got - want).abs().max().item() < 0.1  # bf16 outputs; only the summation order differs
    assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.9  # random weights: near ties
