"""Bad arguments to the public API are refused by kind, with a typed error, before any work."""

import math
import re

import pytest
import torch

import offload_runtime
from offload_runtime import validate_args
from offload_runtime.errors import BudgetError, MissingFileError, UsageError
from offload_runtime.expert_dispatch import ExpertOptions
from offload_runtime.native.layout import TENSOR_ALIGN
from offload_runtime.scheduler.arena import ARENA_ALIGN
from offload_runtime.scheduler.planner import budget_gb_for
from offload_runtime.scheduler.tiers import DISK, HOST
from offload_runtime.synthetic import dispatch_synthetic
from offload_runtime.tiny import tiny_model

BAD_BUDGETS = [math.nan, math.inf, -math.inf, 0, 0.0, -1, -1e-9]


@pytest.fixture(scope="module")
def container(tmp_path_factory):
    path = tmp_path_factory.mktemp("c") / "tiny.safetensors"
    offload_runtime.pack(tiny_model("llama"), path, codec="zstd", progress=False)
    return path


def _untouched(model) -> bool:
    return not hasattr(model, "_offload_runtime") and all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("budget", BAD_BUDGETS)
def test_dispatch_refuses_a_budget_that_is_not_a_positive_number(budget, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr("offload_runtime.api._refuse_early", _must_not_run)
    with pytest.raises(UsageError, match="budget_gb must be a positive number of GiB") as info:
        offload_runtime.dispatch_compressed(model, budget_gb=budget)
    assert isinstance(info.value, ValueError) and not isinstance(info.value, BudgetError)
    assert "budget_gb=2" in str(info.value)  # the fix, spelled as the API spells it
    assert _untouched(model)


@pytest.mark.parametrize("budget", BAD_BUDGETS)
def test_load_compressed_refuses_a_bad_budget_before_opening(container, budget, monkeypatch):
    monkeypatch.setattr("offload_runtime.api.ContainerReader", _must_not_run)
    with pytest.raises(UsageError, match="budget_gb must be a positive number"):
        offload_runtime.load_compressed(container, budget_gb=budget, device="cpu")


@pytest.mark.parametrize("budget", BAD_BUDGETS)
def test_dispatch_synthetic_refuses_a_bad_budget(budget):
    with pytest.raises(UsageError, match="budget_gb must be a positive number"):
        dispatch_synthetic("tiny", budget, device="cpu")


@pytest.mark.parametrize("budget", ["6", None, True, [1]])
def test_a_budget_of_the_wrong_type_is_a_type_error(budget):
    with pytest.raises(TypeError, match="budget_gb must be a number of GiB"):
        offload_runtime.dispatch_compressed(tiny_model("llama"), budget_gb=budget)


@pytest.mark.parametrize(
    ("value", "error"), [(0, UsageError), (-3, UsageError), (1.5, TypeError), (True, TypeError)]
)
def test_prefetch_must_be_a_positive_integer(container, value, error):
    with pytest.raises(error, match="prefetch must be"):
        offload_runtime.load_compressed(container, budget_gb=1, device="cpu", prefetch=value)
    with pytest.raises(error, match="prefetch must be"):
        offload_runtime.dispatch_compressed(tiny_model("llama"), budget_gb=1, device="cpu", prefetch=value)


@pytest.mark.parametrize("value", [-1, math.nan, math.inf])
def test_host_budget_must_be_finite_and_not_negative(container, value):
    with pytest.raises(UsageError, match="host_budget_gb must be a finite number of GiB, 0 or more"):
        offload_runtime.load_compressed(container, budget_gb=1, device="cpu", host_budget_gb=value)


def test_host_budget_zero_streams_everything_from_disk(container):
    with pytest.raises(BudgetError, match="below the minimum working set") as info:
        offload_runtime.load_compressed(container, budget_gb=1e-9, device="cpu", host_budget_gb=0)
    minimum = budget_gb_for(info.value.expected)  # the smallest budget the planner accepts
    model = offload_runtime.load_compressed(container, budget_gb=minimum, device="cpu", host_budget_gb=0)
    plan = model.offload_plan
    streamed = {g.name for g in plan.streamed}
    assert {f"model.layers.{i}" for i in range(3)} <= streamed, str(plan)  # at the minimum, the blocks stream
    assert {g.tier for g in plan.streamed} == {DISK}, str(plan)  # no host RAM: every payload read from disk
    assert plan.in_tier(HOST) == [], str(plan)
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model(ids, attention_mask=torch.ones_like(ids)).logits
        want = tiny_model("llama")(ids, attention_mask=torch.ones_like(ids)).logits
    assert model.offload_stats.disk_bytes > 0
    assert torch.equal(got, want)
    offload_runtime.remove_offload(model)


def test_unknown_verify_policy_is_refused_before_packing(monkeypatch):
    monkeypatch.setattr("offload_runtime.api.pack", _must_not_run)
    with pytest.raises(UsageError, match="verify must be one of once, always, never"):
        offload_runtime.dispatch_compressed(
            tiny_model("llama"), budget_gb=1, device="cpu", verify="sometimes"
        )


# ids spelled out: a bare "gpu" id would be taken for the gpu marker (conftest skips those without CUDA)
@pytest.mark.parametrize(
    "device", ["gpu", "mps", "meta", "cuda:x", "cpu:3", "", "CUDA"], ids=lambda d: f"device={d!r}"
)
def test_unknown_device_is_refused(container, device):
    with pytest.raises(UsageError, match="is not a device offload_runtime runs on") as info:
        offload_runtime.load_compressed(container, budget_gb=1, device=device)
    assert "device='cuda'" in str(info.value) and "device='cpu'" in str(info.value)


def test_cuda_on_a_torch_without_cuda_is_a_usage_error(container, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    for device in ("cuda", "cuda:0", torch.device("cuda"), 0):
        with pytest.raises(UsageError, match="has no CUDA support") as info:
            offload_runtime.load_compressed(container, budget_gb=1, device=device)
        assert "device='cpu'" in str(info.value)
    with pytest.raises(UsageError, match="no CUDA support"):
        offload_runtime.dispatch_compressed(tiny_model("llama"), budget_gb=1, device="cuda")
    with pytest.raises(UsageError, match="no CUDA support"):
        dispatch_synthetic("tiny", 1, device="cuda")


def test_cuda_index_beyond_the_devices_is_refused(container, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match=r"'cuda:3' does not exist: torch sees 1 CUDA device"):
        offload_runtime.load_compressed(container, budget_gb=1, device="cuda:3")


def test_device_of_the_wrong_type_is_a_type_error(container):
    with pytest.raises(TypeError, match="device must be a string"):
        offload_runtime.load_compressed(container, budget_gb=1, device=1.5)


def test_load_compressed_path_checks(tmp_path):
    with pytest.raises(MissingFileError, match="no such file or directory") as info:
        offload_runtime.load_compressed(tmp_path / "nope.safetensors", budget_gb=1)
    assert isinstance(info.value, FileNotFoundError)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="is a folder, not a container file"):
        offload_runtime.load_compressed(tmp_path / "empty", budget_gb=1)
    tiny_model("llama").save_pretrained(tmp_path / "hf")
    with pytest.raises(UsageError, match="is a model folder, not a container") as info:
        offload_runtime.load_compressed(tmp_path / "hf", budget_gb=1)
    assert "offload_runtime.pack(" in str(info.value)  # the fix, in the API's words
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    with pytest.raises(UsageError, match="is a GGUF file, not a container"):
        offload_runtime.load_compressed(gguf, budget_gb=1)
    with pytest.raises(UsageError, match="empty path"):
        offload_runtime.load_compressed("", budget_gb=1)
    with pytest.raises(TypeError, match="path must be a path"):
        offload_runtime.load_compressed(3, budget_gb=1)


def test_load_tokenizer_path_checks(tmp_path):
    with pytest.raises(MissingFileError, match=r"no such file or directory: .*nope\.safetensors"):
        offload_runtime.load_tokenizer(tmp_path / "nope.safetensors")
    with pytest.raises(UsageError, match="is a folder, not a container file"):
        offload_runtime.load_tokenizer(tmp_path)


def test_dispatch_with_a_folder_as_checkpoint_is_refused(tmp_path):
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="checkpoint"):
        offload_runtime.dispatch_compressed(model, budget_gb=1, checkpoint=tmp_path)
    assert _untouched(model)


def test_dispatch_refuses_a_non_module():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module"):
        offload_runtime.dispatch_compressed("HuggingFaceTB/SmolLM2-135M", budget_gb=1)


def test_synthetic_shape_seed_and_dtype(monkeypatch):
    monkeypatch.setattr("offload_runtime.synthetic.synthetic_skeleton", _must_not_run)
    from offload_runtime.synthetic import SYNTHETIC_SHAPES

    known = ", ".join(sorted(SYNTHETIC_SHAPES))
    with pytest.raises(UsageError, match=f"name_or_config must be one of {known}"):
        dispatch_synthetic("llama-99b", 1)
    with pytest.raises(UsageError, match="seed must be an integer of 0 or more"):
        dispatch_synthetic("tiny", 1, device="cpu", seed=-1)
    with pytest.raises(UsageError, match="dtype must be a floating dtype"):
        dispatch_synthetic("tiny", 1, device="cpu", dtype=torch.int8)


def _arena_bytes(module: torch.nn.Module) -> int:
    """A group's decoded bytes as the arena charges them: each tensor 256-aligned, the group 512-aligned."""
    tensors = sum(
        -(-p.numel() * p.element_size() // TENSOR_ALIGN) * TENSOR_ALIGN for p in module.parameters()
    )
    return -(-tensors // ARENA_ALIGN) * ARENA_ALIGN


@pytest.mark.parametrize(
    ("argument", "value", "accepted"),
    [
        ("experts", "experts", "auto, expert, block"),
        ("expert_cache", "fp8", "auto, compressed, decoded"),
        ("expert_policy", "fifo", "layer-lru, lru, lfu"),
    ],
)
def test_expert_options_are_refused_before_any_work(container, argument, value, accepted, monkeypatch):
    monkeypatch.setattr("offload_runtime.api._refuse_early", _must_not_run)
    monkeypatch.setattr("offload_runtime.api.pack", _must_not_run)
    monkeypatch.setattr("offload_runtime.api.ContainerReader", _must_not_run)
    monkeypatch.setattr("offload_runtime.synthetic.synthetic_skeleton", _must_not_run)
    message = re.escape(f"{argument} must be one of {accepted}, got {value!r}")
    model = tiny_model("qwen3_moe")
    with pytest.raises(UsageError, match=message):
        offload_runtime.dispatch_compressed(model, budget_gb=1, device="cpu", **{argument: value})
    assert _untouched(model)
    with pytest.raises(UsageError, match=message):
        offload_runtime.load_compressed(container, budget_gb=1, device="cpu", **{argument: value})
    with pytest.raises(UsageError, match=message):
        dispatch_synthetic("tiny-qwen3-moe", 1, device="cpu", **{argument: value})
    with pytest.raises(TypeError, match=f"{argument} must be a string, one of {accepted}"):
        offload_runtime.dispatch_compressed(model, budget_gb=1, device="cpu", **{argument: None})
    options = {"experts": "experts", "expert_cache": "cache", "expert_policy": "policy"}
    with pytest.raises(UsageError, match=message):  # the options object obeys the same rule
        ExpertOptions(**{options[argument]: value})


def test_compressed_expert_entries_on_the_cpu_are_a_usage_error(tmp_path):
    """They need a GPU decoder; the CPU cache holds decoded experts. It was a bare ValueError from the
    planner, which the CLI reported as a bug."""
    message = "expert_cache='compressed' needs a CUDA device"
    moe = offload_runtime.pack(
        tiny_model("qwen3_moe"), tmp_path / "moe.safetensors", codec="zstd", progress=False
    )
    with pytest.raises(UsageError, match=re.escape(message)) as info:
        offload_runtime.load_compressed(moe, budget_gb=1, device="cpu", expert_cache="compressed")
    assert "expert_cache='decoded'" in str(info.value)  # the hint
    with pytest.raises(UsageError, match=re.escape(message)):
        dispatch_synthetic("tiny-qwen3-moe", 1, device="cpu", expert_cache="compressed")
    with pytest.raises(UsageError, match=re.escape(message)):
        offload_runtime.dispatch_compressed(
            tiny_model("qwen3_moe"), budget_gb=1, device="cpu", expert_cache="compressed"
        )


def test_expert_choices_are_the_runtime_s():
    from offload_runtime.scheduler.expert_cache import POLICIES
    from offload_runtime.scheduler.experts_plan import ENTRY_MODES

    assert validate_args.EXPERT_POLICIES == POLICIES
    assert ("auto", *ENTRY_MODES) == validate_args.EXPERT_CACHE_MODES


def test_budget_error_still_names_the_minimum_for_a_positive_budget():
    model = tiny_model("llama")
    # on the CPU the minimum is two slots (prefetch=1) of the largest block plus the resident final norm;
    # staging, codec scratch and workspaces are GPU terms, 0 here
    minimum = 2 * _arena_bytes(model.model.layers[0]) + _arena_bytes(model.model.norm)
    with pytest.raises(BudgetError, match=f"below the minimum working set of {minimum:,} bytes") as info:
        offload_runtime.dispatch_compressed(model, budget_gb=1e-6, device="cpu")
    assert info.value.expected == minimum
    assert f"raise budget_gb to at least {budget_gb_for(minimum)}" in str(info.value)


def test_spelling_follows_the_interface():
    assert validate_args.spell("--budget-gb", 2) == "--budget-gb 2"
    assert validate_args.spell("budget_gb", 2) == "budget_gb=2"
    assert validate_args.spell("device", "cpu") == "device='cpu'"
    with pytest.raises(UsageError, match="--max-new-tokens must be an integer of 1 or more") as info:
        validate_args.positive_int(0, "--max-new-tokens", example=64)
    assert "--max-new-tokens 64" in str(info.value)


def _must_not_run(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")
