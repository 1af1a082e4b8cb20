"""Faults on the GPU path: damaged payloads caught by the GPU check in their group's forward, CUDA OOM in the
middle of a generation, and which engine mode the runtime picks."""

from __future__ import annotations

import copy

import pytest
import torch
from test_dispatch_gpu import larger_llama, minimum_gb

from offload_runtime import load_compressed
from offload_runtime.errors import CorruptCheckpointError, DeviceMemoryError
from offload_runtime.loaders import pack
from offload_runtime.native import GroupLayout
from offload_runtime.native.ans import AnsCodec
from offload_runtime.scheduler.planner import GIB
from offload_runtime.scheduler.tiers import DEVICE_COMPRESSED, DISK, HOST

pytestmark = pytest.mark.gpu


def test_decode_check_names_the_damaged_chunk():
    tensors = {"w": (torch.randn(700, 1024) * 0.02).bfloat16()}
    layout = GroupLayout.from_tensors(tensors.items())
    encoded = AnsCodec().encode(layout, layout.pack(tensors))
    decoder = AnsCodec().gpu_decoder(encoded.chunks, encoded.params, layout, torch.device("cuda"))
    src = torch.from_numpy(encoded.payload).cuda()
    out = torch.empty(layout.size, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    decoder.decode(src, out, stream, check=True).result()  # intact: no error
    src[encoded.chunks[2].offset + 64] ^= 0x5A
    report = decoder.decode(src, out, stream, check=True)
    with pytest.raises(CorruptCheckpointError, match="GPU decode of chunk 2 is wrong") as info:
        report.result()
    assert info.value.chunk == 2


def damage(model, tier) -> tuple[str, torch.Tensor, int]:
    """Flip a byte inside chunk 2 of a ``tier`` group's payload, in memory; return where. The last such
    group is taken: after a forward, the first ones of the next pass are already copied ahead or decoded
    into their slots from the intact bytes."""
    runtime = model._offload_runtime.runtime
    name = [p.name for p in model.offload_plan.groups if p.tier == tier][-1]
    payload = runtime.stores[tier].payloads[name]
    at = runtime.source.group(name).chunks[2].offset + 64
    payload[at] ^= 0x5A
    return name, payload, at


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    model = larger_llama()
    path = pack(model, tmp_path_factory.mktemp("ans") / "model.safetensors", codec="ans", progress=False)
    reference = copy.deepcopy(model).cuda()
    ids = torch.randint(3, model.config.vocab_size, (1, 12), device="cuda")
    with torch.no_grad():
        want = reference(ids).logits
    del reference
    torch.cuda.empty_cache()
    return model, path, ids, want


@pytest.mark.parametrize("tier", [DEVICE_COMPRESSED, HOST])
def test_damaged_payload_is_reported_in_its_groups_forward(packed, tier):
    model, path, ids, want = packed
    # room for about half of the payloads in VRAM: the rest streams from pinned RAM
    budget = minimum_gb(model, path) + 0.5 * path.stat().st_size / GIB
    offloaded = load_compressed(path, budget_gb=budget, device="cuda")
    assert {DEVICE_COMPRESSED, HOST} <= {p.tier for p in offloaded.offload_plan.groups}
    name, payload, at = damage(offloaded, tier)
    with torch.no_grad(), pytest.raises(CorruptCheckpointError) as info:
        offloaded(ids)
    assert (info.value.file, info.value.group, info.value.chunk) == (str(path), name, 2)
    engine = offloaded._offload_runtime.runtime.engine
    assert all(not held for held in engine._held.values())
    payload[at] ^= 0x5A  # repaired: the group is decoded (and checked) again, the model is usable
    with torch.no_grad():
        assert torch.equal(offloaded(ids).logits, want)


def test_verify_always_checks_every_decode_once_only_the_first(packed):
    model, path, ids, want = packed
    for verify in ("always", "once"):
        offloaded = load_compressed(path, budget_gb=minimum_gb(model, path), device="cuda", verify=verify)
        with torch.no_grad():
            assert torch.equal(offloaded(ids).logits, want)  # every group decoded and checked once
        name, payload, at = damage(offloaded, HOST)
        with torch.no_grad():
            if verify == "always":
                with pytest.raises(CorruptCheckpointError) as info:
                    offloaded(ids)
                assert (info.value.group, info.value.chunk) == (name, 2)
            else:  # "once": the host copy was verified and is trusted; no host wait on later decodes
                offloaded(ids)
                assert offloaded._offload_runtime.runtime.engine.loader._checks == {}
        payload[at] ^= 0x5A


def test_cuda_oom_mid_generation_is_typed_and_the_next_call_works(packed):
    model, path, ids, _ = packed
    offloaded = load_compressed(path, budget_gb=minimum_gb(model, path), device="cuda")
    mask = torch.ones_like(ids)
    expected = offloaded.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (64 << 20)) / total)
    try:
        long_ids = torch.randint(3, model.config.vocab_size, (4, 2048), device="cuda")
        with pytest.raises(DeviceMemoryError) as info:
            offloaded.generate(long_ids, attention_mask=torch.ones_like(long_ids), max_new_tokens=4)
        assert isinstance(info.value, torch.OutOfMemoryError)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    engine = offloaded._offload_runtime.runtime.engine
    assert all(not held for held in engine._held.values())
    assert all(slot.current is None or slot.current.pins == 0 for slot in engine.slots)
    again = offloaded.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(again, expected)


def test_engine_runs_inline_unless_a_load_reads_the_disk(packed):
    model, path, ids, want = packed
    minimum = minimum_gb(model, path)
    in_ram = load_compressed(path, budget_gb=minimum, device="cuda")
    assert not in_ram._offload_runtime.runtime.engine.threaded
    from_disk = load_compressed(path, budget_gb=minimum, device="cuda", host_budget_gb=0.0)
    assert {p.tier for p in from_disk.offload_plan.streamed} == {DISK}
    assert from_disk._offload_runtime.runtime.engine.threaded
    with torch.no_grad():
        assert torch.equal(from_disk(ids).logits, want)
