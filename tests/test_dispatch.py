"""dispatch_compressed, load_compressed, remove_offload on the CPU: bit-identical outputs in budget."""

from __future__ import annotations

import copy
import gc
import os

import pytest
import torch
from memory_source import MemorySource

from offload_runtime import dispatch_compressed, load_compressed, remove_offload
from offload_runtime.errors import BudgetError, CheckpointMismatchError, DeviceMemoryError
from offload_runtime.hooks import attached_hooks
from offload_runtime.loaders import ContainerReader, pack
from offload_runtime.scheduler.planner import GIB, plan_placement
from offload_runtime.scheduler.sizes import measure_groups
from offload_runtime.scheduler.tiers import DISK, HOST, RESIDENT
from offload_runtime.tiny import tiny_model

CAUSAL = ("llama", "qwen2", "gpt2")


def minimum_budget(model, prefetch: int) -> int:
    sizes = measure_groups(MemorySource.from_model(model).groups, torch.device("cpu"))  # as the runtime does
    with pytest.raises(BudgetError) as info:
        plan_placement(sizes, 0, prefetch=prefetch)
    return info.value.expected


def budget_gb(model, prefetch: int, kind: str) -> float:
    """``stream``: the minimum working set; ``half``: also room for about half of the weights resident."""
    minimum = minimum_budget(model, prefetch)
    if kind == "stream":
        return minimum / GIB
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return (minimum + total // 2) / GIB


def weight_storage_bytes(model) -> int:
    """Distinct storages behind the model's non-meta parameters and persistent buffers (its weights)."""
    seen = {}
    for t in model.state_dict(keep_vars=True).values():
        if t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def outputs(model, ids, arch):
    with torch.no_grad():
        out = model(ids, attention_mask=torch.ones_like(ids))
    return out.last_hidden_state if arch == "bert" else out.logits


def generate(model, ids):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0
    )


@pytest.mark.parametrize("prefetch", [1, 2])
@pytest.mark.parametrize("budget", ["stream", "half"])
@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_bit_identical_within_budget(tiny_arch, codec, budget, prefetch):
    reference = tiny_model(tiny_arch, num_layers=6)
    model = copy.deepcopy(reference)
    ids = torch.randint(3, 256, (2, 9))  # batch 2
    want = outputs(reference, ids, tiny_arch)
    limit = budget_gb(reference, prefetch, budget)
    dispatch_compressed(model, limit, device="cpu", codec=codec, prefetch=prefetch)
    tiers = [p.tier for p in model.offload_plan.groups]
    assert HOST in tiers
    if budget == "half":
        assert tiers.count(RESIDENT) > sum(1 for p in model.offload_plan.groups if p.decoded_bytes < 4096)
    assert weight_storage_bytes(model) <= limit * GIB
    assert torch.equal(outputs(model, ids, tiny_arch), want)
    assert torch.equal(outputs(model, ids[:1], tiny_arch), outputs(reference, ids[:1], tiny_arch))
    if tiny_arch in CAUSAL:  # KV cache, twice: the second generate starts from the state the first left
        expected = generate(reference, ids)
        assert torch.equal(generate(model, ids), expected)
        assert torch.equal(generate(model, ids), expected)
    assert weight_storage_bytes(model) <= limit * GIB
    stats = model.offload_stats
    assert stats.loads > 0 and stats.decode_bytes > 0
    assert stats.peak_weight_bytes <= limit * GIB


def test_tied_weights_share_one_view(tiny_qwen2, tiny_gpt2):
    for model, embed in [(tiny_qwen2, "model.embed_tokens"), (tiny_gpt2, "transformer.wte")]:
        dispatch_compressed(model, budget_gb(model, 1, "stream"), device="cpu", codec="raw")
        assert model.lm_head.weight is model.get_submodule(embed).weight
        hooked = {type(m).__name__ for m, _ in attached_hooks(model)}
        assert "Linear" in hooked  # the LM head reads the embedding group: it is hooked too


def test_remove_offload_restores_the_model(tiny_arch):
    reference = tiny_model(tiny_arch)
    model = copy.deepcopy(reference)
    ids = torch.randint(3, 256, (2, 5))
    dispatch_compressed(model, budget_gb(reference, 1, "stream"), device="cpu", codec="zstd")
    outputs(model, ids, tiny_arch)
    tmp = model._offload_runtime.tmpdir
    assert os.path.isdir(tmp)
    remove_offload(model)
    assert not os.path.exists(tmp)  # the temporary container is deleted
    assert attached_hooks(model) == []
    for name in ("offload_plan", "offload_stats", "_offload_runtime"):
        assert not hasattr(model, name)
    assert all("forward" not in m.__dict__ for m in model.modules())
    want, got = reference.state_dict(), model.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert all(
        p.requires_grad == q.requires_grad
        for p, q in zip(model.parameters(), reference.parameters(), strict=True)
    )
    if reference.config.tie_word_embeddings and tiny_arch != "bert":
        assert model.lm_head.weight is model.get_output_embeddings().weight
        assert model.lm_head.weight is model.get_input_embeddings().weight
    assert torch.equal(outputs(model, ids, tiny_arch), outputs(reference, ids, tiny_arch))


def test_temporary_container_deleted_when_model_is_collected():
    model = tiny_model("llama")
    dispatch_compressed(model, budget_gb(model, 1, "stream"), device="cpu", codec="raw")
    outputs(model, torch.randint(3, 256, (1, 4)), "llama")
    tmp = model._offload_runtime.tmpdir
    assert os.path.isdir(tmp)
    del model
    gc.collect()
    assert not os.path.exists(tmp)


def test_budget_below_minimum_is_refused_and_model_untouched(tiny_llama):
    reference = copy.deepcopy(tiny_llama)
    minimum = minimum_budget(tiny_llama, 2)
    with pytest.raises(BudgetError) as info:
        dispatch_compressed(tiny_llama, (minimum - 1) / GIB, device="cpu", codec="raw", prefetch=2)
    assert info.value.expected == minimum
    assert info.value.actual == minimum - 1
    assert "model.layers.0" in str(info.value)
    assert attached_hooks(tiny_llama) == [] and not hasattr(tiny_llama, "offload_plan")
    ids = torch.randint(3, 256, (1, 4))
    assert torch.equal(outputs(tiny_llama, ids, "llama"), outputs(reference, ids, "llama"))


def test_dispatch_from_checkpoint_and_mismatch(tmp_path):
    reference = tiny_model("llama")
    path = pack(reference, tmp_path / "llama.safetensors", codec="zstd", progress=False)
    fresh = tiny_model("llama", seed=1)  # other weights: the container's must win
    dispatch_compressed(fresh, budget_gb(reference, 1, "stream"), checkpoint=path, device="cpu")
    ids = torch.randint(3, 256, (2, 6))
    assert torch.equal(outputs(fresh, ids, "llama"), outputs(reference, ids, "llama"))
    other = tiny_model("llama", num_layers=2)
    with pytest.raises(CheckpointMismatchError, match=r"model\.layers\.2"):
        dispatch_compressed(other, 1.0, checkpoint=path, device="cpu")
    assert attached_hooks(other) == []


def test_load_compressed_runs_a_model_several_times_the_budget(tmp_path):
    reference = tiny_model("llama", num_layers=8)
    path = pack(reference, tmp_path / "llama8.safetensors", codec="zstd", progress=False)
    limit = budget_gb(reference, 1, "stream")
    total = sum(p.numel() * p.element_size() for p in reference.parameters())
    assert total > 3 * limit * GIB
    model = load_compressed(path, limit, device="cpu", host_budget_gb=0)  # everything read through the mmap
    assert {p.tier for p in model.offload_plan.streamed} == {DISK}
    assert weight_storage_bytes(model) <= limit * GIB
    ids = torch.randint(3, 256, (2, 7))
    assert torch.equal(outputs(model, ids, "llama"), outputs(reference, ids, "llama"))
    assert torch.equal(generate(model, ids), generate(reference, ids))
    assert model.offload_stats.disk_bytes > 0
    remove_offload(model)
    assert torch.equal(outputs(model, ids, "llama"), outputs(reference, ids, "llama"))


def test_load_compressed_shows_the_mib_read_while_loading(tmp_path, capsys):
    reference = tiny_model("llama", num_layers=4)
    path = pack(reference, tmp_path / "m.safetensors", codec="zstd", progress=False)
    with ContainerReader(path) as reader:
        stored = sum(g.stored_size for g in reader.groups)
    capsys.readouterr()
    model = load_compressed(path, 1.0, device="cpu", progress=True)  # everything resident: all of it read
    err = capsys.readouterr().err
    assert "load m.safetensors:" in err and f"{stored / 2**20:.1f} MiB" in err
    ids = torch.randint(3, 256, (1, 5))
    assert torch.equal(generate(model, ids), generate(reference, ids))
    assert capsys.readouterr().err == ""  # the bar closed when loading ended: streaming draws nothing
    remove_offload(model)
    model = load_compressed(path, 1.0, device="cpu")
    assert capsys.readouterr().err == ""  # no bar unless asked
    remove_offload(model)


def test_plan_and_stats_are_printable(tiny_llama):
    dispatch_compressed(tiny_llama, budget_gb(tiny_llama, 1, "stream"), device="cpu", codec="raw")
    outputs(tiny_llama, torch.randint(3, 256, (1, 4)), "llama")
    plan, stats = str(tiny_llama.offload_plan), str(tiny_llama.offload_stats)
    assert "model.layers.2" in plan and "host" in plan and "totals (decoded / stored):" in plan
    assert "loads" in stats and "decode" in stats and "GiB/s" in stats and " MB" not in stats
    hook = next(h for _, h in attached_hooks(tiny_llama) if h.groups)
    assert "GroupHook(groups=[" in repr(hook)


def test_smollm2_bit_identical(smollm2):
    reference, tokenizer = smollm2
    model = copy.deepcopy(reference)  # the session fixture must not change
    ids = tokenizer(["The capital of France is", "Water boils at"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = reference(**ids).logits
    dispatch_compressed(model, 0.3, device="cpu", codec="raw")  # ~0.5 GiB of fp32 weights
    assert any(p.streamed for p in model.offload_plan.groups)
    assert weight_storage_bytes(model) <= 0.3 * GIB
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, want)


def test_minilm_bit_identical(minilm):
    reference, tokenizer = minilm
    model = copy.deepcopy(reference)
    batch = tokenizer(["a cat sits on the mat", "stock prices fell"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = reference(**batch).last_hidden_state
    limit = minimum_budget(reference, 1) / GIB
    dispatch_compressed(model, limit, device="cpu", codec="zstd")
    with torch.no_grad():
        assert torch.equal(model(**batch).last_hidden_state, want)
    assert weight_storage_bytes(model) <= limit * GIB


RSS_SCRIPT = """
import json, sys, torch
import transformers.models.llama.modeling_llama  # imports are not the model: load them before measuring
from offload_runtime.api import load_compressed

def anon_kib():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1])

torch.set_num_threads(1)
ids = torch.randint(3, 256, (1, 8))
before = anon_kib()
model = load_compressed(sys.argv[1], float(sys.argv[2]), device='cpu', host_budget_gb=0)
with torch.no_grad():
    for _ in range(20):
        model(ids)
print(json.dumps({"growth_bytes": (anon_kib() - before) * 1024, "loads": model.offload_stats.loads}))
"""


def test_load_compressed_keeps_anonymous_memory_far_below_the_model(tmp_path):
    """A ~100 MB model runs from the mmapped container: private memory grows by about the budget only.

    Under glibc's default (adaptive) mmap threshold: a decode path allocating a group-sized buffer per
    load gets it kept in the heap (~90 MB retained here); the CPU loader's one staging buffer does not.
    """
    import json
    import subprocess
    import sys

    model = tiny_model("llama", num_layers=10, hidden_size=512, intermediate_size=1536, vocab_size=256)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert model_bytes > 95e6
    path = pack(model, tmp_path / "big.safetensors", codec="raw", progress=False)
    limit = budget_gb(model, 1, "stream")
    del model
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    result = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(path), repr(limit)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loads"] >= 20 * 10
    # the decoded working set is the budget (~19 MB here), plus one staging buffer of the largest payload
    assert report["growth_bytes"] < limit * GIB + 0.25 * model_bytes


def test_budget_error_comes_before_packing(tiny_llama, monkeypatch):
    import offload_runtime.api as api

    def no_pack(*args, **kwargs):
        raise AssertionError("packed although the budget was already known to be too small")

    monkeypatch.setattr(api, "pack", no_pack)
    with pytest.raises(BudgetError) as info:
        dispatch_compressed(tiny_llama, 1e-6, device="cpu", codec="raw")
    assert info.value.expected == minimum_budget(tiny_llama, 1)


def test_cpu_disk_loads_reuse_one_staging_buffer(tmp_path):
    """Every disk-tier load reads its payload into the loader's one staging buffer: no buffer per load."""
    reference = tiny_model("llama", num_layers=4)
    path = pack(reference, tmp_path / "llama.safetensors", codec="zstd", progress=False)
    model = load_compressed(path, budget_gb(reference, 1, "stream"), device="cpu", host_budget_gb=0)
    reader = model._offload_runtime.reader
    loader = model._offload_runtime.runtime.engine.loader
    disk = [p for p in model.offload_plan.streamed if p.tier == DISK]
    assert len(disk) >= 4 and loader.staging.numel() == max(p.stored_bytes for p in disk)
    targets = []
    original = reader.read_into

    def recording(name, out):
        targets.append(out.data_ptr())
        return original(name, out)

    reader.read_into = recording
    ids = torch.randint(3, 256, (2, 5))
    for _ in range(3):
        assert torch.equal(outputs(model, ids, "llama"), outputs(reference, ids, "llama"))
    assert len(targets) >= 3 * len(disk)
    assert set(targets) == {loader.staging.data_ptr()}


TRUNCATE_SCRIPT = """
import os, sys, torch
from offload_runtime.api import load_compressed
from offload_runtime.errors import CorruptCheckpointError

path, budget = sys.argv[1], float(sys.argv[2])
model = load_compressed(path, budget, device='cpu', host_budget_gb=0)  # every streamed group from the file
ids = torch.randint(3, 256, (1, 6))
with torch.no_grad():
    model(ids)
    os.truncate(path, os.path.getsize(path) // 2)  # the container shrinks under the running model
    try:
        model(ids)
    except CorruptCheckpointError as exc:
        print("TYPED", exc.file == path, exc.group)
        sys.exit(0)
print("NO ERROR")
"""


def test_container_truncated_under_a_running_model_is_a_typed_error(tmp_path):
    """A forward after the container was truncated raises CorruptCheckpointError, never SIGBUS."""
    import subprocess
    import sys

    reference = tiny_model("llama", num_layers=4)
    path = pack(reference, tmp_path / "llama.safetensors", codec="zstd", progress=False)
    limit = budget_gb(reference, 1, "stream")
    result = subprocess.run(
        [sys.executable, "-c", TRUNCATE_SCRIPT, str(path), repr(limit)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])  # -7 would be SIGBUS
    words = result.stdout.split()
    assert words[:2] == ["TYPED", "True"], result.stdout
    assert words[2].startswith("model."), result.stdout


def test_out_of_memory_in_a_forward_is_typed_and_the_model_stays_usable(tiny_llama, monkeypatch):
    # the allocator fails in the middle of a generation: inside the 3rd block's forward of the 2nd step
    reference = copy.deepcopy(tiny_llama)
    ids = torch.randint(3, 256, (1, 7))
    dispatch_compressed(tiny_llama, budget_gb(tiny_llama, 1, "stream"), device="cpu", codec="raw")
    mlp = tiny_llama.model.layers[2].mlp  # not hooked itself: it runs inside its block's hooked forward
    mlp_forward = mlp.forward
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # what the CUDA caching allocator raises
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return mlp_forward(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", failing)
    with pytest.raises(DeviceMemoryError) as info:
        generate(tiny_llama, ids)
    assert isinstance(info.value, torch.OutOfMemoryError)  # existing OOM handlers still catch it
    assert info.value.group == "model.layers.2" and "Tried to allocate" in str(info.value)
    engine = tiny_llama._offload_runtime.runtime.engine
    assert all(not held for held in engine._held.values())  # every slot released
    assert all(slot.current is None or slot.current.pins == 0 for slot in engine.slots)
    assert torch.equal(generate(tiny_llama, ids), generate(reference, ids))


def test_load_compressed_bf16_matches_the_model_it_was_packed_from(tmp_path):
    # a tiny model built in bf16 keeps fp32 rotary buffers, as one loaded from a checkpoint does, so the
    # model rebuilt from the container computes exactly what the original computes
    reference = tiny_model("llama", num_layers=3, dtype=torch.bfloat16)
    path = pack(reference, tmp_path / "model.safetensors", codec="raw", progress=False)
    model = load_compressed(path, budget_gb=budget_gb(reference, 1, "stream"), device="cpu")
    ids = torch.randint(3, 256, (1, 9))
    assert torch.equal(outputs(model, ids, "llama"), outputs(reference, ids, "llama"))
