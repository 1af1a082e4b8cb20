"""Exact expert execution: the model's own experts forward over a slot holding only the routed experts."""

from __future__ import annotations

import copy

import pytest
import torch

from offload_runtime.errors import ExpertRoutingError
from offload_runtime.experts import (
    ContainerProvider,
    CopyProvider,
    ExpertHook,
    attach_experts,
    detach_experts,
    routed_experts,
)
from offload_runtime.loaders import ContainerReader, pack
from offload_runtime.loaders.moe import find_expert_modules
from offload_runtime.tiny import TINY_MOE_ARCHITECTURES, tiny_model

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


class PoisoningProvider(CopyProvider):
    """Before each step, every slice is NaN again; only the step's experts are copied in. Any read of an
    expert the step did not route to would turn the output into NaN."""

    def make_ready(self, module, expert_ids):
        for tensor in self.slots[module].params.values():
            tensor.fill_(float("nan"))
        super().make_ready(module, expert_ids)


def _stacked(model) -> dict[str, dict[str, torch.Tensor]]:
    return {
        m.path: {a: getattr(model.get_submodule(m.path), a).detach().clone() for a in m.params}
        for m in find_expert_modules(model)
    }


def _with_provider(reference, provider_cls=PoisoningProvider):
    model = copy.deepcopy(reference)
    provider = provider_cls(_stacked(model))
    hooks = attach_experts(model, provider, fill=float("nan"))
    provider.slots = {path: hook.slot for path, hook in hooks.items()}
    return model, provider, hooks


def _steps(model, ids):
    kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 3, "do_sample": False}
    with torch.no_grad():
        logits = model(ids).logits
        out = model.generate(ids, pad_token_id=0, output_logits=True, return_dict_in_generate=True, **kwargs)
    return logits, out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", TINY_MOE_ARCHITECTURES)
def test_only_routed_experts_present_gives_identical_logits_and_tokens(arch, dtype, implementation):
    reference = tiny_model(arch, dtype=dtype)
    reference.set_experts_implementation(implementation)
    model, provider, hooks = _with_provider(reference)
    num_experts = next(iter(hooks.values())).slot.num_experts
    for batch, length in ((1, 2), (3, 5)):
        ids = torch.randint(3, 256, (batch, length))
        got, want = _steps(model, ids), _steps(reference, ids)
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
        assert torch.isfinite(got[0]).all()
    requests = [ids for event, _, ids in provider.log if event == "make_ready"]
    assert any(len(ids) < num_experts for ids in requests)  # the poisoning had something to catch
    assert all(ids == sorted(set(ids)) for ids in requests)
    releases = [(m, ids) for event, m, ids in provider.log if event == "release"]
    assert releases == [(m, ids) for event, m, ids in provider.log if event == "make_ready"]


def test_one_request_per_experts_module_per_step():
    reference = tiny_model("qwen3_moe")
    model, provider, hooks = _with_provider(reference)
    ids = torch.randint(3, 256, (2, 6))
    with torch.no_grad():
        model(ids)
        model(ids[:, :1])
    made = [m for event, m, _ in provider.log if event == "make_ready"]
    assert made == [h for h in hooks] * 2  # each module once per forward, in execution order
    assert all(h.calls == 2 for h in hooks.values())


def test_poisoning_catches_a_provider_that_misses_an_expert():
    """Guard of the test above: if the provider forgets one routed expert, the NaN shows."""

    class Forgetful(PoisoningProvider):
        def make_ready(self, module, expert_ids):
            super().make_ready(module, expert_ids[1:])

    reference = tiny_model("mixtral")
    model, _, _ = _with_provider(reference, Forgetful)
    with torch.no_grad():
        assert not torch.isfinite(model(torch.randint(3, 256, (1, 3))).logits).all()


def test_decoding_experts_from_a_container_with_only_the_index_records(tmp_path):
    reference = tiny_model("gpt_oss")  # four stacked parameters per expert, biases included
    path = pack(reference, tmp_path / "m.ort", codec="zstd", progress=False, device="cpu")
    model = copy.deepcopy(reference)
    with ContainerReader(path, granularity="expert") as reader:
        provider = ContainerProvider(reader)
        hooks = attach_experts(model, provider, fill=float("nan"))
        provider.slots = {p: h.slot for p, h in hooks.items()}
        ids = torch.randint(3, 256, (1, 4))
        got, want = _steps(model, ids), _steps(reference, ids)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert provider.decoded > 0


def test_routing_is_read_from_the_one_integer_tensor_and_sentinels_are_ignored():
    hidden, weights = torch.zeros(3, 4), torch.ones(3, 2)
    index = torch.tensor([[5, 1], [1, 8], [3, 8]])  # 8 == E: an expert-parallel sentinel
    assert routed_experts("m", 8, (hidden, index, weights), {}) == [1, 3, 5]
    assert routed_experts("m", 8, (hidden,), {"router_indices": index, "routing_weights": weights}) == [
        1,
        3,
        5,
    ]
    with pytest.raises(ExpertRoutingError, match="cannot tell which experts") as info:
        routed_experts("model.layers.0.mlp.experts", 8, (hidden, weights), {})
    assert info.value.group == "model.layers.0.mlp.experts"
    with pytest.raises(ExpertRoutingError, match="actual=2 integer tensors"):  # which one holds the indices?
        routed_experts("m", 8, (index, index), {})


def test_detach_restores_parameters_and_forward():
    reference = tiny_model("olmoe")
    model, _, hooks = _with_provider(reference)
    path = next(iter(hooks))
    module = model.get_submodule(path)
    assert module.gate_up_proj.data_ptr() == hooks[path].slot.params["gate_up_proj"].data_ptr()
    detach_experts(model)
    assert "forward" not in module.__dict__ and not isinstance(
        getattr(module, "_offload_expert_hook", None), ExpertHook
    )
    assert torch.equal(module.gate_up_proj, reference.get_submodule(path).gate_up_proj)
    ids = torch.randint(3, 256, (1, 4))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_release_runs_when_the_forward_raises():
    reference = tiny_model("mixtral", num_layers=1)
    model, provider, hooks = _with_provider(reference)
    module = model.get_submodule(next(iter(hooks)))
    # the model's own matmul refuses the wrong hidden size (grouped_mm, or F.linear in a per-expert loop)
    with pytest.raises(RuntimeError, match=r"contraction dimension of mat_a and mat_b|cannot be multiplied"):
        module(torch.zeros(2, 7), torch.tensor([[0, 1], [1, 2]]), torch.ones(2, 2))  # wrong hidden size
    assert [event for event, _, _ in provider.log] == ["make_ready", "release"]
